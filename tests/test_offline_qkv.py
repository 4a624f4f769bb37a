"""3_offline_qkv.py end to end: steps 1 -> 2 -> 3 on every tiny Llama variant and on the demo model.

Every layer must pass at <= 1e-5 relative error, and the check must have teeth: each classic
mistake (ignoring the Llama-3 scaling, pairing adjacent dimensions, the wrong KV head, dropping
the biases, a (1 + w) input norm) FAILs on the Llama-3.2-shaped model with a prompt of a few dozen tokens.
The mistakes are planted by swapping one equation of common/ for a buggy twin written here.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, load_script, prepared_once, run_script, step2
from model_factory import VARIANTS

from common.cli import InputError
from common.files import layout
from common.files.csv_io import read_csv, write_csv
from common.files.layout import ATTENTION_FILTER, layer_file, ref_file
from common.llama import attention, norm, rope

# A few dozen tokens with the tiny tokenizer (35), and a short one so the batch is padded.
LONG = ("The capital of France is Paris. The capital of Italy is Rome. "
        "What is the capital of France? Paris is the capital.")
SHORT = "Hello world, the quick brown fox"
RTOL = 1e-5


offline = load_script("3_offline_qkv.py")


def export_weights(model_dir: Path, out_dir: Path, in_process: bool = True) -> Path:
    """Step 1: the attention projections of every layer as CSV (in-process saves ~2 s of imports)."""
    argv = ["--model-dir", str(model_dir), "--out-dir", str(out_dir), "--filter", ATTENTION_FILTER]
    if not in_process:
        r = run_script("1_model_weights.py", *argv)
        assert r.returncode == 0, r.stderr
        return out_dir
    assert load_script("1_model_weights.py").main(argv) == 0
    return out_dir


def capture(model_dir: Path, out_dir: Path, *args: str, prompts=(LONG, SHORT)) -> Path:
    """Step 2, in-process (tests/test_get_x.py runs it as a subprocess)."""
    return step2(model_dir, out_dir, *args, prompts=prompts)


@pytest.fixture(scope="module")
def pipeline(tiny_models, tmp_path_factory):
    """variant -> (model_dir, weights_dir, acts_dir), steps 1 and 2 run once per variant on first use."""
    return prepared_once(tiny_models, tmp_path_factory.mktemp("offline_qkv"), export_weights, capture)


def step3(model, weights, acts, out, *args: str) -> tuple[int, dict]:
    """Step 3 in-process; returns (exit code, report.json)."""
    code = offline.main(["--model-dir", str(model), "--weights-dir", str(weights), "--acts-dir", str(acts),
                         "--out-dir", str(out), *args])
    return code, json.loads((out / "report.json").read_text())


def max_rel(report: dict) -> dict[str, float]:
    """Worst max_rel of each quantity over the layers."""
    layers = report["layers"].values()
    return {qn: max(per[qn]["max_rel"] for per in layers) for qn in ("xnorm", "q", "k", "v", "probs", "attn")}


def failing(report: dict) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for layer, per in report["layers"].items():
        for qn, m in per.items():
            if not m["pass"]:
                out.setdefault(qn, []).append(int(layer))
    return out


# --- every variant passes ------------------------------------------------------------------------

def test_llama32_passes_as_a_user_runs_it(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    out = tmp_path / "qkv"
    r = run_script("3_offline_qkv.py", "--model-dir", model, "--weights-dir", weights, "--acts-dir", acts,
                   "--out-dir", out, "--plot-layer", "2", "--plot-head", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^PASS: 3 layers x 6 quantities", r.stdout, re.M), r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["pass"] and sorted(report["layers"]) == ["0", "1", "2"]
    assert max(max_rel(report).values()) <= RTOL
    assert "timing_s" not in report  # timing per phase is benchmarks/bench_offline_qkv.py's

    meta = json.loads((acts / "meta_layer0.json").read_text())
    B, T, H, Hkv, Dh, d = (meta[k] for k in ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_dim",
                                             "d_model"))
    assert B == 2 and 30 <= read_csv(acts / "attention_mask.csv").sum(1).max() <= 60  # a few dozen tokens
    mask = read_csv(acts / "attention_mask.csv").reshape(-1) > 0
    for n in range(3):
        for qn, cols in (("q", H * Dh), ("k", Hkv * Dh), ("v", Hkv * Dh), ("attn", d)):
            got = read_csv(out / layer_file(qn, n), (B * T, cols))  # same shape as the ref_ file
            ref = read_csv(acts / ref_file(qn, n), (B * T, cols))
            np.testing.assert_allclose(got[mask], ref[mask], rtol=0, atol=RTOL * np.abs(ref[mask]).max())
    md = (out / "report.md").read_text()
    assert "| layer | xnorm max_rel | q max_rel |" in md and "max_abs <= ATOL" in md
    for png in ("errors.png", "attention_layer2_head3.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "llama32"])
def test_every_variant_passes(pipeline, tmp_path, variant):
    code, report = step3(*pipeline(variant), tmp_path / "qkv")
    assert code == 0 and report["pass"], failing(report)
    assert max(max_rel(report).values()) <= RTOL, max_rel(report)


def test_right_padding_and_a_single_prompt(pipeline, tmp_path):
    model, weights, _ = pipeline("llama32")
    for args, prompts in ((["--padding-side", "right"], (SHORT, LONG)), ([], (LONG,))):
        acts = capture(model, tmp_path / "x", *args, prompts=prompts)
        code, report = step3(model, weights, acts, tmp_path / "qkv")
        assert code == 0 and max(max_rel(report).values()) <= RTOL, (args, max_rel(report))


# --- the check has teeth --------------------------------------------------------------------------

def inv_freq_without_scaling(head_dim, theta, scaling, lanes=None):
    return ORIG_INV_FREQ(head_dim, theta, None, lanes)


def apply_rope_adjacent(x, cos, sin):
    """Meta's complex-number pairing (2i, 2i+1): right for Meta's checkpoints, wrong for HF's."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, T, H, Dh/2) each
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return np.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)  # interleave back


