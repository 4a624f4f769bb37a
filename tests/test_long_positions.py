"""Long positions: the check reaches the whole context window, not just positions below ~40.

A tiny model with Llama-3.2's real RoPE (rope_theta 500000, llama3 factor 32, original 8192,
low/high freq factors 1/4, window 131072, head_dim 64: the real frequency set) is captured by
step 2 at position offsets up to the end of its window and checked by step 3, as a user runs them.
At long positions one ulp of a frequency is a visible angle error (common/llama/rope.py), so the offline
frequencies are compared with transformers' own bit for bit, over many random configs, torch's float32
pow included (common/llama/torch_pow.py): theta 1e6, head_dim 128 FAILed near 2**24 with the correctly
rounded power and PASSes with torch's.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_script
from test_offline_qkv import LONG, SHORT, capture, export_weights, failing, max_rel, step3
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import model_factory
from common.check import offline, report
from common.cli import InputError
from common.files import layout
from common.files.csv_io import read_csv
from common.llama import attention, rope, torch_pow
from common.llama.spec import LayerSpec
from common.model.prompts import encode_prompts, load_tokenizer

RTOL = 1e-5
WINDOW = model_factory.LLAMA_3_2_1B["max_position_embeddings"]  # 131072
# Llama-3.2-1B's config with everything but RoPE and head_dim made tiny.
LLAMA32_ROPE = {**model_factory.TINY, "rope_theta": 500000.0,
                "rope_scaling": dict(model_factory.LLAMA_3_2_1B["rope_scaling"]), "max_position_embeddings": WINDOW,
                "head_dim": 64, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                "intermediate_size": 64, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """(model_dir, weights_dir, T): the Llama-3.2-RoPE model, its step-1 export, the batch's padded length."""
    base = tmp_path_factory.mktemp("long_positions")
    model = model_factory.build_model(base / "model", config=LLAMA32_ROPE)
    T = encode_prompts(load_tokenizer(model), [LONG, SHORT]).input_ids.shape[1]
    return model, export_weights(model, base / "weights"), T


OFFSETS = {"0": 0, "8000": 8000, "65000": 65000, "end": None}  # None: the last T positions of the window


@pytest.fixture(scope="module")
def captures(long_model, tmp_path_factory):
    """offset name -> step 2's folder at that offset, captured once on first use."""
    model, _, T = long_model
    base, done = tmp_path_factory.mktemp("x_offsets"), {}

    def get(name: str):
        if name not in done:
            offset = OFFSETS[name] if OFFSETS[name] is not None else WINDOW - T
            done[name] = capture(model, base / f"x_offset{offset}", "--position-offset", str(offset))
        return done[name]
    return get


@pytest.mark.parametrize("name", OFFSETS)
def test_offline_qk_match_the_model_across_the_window(long_model, captures, tmp_path, name):
    model, weights, T = long_model
    acts = captures(name)
    offset = OFFSETS[name] if OFFSETS[name] is not None else WINDOW - T
    mask, pos = read_csv(acts / layout.ATTENTION_MASK), read_csv(acts / layout.POSITION_IDS)
    real = mask > 0
    for b in range(2):  # each prompt counts its own real tokens from the offset
        assert pos[b][real[b]].tolist() == list(range(offset, offset + int(real[b].sum())))
    assert pos[real].max() == offset + T - 1 and (name != "end" or pos.max() == WINDOW - 1)
    assert json.loads((acts / layout.meta_file(0)).read_text())["position_offset"] == offset

    code, report = step3(model, weights, acts, tmp_path / "qkv")
    assert code == 0 and report["pass"], failing(report)
    assert max(max_rel(report).values()) <= RTOL, max_rel(report)


# --- the check has teeth at long positions --------------------------------------------------------

ORIG_INV_FREQ = rope.rope_inv_freq


def without_scaling(head_dim, theta, scaling, lanes=None):
    return ORIG_INV_FREQ(head_dim, theta, None, lanes)


def factor_8(head_dim, theta, scaling, lanes=None):  # Llama-3.1's factor where Llama-3.2 says 32
    return ORIG_INV_FREQ(head_dim, theta, {**scaling, "factor": 8.0}, lanes)


