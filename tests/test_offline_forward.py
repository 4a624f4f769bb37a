"""4_offline_forward.py end to end: steps 1 -> 2 -> 4 on every tiny Llama variant and on the demo model.

Layer mode: every node of every layer, the final norm and the logits within RTOL of the model's.
Chain mode: x_layer0 through the whole model lands on the model's top-1 tokens and logits.
And the check has teeth: each classic mistake (gate and up swapped, GELU for SiLU, a (1 + w) norm,
the residual skipped, the embedding as the head of an untied model) FAILs, planted by swapping one
equation of common/ for a buggy twin written here.
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

from common.check import offline as offline_files
from common.cli import InputError
from common.files import layout
from common.files.csv_io import read_csv
from common.llama import attention, forward, mlp, norm

# A few dozen tokens with the tiny tokenizer, and a short one so the batch is padded.
LONG = ("The capital of France is Paris. The capital of Italy is Rome. "
        "What is the capital of France? Paris is the capital.")
SHORT = "Hello world, the quick brown fox"
RTOL = 1e-5
CHAIN_RTOL = 1e-4


offline = load_script("4_offline_forward.py")
model_weights = load_script("1_model_weights.py")


def export_weights(model_dir: Path, out_dir: Path, *args: str) -> Path:
    """Step 1 in-process: every tensor (or those args select) as CSV."""
    assert model_weights.main(["--model-dir", str(model_dir), "--out-dir", str(out_dir), *args]) == 0
    return out_dir


def capture(model_dir: Path, out_dir: Path, *args: str, prompts=(LONG, SHORT)) -> Path:
    return step2(model_dir, out_dir, *args, prompts=prompts)


@pytest.fixture(scope="module")
def pipeline(tiny_models, tmp_path_factory):
    """variant -> (model_dir, weights_dir, acts_dir), steps 1 and 2 run once per variant on first use."""
    return prepared_once(tiny_models, tmp_path_factory.mktemp("offline_forward"), export_weights, capture)


def step4(model, weights, acts, out, *args: str) -> tuple[int, dict]:
    """Step 4 in-process (no plots unless asked); returns (exit code, report.json)."""
    code = offline.main(["--model-dir", str(model), "--weights-dir", str(weights), "--acts-dir", str(acts),
                         "--out-dir", str(out), *(args if "--plots" in args else (*args, "--no-plots"))])
    return code, json.loads((out / layout.REPORT_JSON).read_text())


def worst_rel(report: dict) -> dict[str, float]:
    """Worst max_rel of each node over the layers (layer mode), the head's included."""
    out: dict[str, float] = {}
    for per in report["layers"].values():
        for node, m in per.items():
            out[node] = max(out.get(node, 0.0), m["max_rel"])
    return {**out, **{k: m["max_rel"] for k, m in report.get("head", {}).items()}}


def failing(report: dict) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for layer, per in report["layers"].items():
        for node, m in per.items():
            if not m["pass"]:
                out.setdefault(node, []).append(int(layer))
    for node, m in report.get("head", {}).items():
        if not m["pass"]:
            out[node] = ["head"]
    return out


# --- every variant passes, in both modes ------------------------------------------------------------

