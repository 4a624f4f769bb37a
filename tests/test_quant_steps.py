"""Steps 2, 3 and 4 on a torchao-quantized capture (issue 19): every scheme against the running model.

Step 2 --quant captures the quantized model; steps 3 and 4 recompute it from the files with the
integer path of common/quant (common/quant/linear.py). Checked here: every node PASSes (layer and
chain mode, decode steps), the activation scales and the w8a8 linears are bit for bit the running
model's, the int32 accumulators equal an independent int64 matmul, planted mistakes FAIL, and a
quantized capture read with float weights (and the other way round, or two schemes) is one clear
error with nothing written.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from conftest import load_script, prepared_once, step2

from common.cli import InputError
from common.files import layout
from common.quant import intmm, quantize
from common.quant.linear import QuantWeight
from common.quant.schemes import SCHEMES

PROMPTS = ("Hello there", "The capital of France is")
PROJ = layout.ATTENTION_PROJ + layout.MLP_PROJ


@functools.cache
def _script(name):
    return load_script(name)


def step(n: int, *argv) -> int:
    script = {1: "1_model_weights.py", 3: "3_offline_qkv.py", 4: "4_offline_forward.py"}[n]
    return _script(script).main([str(a) for a in argv])


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """(variant, scheme) -> (model_dir, weights_dir, acts_dir): step 1 and step 2 --quant (2 decode steps), once."""
    base = tmp_path_factory.mktemp("quant_steps")
    runs = {}

    def get(variant: str, scheme: str, *extra: str):
        key = (variant, scheme, extra)
        if key not in runs:
            folder = base / f"{variant}-{scheme}{''.join(extra)}"
            prep = prepared_once(
                tiny_models, folder,
                lambda m, d: (step(1, "--model-dir", m, "--out-dir", d, "--quant", scheme, *extra), d)[1],
                lambda m, d: step2(m, d, "--quant", scheme, "--generate", "2", *extra, prompts=PROMPTS))
            runs[key] = prep(variant)
        return runs[key]
    return get


def offline(n: int, acts, weights, out, *argv) -> int:
    return step(n, "--acts-dir", acts, "--weights-dir", weights, "--out-dir", out, *argv)


def report(out) -> dict:
    return json.loads((out / layout.REPORT_JSON).read_text())


def read_ints(path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.int64, delimiter=",", ndmin=2)


# --- every scheme passes, in layer and chain mode and in the decode steps ----------------------------


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_passes_steps_3_and_4(quantized, tmp_path, scheme):
    _, weights, acts = quantized("llama32", scheme)
    meta = json.loads((acts / layout.META_MODEL).read_text())
    assert meta["quant"]["scheme"] == scheme and json.loads((acts / "meta_layer0.json").read_text())["quant"]
    act = SCHEMES[scheme].act
    if act:  # step 4 checks q, k, v, probs and attn too: step 3 once per integer path
        assert offline(3, acts, weights, tmp_path / "qkv") == 0
    assert offline(4, acts, weights, tmp_path / "fwd", "--no-plots") == 0
    assert offline(4, acts, weights, tmp_path / "chain", "--mode", "chain", "--no-plots") == 0
    results = report(tmp_path / "fwd")
    for folder in (tmp_path / "fwd", tmp_path / "fwd" / "decode" / "step_2"):
        for proj in PROJ:
            assert (folder / layout.xq(proj, 1)).is_file() == bool(act)
            assert (folder / layout.acc(proj, 1)).is_file() == bool(act)
            assert (folder / layout.xzero(proj, 1)).is_file() == (act == "asym")
        assert (tmp_path / "chain" / layout.acc("down_proj", 2)).is_file() == bool(act)
    text = json.dumps(results)
    assert ('"xscale"' in text) == bool(act) and '"linear"' in text
    if scheme == "w8a8":  # the exact checks: activation scales and the int32 linears, bit for bit
        exact = [m for m in _metrics(results) if m[0] in ("xscale", "linear")]
        assert exact and all(m[1]["max_abs"] == 0.0 for m in exact), exact


def _metrics(tree, key=None):
    """(quantity, metrics) pairs anywhere in a report."""
    if isinstance(tree, dict):
        if "max_abs" in tree and "pass" in tree:
            yield key, tree
        for k, v in tree.items():
            yield from _metrics(v, k)
    elif isinstance(tree, list):
        for v in tree:
            yield from _metrics(v, key)


@pytest.mark.parametrize("variant", ["bias", "mlp_bias"])
def test_w8a8_variants_pass(quantized, tmp_path, variant):
    """Biases added after the integer epilogue, as torchao does."""
    _, weights, acts = quantized(variant, "w8a8")
    assert offline(4, acts, weights, tmp_path / "fwd", "--no-plots") == 0


def test_quant_head_passes(quantized, tmp_path):
    _, weights, acts = quantized("llama32", "w4a8-g32", "--quant-head")
    assert json.loads((acts / layout.META_MODEL).read_text())["quant"]["quant_head"] is True
    assert offline(4, acts, weights, tmp_path / "fwd", "--layers", "2", "--no-plots") == 0
    assert offline(4, acts, weights, tmp_path / "chain", "--mode", "chain", "--no-plots") == 0


# --- the integer tensors --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8-g32"])
def test_accumulators_equal_an_int64_matmul(quantized, tmp_path, scheme):
    """acc = sum_k (xq - xzero) * wq over each group, from the files alone, in numpy int64."""
    _, weights, acts = quantized("llama32", scheme)
    out = tmp_path / "fwd"
    assert offline(4, acts, weights, out, "--layers", "0,1", "--no-plots") == 0
    for folder in (out, out / "decode" / "step_1"):
        for proj, block in [(p, "self_attn") for p in layout.ATTENTION_PROJ] + [(p, "mlp") for p in layout.MLP_PROJ]:
            xq, acc = read_ints(folder / layout.xq(proj, 1)), read_ints(folder / layout.acc(proj, 1))
            wq = read_ints(weights / f"model.layers.1.{block}.{proj}.weight.q.csv")
            assert xq.min() >= -128 and xq.max() <= 127
            if scheme == "w8a8":
                assert np.array_equal(acc, xq @ wq.T)
                continue
            x = xq - read_ints(folder / layout.xzero(proj, 1))  # (M, K) - (M, 1)
            G = wq.shape[1] // 32
            groups = [x[:, g * 32:(g + 1) * 32] @ wq[:, g * 32:(g + 1) * 32].T for g in range(G)]  # G x (M, N)
            assert np.array_equal(acc, np.stack(groups, axis=2).reshape(len(x), -1))  # column o*G + g


def test_scales_written_are_the_running_models(quantized, tmp_path):
    """Step 2's ref_xscale (torchao's own activation quantization, in a pre-hook) is what numpy gives the
    captured input bit for bit; step 3's xscale of q_proj (from its own xnorm) matches it."""
    _, weights, acts = quantized("llama32", "w8a8")
    from common.files.csv_io import read_csv
    for n in range(3):
        xnorm = read_csv(acts / layout.layer_file("xnorm", n))
        ref = read_csv(acts / layout.ref_xscale("q_proj", n))
        assert np.array_equal(quantize.quantize_activation_per_token(xnorm)[1], ref)
        act = read_csv(acts / layout.ref_file("act", n))
        assert np.array_equal(quantize.quantize_activation_per_token(act)[1], read_csv(acts / layout.ref_xscale("down_proj", n)))