def adjacent_pairs(x, cos, sin):
    """Meta's pairing (2i, 2i+1): right for Meta's checkpoints, wrong for HF's."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return np.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)


BUGS = {"without_scaling": ("rope_inv_freq", without_scaling), "factor_8": ("rope_inv_freq", factor_8),
        "adjacent_pairs": ("apply_rope", adjacent_pairs)}


def offline_qk_max_rel(weights, acts) -> dict[str, float]:
    """Step 3's recomputation of layer 0 without its files and plots: max_rel of q and k (common/check/verify)."""
    meta = json.loads((acts / layout.meta_file(0)).read_text())
    B, T = meta["batch_size"], meta["seq_len"]
    mask, position_ids, _ = offline.read_batch(acts, B, T)
    out = attention.attention_block(offline.read_xnorm(acts, 0, meta), offline.read_attention_weights(weights, 0, meta),
                                    LayerSpec.from_meta(meta), position_ids, mask)
    rows = offline.as_rows(out, B * T, with_probs=False)
    checked, _ = offline.verify(acts, 0, rows, mask.reshape(-1) > 0, offline.real_prob_rows(mask, meta["num_heads"]), 0, RTOL,
                            ("q", "k"))
    return {qn: checked[qn]["max_rel"] for qn in ("q", "k")}


@pytest.mark.parametrize("name", ["8000", "65000", "end"])
@pytest.mark.parametrize("bug", BUGS)
def test_each_rope_mistake_fails_at_long_positions(long_model, captures, monkeypatch, bug, name):
    _, weights, _ = long_model
    assert max(offline_qk_max_rel(weights, captures(name)).values()) <= RTOL
    monkeypatch.setattr(rope, *BUGS[bug])
    errors = offline_qk_max_rel(weights, captures(name))
    assert min(errors.values()) > 100 * RTOL, errors  # both fail, and far: not a near miss


def test_a_rope_mistake_fails_step_3_near_the_end_of_the_window(long_model, captures, tmp_path, monkeypatch):
    model, weights, _ = long_model
    monkeypatch.setattr(rope, *BUGS["factor_8"])
    code, report = step3(model, weights, captures("end"), tmp_path / "qkv")
    # attn passes: q.k depends on relative positions only (< T here), the same at any offset; the
    # absolute angles are in Q and K themselves, which is why steps 3/4 check them directly.
    assert code == 1 and set(failing(report)) == {"q", "k"}, failing(report)


# --- step 2's offset is checked at the door ------------------------------------------------------

def test_an_offset_outside_the_window_is_an_input_error(long_model, tmp_path):
    model, _, T = long_model
    for offset, match in ((-1, "is negative"), (WINDOW - T + 1, f"use an offset of at most {WINDOW - T}")):
        with pytest.raises(InputError, match=match):
            capture(model, tmp_path / "x", "--position-offset", str(offset))
    assert not (tmp_path / "x").exists()


def test_step_2_prints_what_it_is_about_to_write(long_model, tmp_path, capsys):
    model, _, _ = long_model
    # step 3's inputs only; step 4's (layer refs, probabilities, logits) add to the estimate likewise
    capture(model, tmp_path / "x", "--warn-write-gb", "0", "--no-save-layer-refs", "--no-save-attn-probs",
            "--logits", "none")
    out = capsys.readouterr().out
    assert re.search(r"about to write +=( ~0\.00 GB of CSV)", out) and "warning: this capture writes" in out
    files = (tmp_path / "x" / layout.layer_file(stem, 0) for stem in layout.STEP2_STEMS)
    written = sum(f.stat().st_size for f in files if f.is_file())
    meta = json.loads((tmp_path / "x" / layout.meta_file(0)).read_text())
    values = meta["batch_size"] * meta["seq_len"] * (3 * 128 + 4 * 64)  # x, xnorm, attn; q (2 heads), k, v
    assert 0.5 < written / (13 * values) < 2  # the estimate's bytes per value are about right


# --- inv_freq bit for bit -------------------------------------------------------------------------

def hf_inv_freq(config: LlamaConfig) -> np.ndarray:
    rope_type = config.rope_parameters["rope_type"]
    fn = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    return fn(config)[0].numpy()