def test_llama32_as_a_user_runs_it(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    out = tmp_path / "forward"
    r = run_script("4_offline_forward.py", "--model-dir", model, "--weights-dir", weights, "--acts-dir", acts,
                   "--out-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.rstrip().splitlines()
    assert lines[-2].startswith("PASS: 3 layers x 11 quantities") and lines[-1].startswith("PASS: final norm"), r.stdout
    assert re.search(r"^ *layer +xnorm +q +k +v +probs +attn +h +hnorm +act +mlp +out +max_abs +result$",
                     r.stdout, re.M)
    assert re.search(r"^prompt 0 'The capital of France is Paris\..*': next token, model vs offline$", r.stdout, re.M)
    report = json.loads((out / "report.json").read_text())
    assert report["pass"] and report["mode"] == "layer" and sorted(report["layers"]) == ["0", "1", "2"]
    assert max(worst_rel(report).values()) <= RTOL, worst_rel(report)
    assert set(report["head"]) == {"norm", "logits"} and len(report["top_tokens"]) == 2

    meta = json.loads((acts / layout.META_MODEL).read_text())
    B, T, d, I, V = (meta[k] for k in ("batch_size", "seq_len", "d_model", "intermediate_size", "vocab_size"))
    for n in range(3):  # every file has its ref_ twin's shape
        for stem, cols in (("xnorm", d), ("h", d), ("hnorm", d), ("act", I), ("mlp", d), ("out", d)):
            assert read_csv(out / layout.layer_file(stem, n)).shape == (B * T, cols)
    assert read_csv(out / layout.NORM).shape == (B * T, d) and read_csv(out / layout.LOGITS).shape == (B * T, V)
    md = (out / "report.md").read_text()
    assert "| layer | xnorm | q |" in md and "Top next tokens" in md and "max_abs <= ATOL" in md
    for png in (layout.ERRORS_PLOT, layout.TOP_TOKENS_PLOT):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_passes_in_both_modes(pipeline, tmp_path, variant):
    model, weights, acts = pipeline(variant)
    code, report = step4(model, weights, acts, tmp_path / "layer")
    assert code == 0 and report["pass"], failing(report)
    assert max(worst_rel(report).values()) <= RTOL, worst_rel(report)
    assert report["head"]["logits"]["pass"]

    code, report = step4(model, weights, acts, tmp_path / "chain", "--mode", "chain")
    assert code == 0 and report["pass"], report["verdict"]
    assert report["logits"]["max_rel"] <= CHAIN_RTOL and report["top1"]["agree"] == report["top1"]["total"] > 30
    assert report["top5_set"] == {"agree": 2, "total": 2}
    assert sorted(map(int, report["layers"])) == [0, 1, 2]
    assert max(report["layers"][str(n)]["out"]["max_rel"] for n in range(3)) <= CHAIN_RTOL


def test_chain_plots_and_logits_last(pipeline, tmp_path):
    model, weights, _ = pipeline("untied")
    acts = capture(model, tmp_path / "x", "--logits", "last", "--padding-side", "right")
    code, report = step4(model, weights, acts, tmp_path / "chain", "--mode", "chain", "--plots")
    assert code == 0 and report["top1"] == {"agree": 2, "total": 2}, report["verdict"]
    assert read_csv(tmp_path / "chain" / layout.LOGITS).shape == (2, 320)
    for png in (layout.CHAIN_PLOT, layout.TOP_TOKENS_PLOT):
        assert (tmp_path / "chain" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## The error of each layer's output as it grows" in (tmp_path / "chain" / "report.md").read_text()
    code, report = step4(model, weights, acts, tmp_path / "layer", "--layers", "1,2")
    assert code == 0 and report["head"]["logits"]["pass"] and sorted(report["layers"]) == ["1", "2"]


# --- the check has teeth ----------------------------------------------------------------------------

ORIG_SWIGLU, ORIG_RMS_NORM, ORIG_HEAD_WEIGHTS = mlp.swiglu_mlp, norm.rms_norm, offline_files.read_head_weights


def swiglu_gate_up_swapped(hnorm, w, hidden_act="silu"):
    return ORIG_SWIGLU(hnorm, mlp.MLPWeights(w.up, w.gate, w.down, w.b_up, w.b_gate, w.b_down), hidden_act)


def gelu_tanh(x):
    """GELU (tanh approximation) where Llama has SiLU."""
    return 0.5 * x * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x ** 3)))


def rms_norm_one_plus_w(x, weight, eps):
    """Gemma's (1 + w) weight on a Llama norm."""
    return ORIG_RMS_NORM(x, 1 + weight, eps)


def decoder_layer_without_residual(x, w, spec, position_ids, attention_mask, keep_probs=None):
    """forward.decoder_layer with h = attn instead of x + attn."""
    eps = spec.rms_norm_eps
    xnorm = norm.rms_norm(x, w.input_layernorm, eps)
    a = attention.attention_block(xnorm, w.attn, spec, position_ids, attention_mask, keep_probs=keep_probs)
    h = a["attn"]
    hnorm = norm.rms_norm(h, w.post_attention_layernorm, eps)
    m = mlp.swiglu_mlp(hnorm, w.mlp, spec.hidden_act)
    return {"xnorm": xnorm, **a, "h": h, "hnorm": hnorm, "act": m["act"], "mlp": m["mlp"], "out": h + m["mlp"]}


def head_weights_tied_anyway(weights_dir, meta):
    return ORIG_HEAD_WEIGHTS(weights_dir, {**meta, "tie_word_embeddings": True})