# --- planted mistakes ------------------------------------------------------------------------------


def per_tensor_activation(x):
    amax = np.float32(np.abs(x).max())
    scale = np.full((x.shape[0], 1), max(amax / np.float32(127.5), np.float32(2 ** -23)), np.float32)
    return quantize.quantize_round_half_even(x, scale, None, -128, 127), scale


def scale_over_127(x):
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True) / np.float32(127), np.float32(2 ** -23))
    return quantize.quantize_round_half_even(x, scale, None, -128, 127), scale


@pytest.mark.parametrize("mistake", ["per_tensor_activation", "scale_over_127", "acc_plus_one", "group_64",
                                     "half_away"])
def test_planted_mistakes_fail(quantized, tmp_path, monkeypatch, mistake):
    scheme = "w4a8-g32" if mistake == "group_64" else "w8a8"
    _, weights, acts = quantized("llama32", scheme)
    real_matmul = intmm.int_matmul
    argv = ("--layers", "0", "--no-verify-hashes", "--no-plots")
    if mistake == "half_away":
        acts = _plant_tie(acts, weights, tmp_path)  # before the mistake: its references are the running rule's
        assert offline(4, acts, weights, tmp_path / "faithful", *argv) == 0  # the twin: the tie alone passes
    if mistake == "per_tensor_activation":
        monkeypatch.setattr(quantize, "quantize_activation_per_token", per_tensor_activation)
    elif mistake == "scale_over_127":
        monkeypatch.setattr(quantize, "quantize_activation_per_token", scale_over_127)
    elif mistake == "acc_plus_one":
        monkeypatch.setattr(intmm, "int_matmul", lambda xq, wq: real_matmul(xq, wq) + np.int32(1))
    elif mistake == "group_64":
        monkeypatch.setattr(QuantWeight, "group_size", property(lambda self: 64))
    elif mistake == "half_away":  # round half away from zero: only ties differ, so plant ties in the weights
        real = quantize.quantize_activation_per_token

        def half_away(x):
            xq, scale = real(x)
            t = x * (np.float32(1) / scale)
            ties = np.abs(t - np.trunc(t)) == 0.5
            return np.where(ties, np.clip(np.trunc(t) + np.sign(t), -128, 127), xq).astype(np.int8), scale
        monkeypatch.setattr(quantize, "quantize_activation_per_token", half_away)
    code = offline(4, acts, weights, tmp_path / "fwd", *argv)
    assert code == 1, mistake