def random_config(rng: random.Random) -> LlamaConfig:
    head_dim = 2 * rng.randint(8, 128)
    theta = rng.choice([1e4, 5e5, 1e6, 10 ** rng.uniform(3, 7)])
    rope_type = rng.choice(["default", "linear", "llama3"])
    scaling, window = None, 131072
    if rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": rng.choice([2.0, 4.0, rng.uniform(1.1, 64)])}
    elif rope_type == "llama3":
        low = rng.choice([1.0, rng.uniform(0.25, 4)])
        original = rng.choice([8192, 32, rng.randint(16, 65536)])
        factor = rng.choice([8.0, 32.0, rng.uniform(1.5, 64)])
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": low * rng.choice([4.0, rng.uniform(1.1, 16)]),
                   "original_max_position_embeddings": original}
        window = max(window, int(original * factor) + 1)
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_theta=theta,
                       rope_scaling=scaling, max_position_embeddings=window)


def ours(config: LlamaConfig) -> tuple[int, float, dict | None]:
    params = dict(config.rope_parameters)
    theta, rope_type = params.pop("rope_theta"), params["rope_type"]
    return config.head_dim, theta, None if rope_type == "default" else params


def test_scaling_matches_transformers_bit_for_bit_on_random_configs():
    """linear and llama3 applied to transformers' own plain frequencies give its scaled ones exactly:
    every float32 rounding of the scaling (reciprocals, scalar casts, operator order) is mirrored."""
    rng = random.Random(0)
    for _ in range(300):
        config = random_config(rng)
        head_dim, theta, scaling = ours(config)
        plain = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0].numpy()
        got = rope.scale_inv_freq(plain, scaling)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, hf_inv_freq(config), err_msg=str((head_dim, theta, scaling)))


def test_inv_freq_matches_transformers_bit_for_bit_on_random_configs():
    """The whole offline inv_freq (torch's pow mirrored, then the scaling) equals transformers' own
    frequencies exactly, on hundreds of random configs: every head_dim 16..256, so every split of
    the array between torch's SIMD pow and its scalar tail."""
    rng = random.Random(1)
    lanes = torch_pow.lanes_of(torch.backends.cpu.get_cpu_capability())
    for i in range(400):
        config = random_config(rng)
        if i < 121:  # every even head_dim once
            config.head_dim = 16 + 2 * i
        head_dim, theta, scaling = ours(config)
        got = rope.rope_inv_freq(head_dim, theta, scaling, lanes)
        want = LlamaRotaryEmbedding(config).inv_freq.numpy() if i % 20 == 0 else hf_inv_freq(config)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=str((head_dim, theta, scaling)))


def test_this_machines_capability_is_read_as_torch_reads_it():
    assert torch_pow.local_capability() == torch.backends.cpu.get_cpu_capability()
    assert np.array_equal(rope.default_inv_freq(128, 1e6), rope.default_inv_freq(128, 1e6, torch_pow.lanes_of(None)))


TORCH_POW_UNDER = """
import json, sys, torch
assert torch.backends.cpu.get_cpu_capability() == sys.argv[1], torch.backends.cpu.get_cpu_capability()
print(json.dumps([(1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float) / dh))).tolist()
                  for theta, dh in json.loads(sys.argv[2])]))
"""


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_the_lanes_follow_torchs_cpu_capability(capability):
    """torch under another capability (ATEN_CPU_CAPABILITY, in a subprocess) splits the array elsewhere,
    and the lanes for that capability reproduce it; this machine's lanes would not, on some configs."""
    if capability == "AVX2" and torch_pow.local_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    rng = random.Random(2)
    configs = [(rng.choice([1e4, 5e5, 1e6, 10 ** rng.uniform(3, 7)]), 2 * rng.randint(8, 128)) for _ in range(60)]
    configs += [(1e6, dh) for dh in (24, 40, 80, 96, 200)]
    r = subprocess.run([sys.executable, "-c", TORCH_POW_UNDER, capability, json.dumps(configs)], capture_output=True,
                       text=True, env={**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()})
    assert r.returncode == 0, r.stderr
    wrong_lanes = 0
    for (theta, dh), want in zip(configs, json.loads(r.stdout)):
        want = np.array(want, np.float32)
        np.testing.assert_array_equal(rope.default_inv_freq(dh, theta, torch_pow.LANES[capability]), want)
        wrong_lanes += not np.array_equal(rope.default_inv_freq(dh, theta, 16 if capability == "DEFAULT" else 0), want)
    assert wrong_lanes > 0  # the width matters: another width is wrong somewhere