ALL_NODES = {"xnorm", "q", "k", "v", "probs", "attn", "h", "hnorm", "act", "mlp", "out"}
# name -> (variant, module, function, buggy twin, nodes that must FAIL in every layer, head checks that must FAIL)
# (in layer mode the head starts from the captured last layer output: only its own mistakes show there)
BUGS = {
    "gate_up_swapped": ("llama32", mlp, "swiglu_mlp", swiglu_gate_up_swapped, {"act", "mlp", "out"}, set()),
    "gelu_for_silu": ("llama32", mlp, "ACTIVATIONS", {"silu": gelu_tanh}, {"act", "mlp", "out"}, set()),
    "norm_one_plus_w": ("llama32", norm, "rms_norm", rms_norm_one_plus_w, ALL_NODES, {"norm", "logits"}),
    "residual_skipped": ("llama32", forward, "decoder_layer", decoder_layer_without_residual,
                         {"h", "hnorm", "act", "mlp", "out"}, set()),
    "embedding_as_untied_head": ("untied", offline_files, "read_head_weights", head_weights_tied_anyway, set(),
                                 {"logits"}),
}


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_mistake_fails(pipeline, tmp_path, monkeypatch, bug):
    variant, module, name, twin, must_fail, head_fails = BUGS[bug]
    model, weights, acts = pipeline(variant)
    monkeypatch.setattr(module, name, twin)
    code, report = step4(model, weights, acts, tmp_path / "layer")
    assert code == 1 and not report["pass"]
    assert failing(report) == {**{node: [0, 1, 2] for node in must_fail}, **{k: ["head"] for k in head_fails}}
    rels = [report["layers"][layer][node]["max_rel"] for layer in report["layers"] for node in must_fail]
    rels += [report["head"][k]["max_rel"] for k in head_fails]
    assert min(rels) > 100 * RTOL, rels  # not a near miss: far outside the tolerance

    code, report = step4(model, weights, acts, tmp_path / "chain", "--mode", "chain")
    assert code == 1 and not report["pass"] and report["logits"]["max_rel"] > 100 * CHAIN_RTOL, report["verdict"]