def repeat_kv_modulo(x, n_rep):
    """Query head h reads KV head h % Hkv (np.tile) instead of h // n_rep."""
    return np.tile(x, (1, 1, n_rep, 1))


def linear_without_bias(x, w, b=None):
    return x @ w.T


def rms_norm_one_plus_w(x, weight, eps):
    """Gemma's (1 + w) norm weight on a Llama model."""
    return ORIG_RMS_NORM(x, 1 + weight, eps)


ORIG_INV_FREQ, ORIG_RMS_NORM = rope.rope_inv_freq, norm.rms_norm
BUGS = {  # name -> (module, function, buggy twin, quantities that must FAIL in every layer)
    "ignore_llama3_scaling": (rope, "rope_inv_freq", inv_freq_without_scaling, {"q", "k", "probs", "attn"}),
    "adjacent_pairs": (rope, "apply_rope", apply_rope_adjacent, {"q", "k", "probs", "attn"}),
    "wrong_kv_head": (attention, "repeat_kv", repeat_kv_modulo, {"probs", "attn"}),
    "norm_one_plus_w": (norm, "rms_norm", rms_norm_one_plus_w, {"xnorm", "q", "k", "v", "probs", "attn"}),
}


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_bug_fails_on_llama32(pipeline, tmp_path, monkeypatch, bug):
    model, weights, acts = pipeline("llama32")
    module, name, twin, must_fail = BUGS[bug]
    monkeypatch.setattr(module, name, twin)
    code, report = step3(model, weights, acts, tmp_path / "qkv")
    assert code == 1 and not report["pass"]
    assert failing(report) == {qn: [0, 1, 2] for qn in must_fail}, failing(report)
    worst = {qn: min(per[qn]["max_rel"] for per in report["layers"].values()) for qn in must_fail}
    assert min(worst.values()) > 100 * RTOL, worst  # not a near miss: far outside the tolerance