def correctly_rounded_pow(base, exponent, lanes):
    """The planted mistake: the correctly rounded float32 power (float64, rounded once), not torch's."""
    return (np.float64(np.float32(base)) ** exponent.astype(np.float64)).astype(np.float32)


def test_the_correctly_rounded_power_is_not_torchs():
    """What rope.py used to compute: one frequency of 64 off for theta 1e6, head_dim 128 (index 37)."""
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=1e6)
    want = hf_inv_freq(config)
    assert np.array_equal(rope.default_inv_freq(128, 1e6), want)
    e = np.arange(0, 128, 2).astype(np.float32) / np.float32(128)
    assert np.flatnonzero(np.float32(1) / correctly_rounded_pow(1e6, e, 0) != want).tolist() == [37]


# Real models' RoPE (theta, head_dim, scaling), and the config the issue found one ulp off.
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
REAL = {
    "llama_3_2": (500000.0, 64, model_factory.LLAMA_3_2_1B["rope_scaling"]),
    "llama_3_1_8b": (500000.0, 128, LLAMA31_SCALING),
    "llama_2": (10000.0, 128, None),
    "smollm2": (100000.0, 64, None),
    "tiny_head_dim_64": (10000.0, 64, {**model_factory.TINY["rope_scaling"]}),
    "tiny": (10000.0, 16, model_factory.TINY["rope_scaling"]),
    "theta_1e6_head_dim_128": (1e6, 128, None),
}


@pytest.mark.parametrize("name", REAL)
def test_inv_freq_matches_transformers_bit_for_bit_on_real_configs(name):
    theta, head_dim, scaling = REAL[name]
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, rope_theta=theta,
                         rope_scaling=copy.deepcopy(scaling), max_position_embeddings=WINDOW)
    np.testing.assert_array_equal(rope.rope_inv_freq(head_dim, theta, scaling), hf_inv_freq(config))


# --- a config the correctly rounded power FAILed: theta 1e6, head_dim 128, far into the window -----

FAR = 2 ** 24  # positions stay exact in float32 up to here; one ulp of inv_freq[37] is ~5e-4 rad there
THETA_1E6 = {**LLAMA32_ROPE, "rope_theta": 1e6, "rope_scaling": None, "head_dim": 128, "hidden_size": 256,
             "max_position_embeddings": FAR}


@pytest.fixture(scope="module")
def theta_1e6(tmp_path_factory):
    """(model_dir, weights_dir, acts_dir): theta 1e6, head_dim 128, captured at the window's last positions."""
    base = tmp_path_factory.mktemp("theta_1e6")
    model = model_factory.build_model(base / "model", config=THETA_1E6)
    T = encode_prompts(load_tokenizer(model), [LONG, SHORT]).input_ids.shape[1]
    acts = capture(model, base / "x", "--position-offset", str(FAR - T))
    return model, export_weights(model, base / "weights"), acts