def test_one_wrong_logit_fails_the_head_in_layer_mode(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    bad = tmp_path / "x"
    shutil.copytree(acts, bad)
    logits = read_csv(bad / layout.REF_LOGITS)
    mask = read_csv(bad / layout.ATTENTION_MASK).reshape(-1) > 0
    row = int(np.flatnonzero(mask)[0])
    logits[row, 7] += 1e-3 * np.abs(logits[mask]).max()
    np.savetxt(bad / layout.REF_LOGITS, logits, delimiter=",", fmt="%.9g")
    code, report = step4(model, weights, bad, tmp_path / "out", "--no-verify-hashes")  # the numbers, not the sha256
    assert code == 1 and failing(report) == {"logits": ["head"]}
    assert report["head"]["logits"]["worst_row"] == row and report["head"]["logits"]["worst_col"] == 7


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------

def test_missing_weights_name_the_step_1_command(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    partial = tmp_path / "weights"
    shutil.copytree(weights, partial)
    (partial / "model.layers.1.mlp.up_proj.weight.csv").unlink()
    r = run_script("4_offline_forward.py", "--acts-dir", acts, "--weights-dir", partial, "--out-dir", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "model.layers.1.mlp.up_proj.weight.csv is missing" in r.stderr
    assert f"run python 1_model_weights.py --model-dir {model} --out-dir {partial}\n" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match=re.escape(r"--filter '^(model\.layers\.(1)\.)'")):
        offline.main(["--acts-dir", str(acts), "--weights-dir", str(partial), "--layers", "1"])
    (partial / layout.weight_file(layout.EMBEDDING)).unlink()
    with pytest.raises(InputError, match=re.escape(
            r"--filter '^(model\.layers\.(2)\.|model\.norm\.|model\.embed_tokens\.)'")):
        offline.main(["--acts-dir", str(acts), "--weights-dir", str(partial), "--layers", "2"])


@pytest.mark.parametrize("key, value, message", [
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("norm_class", "GemmaRMSNorm", "the model's norm is 'GemmaRMSNorm'"),
    ("num_layers", None, "lacks num_layers"),
])
def test_what_the_math_does_not_implement_is_an_error(pipeline, tmp_path, key, value, message):
    model, weights, acts = pipeline("llama32")
    bad = tmp_path / "x"
    shutil.copytree(acts, bad)
    meta = json.loads((bad / layout.META_MODEL).read_text())
    meta = {k: v for k, v in meta.items() if k != key} if value is None else {**meta, key: value}
    (bad / layout.META_MODEL).write_text(json.dumps(meta))
    with pytest.raises(InputError, match=re.escape(message)):
        step4(model, weights, bad, tmp_path / "out", "--no-verify-hashes")
    assert not (tmp_path / "out").exists()


def test_chain_mode_needs_every_layer_and_the_logits(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    with pytest.raises(InputError, match="chain mode runs every layer"):
        step4(model, weights, acts, tmp_path / "out", "--mode", "chain", "--layers", "1")
    no_logits = capture(model, tmp_path / "x", "--logits", "none")
    with pytest.raises(InputError, match="ref_logits.csv is missing.*--logits"):
        step4(model, weights, no_logits, tmp_path / "out", "--mode", "chain")
    with pytest.raises(InputError, match="meta_model.json is missing: run: python 2_get_x.py"):
        offline.main(["--acts-dir", str(weights), "--weights-dir", str(weights)])


# --- the demo model ---------------------------------------------------------------------------------

def test_demo_model_layers_and_head(demo_model, tmp_path):
    """Layers 0 and 29 and the head of SmolLM2-135M: every node passes, and the model says " Paris"."""
    weights = export_weights(demo_model, tmp_path / "weights", "--filter",
                             r"^(model\.layers\.(0|29)\.|model\.norm\.|model\.embed_tokens\.)")
    acts = capture(demo_model, tmp_path / "x", "--layers", "0,29", "--logits", "last",
                   prompts=["The capital of France is"])
    code, report = step4(demo_model, weights, acts, tmp_path / "out")
    assert code == 0 and report["pass"], failing(report)
    assert sorted(map(int, report["layers"])) == [0, 29] and max(worst_rel(report).values()) <= RTOL
    top = report["top_tokens"][0]
    assert top["model"][0]["text"] == top["offline"][0]["text"] == '" Paris"' and top["topk_same_set"]


def test_the_head_is_read_in_blocks(pipeline, tmp_path, monkeypatch):
    """Blocks of 7 vocabulary rows give the logits of one read; a short head file is an error."""
    model, weights, acts = pipeline("untied")
    step4(model, weights, acts, tmp_path / "whole", "--layers", "2")
    monkeypatch.setattr(offline_files, "HEAD_BLOCK_VALUES", 7 * 64)
    code, report = step4(model, weights, acts, tmp_path / "blocks", "--layers", "2")
    assert code == 0 and report["head"]["logits"]["pass"]
    whole, blocks = (read_csv(tmp_path / d / layout.LOGITS) for d in ("whole", "blocks"))
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-6 * np.abs(whole).max())

    short = tmp_path / "weights"
    shutil.copytree(weights, short)
    head = short / layout.weight_file(layout.LM_HEAD)
    head.write_bytes(b"".join(head.read_bytes().splitlines(keepends=True)[:-3]))
    with pytest.raises(InputError, match=re.escape(f"{head} has shape (317, 64), expected (320, 64)")):
        step4(model, short, acts, tmp_path / "short", "--layers", "2", "--no-verify-hashes")


def test_step_4_never_imports_transformers_or_torch(pipeline, tmp_path):
    """Step 4 is a numpy-only process: transformers never, and torch never once common.files.csv_io is free of it."""
    model, weights, acts = pipeline("llama32")
    wrapper = ("import runpy, sys\n"
               f"sys.argv = ['4_offline_forward.py', '--weights-dir', {str(weights)!r}, '--acts-dir', {str(acts)!r}, "
               f"'--out-dir', {str(tmp_path / 'o')!r}, '--mode', 'chain']\n"
               "try:\n    runpy.run_path('4_offline_forward.py', run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code\n"
               "print('exit', code, 'transformers', 'transformers' in sys.modules, 'torch', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT)
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("exit 0 transformers False torch "), r.stdout[-2000:] + r.stderr[-2000:]
    probe = "import sys, common.files.csv_io; print('torch' in sys.modules)"
    csv_io_needs_torch = subprocess.run([sys.executable, "-c", probe],
                                        capture_output=True, text=True, cwd=ROOT).stdout.strip() == "True"
    assert last.endswith("torch True" if csv_io_needs_torch else "torch False"), last


def test_never_writes_into_what_it_reads(pipeline, tmp_path):
    model, weights, acts = pipeline("llama32")
    before = sorted(p.name for p in acts.iterdir())
    with pytest.raises(InputError, match="input folder"):
        step4(model, weights, acts, acts)
    with pytest.raises(InputError, match="finite number"):
        step4(model, weights, acts, tmp_path / "o", "--chain-rtol", "nan")
    assert sorted(p.name for p in acts.iterdir()) == before and not (tmp_path / "o").exists()