def test_dropping_the_biases_fails(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(attention, "linear", linear_without_bias)
    code, report = step3(*pipeline("bias"), tmp_path / "qkv")
    assert code == 1 and set(failing(report)) == {"q", "k", "v", "probs", "attn"}


def test_padded_rows_are_not_compared_but_real_ones_are(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    bad = tmp_path / "x"
    shutil.copytree(acts, bad)
    mask = read_csv(bad / "attention_mask.csv").reshape(-1) > 0
    assert not mask.all()
    ref = read_csv(bad / "ref_q_layer1.csv")
    ref[~mask] = 1e3  # garbage where the batch is padding: ignored
    write_csv(bad / "ref_q_layer1.csv", ref)
    code, _ = step3(model, weights, bad, tmp_path / "qkv", "--no-verify-hashes")  # the numbers, not the sha256
    assert code == 0

    row = int(np.flatnonzero(mask)[-1])
    ref[row, 5] += 1e-3 * np.abs(ref[mask]).max()  # one real value off by 0.1% of the scale
    write_csv(bad / "ref_q_layer1.csv", ref)
    r = run_script("3_offline_qkv.py", "--model-dir", model, "--weights-dir", weights, "--acts-dir", bad,
                   "--out-dir", tmp_path / "qkv", "--no-verify-hashes")
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^FAIL \(1 of 18 checks\)", r.stdout, re.M), r.stdout
    worst = json.loads((tmp_path / "qkv" / "report.json").read_text())["worst"]
    assert (worst["layer"], worst["quantity"], worst["worst_row"], worst["worst_col"]) == (1, "q", row, 5)
    assert worst["max_rel"] == pytest.approx(1e-3, rel=0.05)


def test_without_references_nothing_is_verified(pipeline, tmp_path):
    model, weights, _ = pipeline("llama32")
    acts = capture(model, tmp_path / "x", "--layers", "1", "--no-save-reference", "--no-save-attn-probs",
                   "--no-save-x-norm")
    code = offline.main(["--weights-dir", str(weights), "--acts-dir", str(acts), "--out-dir", str(tmp_path / "q")])
    assert code == 0 and (tmp_path / "q" / "q_layer1.csv").is_file()
    assert not (tmp_path / "q" / "report.json").exists()


# --- bad input: one line, exit 2, nothing written -------------------------------------------------

def test_missing_weights_name_the_step_1_command(pipeline, tmp_path):
    model, _, acts = pipeline("llama32")
    empty = tmp_path / "weights"
    r = run_script("3_offline_qkv.py", "--acts-dir", acts, "--weights-dir", empty, "--out-dir", tmp_path / "qkv")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "model.layers.0.input_layernorm.weight.csv is missing" in r.stderr
    assert (f"run python 1_model_weights.py --model-dir {model} --out-dir {empty} "
            rf"--filter '\.input_layernorm\.|\.self_attn\.(q|k|v|o)_proj\.'") in r.stderr, r.stderr
    assert not (tmp_path / "qkv").exists()
    with pytest.raises(InputError, match=re.escape(r"--filter '^model\.layers\.1\.(input_layernorm|self_attn)\.'")):
        offline.main(["--acts-dir", str(acts), "--weights-dir", str(empty), "--layers", "1"])


def test_a_csv_of_the_wrong_shape_names_the_file_and_both_shapes(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    bad = tmp_path / "weights"
    shutil.copytree(weights, bad)
    name = "model.layers.2.self_attn.k_proj.weight.csv"
    write_csv(bad / name, read_csv(bad / name).T)  # (32, 64) written transposed
    with pytest.raises(InputError, match=re.escape(f"{bad / name} has shape (64, 32), expected (32, 64)")):
        step3(model, bad, acts, tmp_path / "qkv", "--no-verify-hashes")

    bad_acts = tmp_path / "x"
    shutil.copytree(acts, bad_acts)
    write_csv(bad_acts / "xnorm_layer0.csv", read_csv(bad_acts / "xnorm_layer0.csv")[:-1])
    with pytest.raises(InputError, match=r"xnorm_layer0.csv has shape \(\d+, 64\), expected \(\d+, 64\)"):
        step3(model, weights, bad_acts, tmp_path / "qkv", "--no-verify-hashes")


def test_unsupported_rope_type_is_an_error_not_a_default(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    bad = tmp_path / "x"
    shutil.copytree(acts, bad)
    meta = json.loads((bad / "meta_layer0.json").read_text())
    meta["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (bad / "meta_layer0.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="meta_layer0.json: rope_type 'yarn' is not supported"):
        step3(model, weights, bad, tmp_path / "qkv", "--no-verify-hashes")
    assert not (tmp_path / "qkv").exists()


def test_missing_activations_name_step_2(tmp_path):
    with pytest.raises(InputError, match="does not exist: run: python 2_get_x.py --model-dir"):
        offline.main(["--acts-dir", str(tmp_path / "nowhere"), "--weights-dir", str(tmp_path)])
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="no meta_layerN.json"):
        offline.main(["--acts-dir", str(tmp_path / "x"), "--weights-dir", str(tmp_path)])


# --- the demo model -----------------------------------------------------------------------------

def test_demo_model_every_layer_passes(demo_model, tmp_path):
    weights, acts, out = tmp_path / "weights", tmp_path / "x", tmp_path / "qkv"
    export_weights(demo_model, weights, in_process=False)
    r = run_script("2_get_x.py", "--model-dir", demo_model, "--out-dir", acts, "--chat")
    assert r.returncode == 0, r.stderr
    r = run_script("3_offline_qkv.py", "--model-dir", demo_model, "--weights-dir", weights, "--acts-dir", acts,
                   "--out-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted(map(int, report["layers"])) == list(range(30))
    assert report["pass"] and max(max_rel(report).values()) <= RTOL, max_rel(report)
    assert "PASS: 30 layers x 6 quantities" in r.stdout


def test_step_3_never_imports_torch(pipeline, tmp_path):
    """Step 3 is a numpy-only process: run as a user runs it, torch is never loaded into it."""
    model, weights, acts = pipeline("llama32")
    argv = ["3_offline_qkv.py", "--model-dir", str(model), "--weights-dir", str(weights), "--acts-dir", str(acts),
            "--out-dir", str(tmp_path / "qkv")]
    wrapper = ("import runpy, sys\n"
               f"sys.argv = {argv!r}\n"
               "try:\n"
               "    runpy.run_path('3_offline_qkv.py', run_name='__main__')\n"
               "except SystemExit as e:\n"
               "    code = e.code\n"
               "print('exit', code, 'torch loaded:', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip().splitlines()[-1] == "exit 0 torch loaded: False", r.stdout + r.stderr
    # The check has teeth: the same wrapper sees torch once anything imports it.
    r = subprocess.run([sys.executable, "-c", "import sys; import common.files.csv_io, torch; "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "True", r.stderr