def test_theta_1e6_passes_at_the_end_of_a_2_to_the_24_window(theta_1e6, tmp_path, capsys):
    model, weights, acts = theta_1e6
    meta = json.loads((acts / layout.meta_file(0)).read_text())
    assert meta["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() and len(meta["rope_inv_freq"]) == 64
    code, report = step3(model, weights, acts, tmp_path / "qkv")
    assert code == 0 and max(max_rel(report).values()) <= RTOL, max_rel(report)
    assert "note: RoPE inv_freq equals the model's bit for bit (64 frequencies" in capsys.readouterr().out
    assert "bit for bit" in report["settings"]["RoPE inv_freq"]


def test_the_correctly_rounded_power_fails_theta_1e6_far_into_the_window(theta_1e6, tmp_path, monkeypatch, capsys):
    model, weights, acts = theta_1e6
    monkeypatch.setattr(torch_pow, "torch_powf", correctly_rounded_pow)
    code, report = step3(model, weights, acts, tmp_path / "qkv")
    assert code == 1 and set(failing(report)) == {"q", "k"}, failing(report)
    assert "warning: 1 of 64 RoPE frequencies differ from the model's by up to 1 ulp" in capsys.readouterr().out


def test_step_3_reads_an_older_meta_with_this_machines_lanes(theta_1e6, tmp_path, capsys):
    """A meta file from before torch_cpu_capability and rope_inv_freq were recorded: this machine's lanes."""
    model, weights, acts = theta_1e6
    old = tmp_path / "x_old"
    shutil.copytree(acts, old)
    meta = json.loads((old / layout.meta_file(0)).read_text())
    del meta["torch_cpu_capability"], meta["rope_inv_freq"]
    (old / layout.meta_file(0)).write_text(json.dumps(meta))
    code, report = step3(model, weights, old, tmp_path / "qkv", "--no-verify-hashes")  # edited: its sha256 differs
    assert code == 0, failing(report)
    assert "(this machine's; not in the meta); no rope_inv_freq in the meta" in capsys.readouterr().out


@pytest.mark.parametrize("offset", [0, 8000, 65000, WINDOW - 40])
def test_cos_sin_match_transformers_far_into_the_window(offset):
    config = LlamaConfig(**copy.deepcopy(LLAMA32_ROPE))
    position_ids = torch.arange(offset, offset + 40)[None]  # (1, T)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(torch.zeros(1), position_ids)  # (1, T, Dh)
    cos, sin = rope.rope_cos_sin(position_ids.numpy(), rope.rope_inv_freq(*ours(config)))  # (1, T, Dh/2)
    # Same float32 angles, so only cos/sin's own last-ulp rounding differs, at every position.
    np.testing.assert_allclose(np.concatenate([cos, cos], -1), cos_hf.numpy(), rtol=0, atol=2e-7)
    np.testing.assert_allclose(np.concatenate([sin, sin], -1), sin_hf.numpy(), rtol=0, atol=2e-7)
    if offset >= 65000:  # and a float64 angle (the exact math) would not match the model
        angle64 = position_ids.numpy()[..., None].astype(np.float64) * rope.rope_inv_freq(*ours(config))
        assert np.abs(np.cos(angle64) - cos).max() > 1e-4


def test_a_long_prompt_on_a_head_dim_64_llama3_model_stays_at_float32_rounding(tmp_path):
    """The issue's case: theta 1e4, factor 8, original 32, head_dim 64. Dividing where torch multiplies
    by a reciprocal put 2 of 32 frequencies one ulp off: 161 tokens FAILed (1.28e-5), 287 tokens
    gave 1.4e-5. Mirrored, Q and K stay at 7e-8 however long the prompt."""
    config = {**LLAMA32_ROPE, "rope_theta": 10000.0, "rope_scaling": dict(model_factory.TINY["rope_scaling"]),
              "max_position_embeddings": 512}
    model = model_factory.build_model(tmp_path / "model", config=config)
    acts = capture(model, tmp_path / "x", prompts=(" ".join([LONG] * 8),))
    assert read_csv(acts / layout.ATTENTION_MASK).sum() >= 280
    code, report = step3(model, export_weights(model, tmp_path / "w"), acts, tmp_path / "qkv")
    assert code == 0 and max(max_rel(report)[qn] for qn in ("q", "k")) <= 1e-6, max_rel(report)


def test_demo_model_passes_near_the_end_of_its_window(demo_model, tmp_path):
    """What `make demo` adds: the real model at positions near max_position_embeddings (8192)."""
    weights = tmp_path / "weights"
    r = run_script("1_model_weights.py", "--model-dir", demo_model, "--out-dir", weights,
                   "--filter", r"layers\.(0|29)\.(input_layernorm|self_attn\.(q|k|v|o)_proj)\.")
    assert r.returncode == 0, r.stderr
    offset = 8192 - encode_prompts(load_tokenizer(demo_model), [LONG]).input_ids.shape[1]
    acts = capture(demo_model, tmp_path / "x", "--layers", "0,29", "--position-offset", str(offset), prompts=(LONG,))
    assert read_csv(acts / layout.POSITION_IDS).max() == 8191
    code, report = step3(demo_model, weights, acts, tmp_path / "qkv")
    assert code == 0 and max(max_rel(report).values()) <= RTOL, max_rel(report)


def test_a_long_prompts_attention_plot_is_max_pooled_and_keeps_a_lone_link():
    probs = np.zeros((1000, 1000), np.float32)
    probs[999, 3] = 1.0
    pooled, f = report.max_pool(probs, report.PLOT_MAX_CELLS)
    assert f == 2 and pooled.shape == (500, 500) and pooled[499, 1] == 1.0 and pooled.sum() == 1.0