def _plant_tie(acts, weights, tmp_path):
    """A copy of the capture whose layer-0 down_proj input (ref_act) holds one value exactly halfway
    between two even-odd levels, and ref_mlp recomputed from it by the running rule (ties to even):
    only the rounding of that tie decides whether the linear check passes."""
    import shutil
    from common.files.csv_io import read_csv, write_csv
    from common.quant.schemes import get_scheme
    out = tmp_path / "acts_tie"
    shutil.copytree(acts, out)
    act = read_csv(out / layout.ref_file("act", 0))
    row = act[0]
    scale = quantize.quantize_activation_per_token(act[:1])[1][0, 0]
    inv = np.float32(1) / scale
    found = None
    for k in range(0, 126, 2):  # v * (1 / scale) == k + 0.5 exactly, k even: ties-to-even gives k, away k + 1
        v = np.float32(np.float32(k + 0.5) * scale)
        for cand in (v, np.nextafter(v, np.float32(0)), np.nextafter(v, np.float32(1e9))):
            if np.float32(cand * inv) == np.float32(k + 0.5):
                found = cand
                break
        if found is not None:
            break
    assert found is not None
    others = np.argsort(np.abs(row))[0]  # the smallest value: the row's amax (its scale) stays
    row[others] = found
    write_csv(out / layout.ref_file("act", 0), act)
    q = read_ints(weights / "model.layers.0.mlp.down_proj.weight.q.csv").astype(np.int8)
    scale_w = read_csv(weights / "model.layers.0.mlp.down_proj.weight.scale.csv")
    y = QuantWeight(q, scale_w, get_scheme("w8a8")).apply(act)
    write_csv(out / layout.ref_file("mlp", 0), y)
    return out


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------


def test_mismatched_captures_and_weights_write_nothing(quantized, tiny_models, tmp_path):
    model, weights_q, acts_q = quantized("llama32", "w8a8")
    _, weights_4, acts_4 = quantized("llama32", "w4a8-g32")
    weights_f = tmp_path / "wf"
    assert step(1, "--model-dir", model, "--out-dir", weights_f) == 0
    acts_f = step2(model, tmp_path / "xf", prompts=PROMPTS)
    cases = [(acts_q, weights_f, "as floats"), (acts_f, weights_q, "w8a8 integers"), (acts_q, weights_4, "w4a8-g32"),
             (acts_4, weights_q, "w8a8")]
    for i, (acts, weights, says) in enumerate(cases):
        for n in (3, 4):
            out = tmp_path / f"out{i}{n}"
            with pytest.raises(InputError, match=says):
                offline(n, acts, weights, out)
            assert not out.exists()
    with pytest.raises(InputError, match="is w8a8"):
        offline(4, acts_q, weights_q, tmp_path / "o", "--quant", "w8a16")
    with pytest.raises(InputError, match="float32"):
        step2(model, tmp_path / "bf", "--quant", "w8a8", "--dtype", "bfloat16", prompts=PROMPTS)
    with pytest.raises(InputError, match="group size 48"):
        step2(model, tmp_path / "g48", "--quant", "w4a8-g48", prompts=PROMPTS)
    assert not (tmp_path / "bf").exists() and not (tmp_path / "g48").exists()


def test_streaming_capture_is_the_same_model(quantized, tmp_path):
    model, weights, acts = quantized("llama32", "w4a8-g32")
    streamed = step2(model, tmp_path / "s", "--quant", "w4a8-g32", "--streaming", prompts=PROMPTS)
    for name in ("ref_out_layer2.csv", "ref_act_layer1.csv", layout.ref_xscale("o_proj", 1), "ref_logits.csv"):
        assert (streamed / name).read_bytes() == (acts / name).read_bytes(), name
    assert offline(4, streamed, weights, tmp_path / "fwd", "--layers", "2", "--no-plots") == 0


# --- the demo model --------------------------------------------------------------------------------


def test_demo_model_w8a8(demo_model, tmp_path):
    """SmolLM2-135M, w8a8, layers 0 and 14 (its massive activations): layer mode with a decode step."""
    weights = tmp_path / "w"
    assert step(1, "--model-dir", demo_model, "--out-dir", weights, "--quant", "w8a8",
                "--filter", r"^model\.layers\.(0|14)\.") == 0
    acts = step2(demo_model, tmp_path / "x", "--quant", "w8a8", "--layers", "0,14", "--logits", "none",
                 "--generate", "1", "--no-save-attn-probs", prompts=["The capital of France is"])
    assert offline(4, acts, weights, tmp_path / "fwd", "--no-plots") == 0
    exact = [m for m in _metrics(report(tmp_path / "fwd")) if m[0] in ("xscale", "linear")]
    assert exact and all(m[1]["max_abs"] == 0.0 for m in exact)
    xq, acc = read_ints(tmp_path / "fwd" / layout.xq("q_proj", 0)), read_ints(tmp_path / "fwd" / layout.acc("q_proj", 0))
    wq = read_ints(weights / "model.layers.0.self_attn.q_proj.weight.q.csv")
    assert np.array_equal(acc, xq @ wq.T)


def test_long_positions(quantized, tmp_path):
    """Positions 480.. (the tiny model's window is 512): RoPE far out, under the quantized linears."""
    model, weights, _ = quantized("llama32", "w8a8")
    acts = step2(model, tmp_path / "x", "--quant", "w8a8", "--position-offset", "480", prompts=PROMPTS)
    assert offline(3, acts, weights, tmp_path / "qkv") == 0
