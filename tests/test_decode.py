"""Decode steps (--generate N): step 2 captures greedy decode through the model's KV cache, steps 3
and 4 verify every step over a cache of their own recomputed K and V.

The greedy tokens equal model.generate(do_sample=False) on a padded batch of two prompts of
different lengths; every decode step of every layer passes; and the check has teeth: a cache that
misses the newest key, or positions that restart at 0, FAIL.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, prepared_once, run_script, step2
from model_factory import VARIANTS

from common.check import decode
from common.cli import InputError
from common.files import layout
from common.files.csv_io import read_csv
from common.llama import attention, kv_cache

LONG = "The capital of France is Paris. The capital of Italy is"
SHORT = "Hello world"
STEPS = 4
RTOL = 1e-5

get_x = load_script("2_get_x.py")
offline_qkv = load_script("3_offline_qkv.py")
model_weights = load_script("1_model_weights.py")


def capture(model_dir: Path, out_dir: Path, *args: str, prompts=(LONG, SHORT), steps: int = STEPS) -> Path:
    return step2(model_dir, out_dir, "--generate", str(steps), *args, prompts=prompts)


def export_weights(model_dir: Path, out_dir: Path, *args: str) -> Path:
    assert model_weights.main(["--model-dir", str(model_dir), "--out-dir", str(out_dir), *args]) == 0
    return out_dir


def generated(acts: Path, steps: int = STEPS) -> list[list[int]]:
    """Every greedy id step 2 recorded: the prefill's, then each step's (B, steps + 1)."""
    return json.loads((layout.decode_dir(acts, steps) / layout.TOKENS).read_text())["generated_ids"]


def model_generate(model_dir: Path, acts: Path, new_tokens: int, dtype=torch.float32) -> list[list[int]]:
    """transformers' own greedy generate() on the batch step 2 fed (ids and mask from its files)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager").eval()
    ids = torch.tensor(json.loads((acts / layout.TOKENS).read_text())["input_ids"])
    mask = torch.from_numpy(read_csv(acts / layout.ATTENTION_MASK)).long()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=0,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def step3(acts: Path, weights: Path, out: Path, *args: str) -> tuple[int, dict]:
    code = offline_qkv.main(["--acts-dir", str(acts), "--weights-dir", str(weights), "--out-dir", str(out), *args])
    return code, json.loads((out / layout.REPORT_JSON).read_text())


def decode_failures(report: dict) -> dict[str, set[str]]:
    """step -> the quantities that FAIL in some layer of that step."""
    out: dict[str, set[str]] = {}
    for step, per_layer in report.get("decode", {}).items():
        for per in per_layer.values():
            out.setdefault(step, set()).update(q for q, m in per.items() if not m["pass"])
    return out


@pytest.fixture(scope="module")
def tiny(tiny_models, tmp_path_factory):
    """variant -> (model_dir, weights_dir, acts_dir): steps 1 and 2 (--generate 4) once per variant."""
    return prepared_once(tiny_models, tmp_path_factory.mktemp("decode"), export_weights, capture)


# --- step 2: the capture ---------------------------------------------------------------------------

def test_decode_files_and_their_shapes(tiny):
    model, _, acts = tiny("llama32")
    meta = json.loads((acts / layout.meta_file(0)).read_text())
    B, T, d, H, Hkv, Dh = (meta[k] for k in ("batch_size", "seq_len", "d_model", "num_heads", "num_kv_heads",
                                              "head_dim"))
    assert layout.decode_steps(acts) == [1, 2, 3, 4] and B == 2
    prefill_mask = read_csv(acts / layout.ATTENTION_MASK)
    last_pos = read_csv(acts / layout.POSITION_IDS)[:, -1]
    for s in range(1, STEPS + 1):
        folder = layout.decode_dir(acts, s)
        step_meta = json.loads((folder / layout.meta_file(2)).read_text())
        assert (step_meta["seq_len"], step_meta["cache_len"], step_meta["decode_step"]) == (1, T + s - 1, s)
        mask = read_csv(folder / layout.ATTENTION_MASK)
        assert mask.shape == (B, T + s) and (mask[:, :T] == prefill_mask).all() and (mask[:, T:] == 1).all()
        # Left padding: every prompt's last prefill position is its length - 1; each step adds one.
        assert (read_csv(folder / layout.POSITION_IDS)[:, 0] == last_pos + s).all()
        for stem, cols in (("x", d), ("xnorm", d), ("ref_q", H * Dh), ("ref_k", Hkv * Dh), ("ref_v", Hkv * Dh),
                           ("ref_attn", d), ("ref_out", d)):
            assert read_csv(folder / layout.layer_file(stem, 1)).shape == (B, cols), stem
        assert read_csv(folder / layout.ref_file("probs", 1)).shape == (B * H, T + s)
        assert read_csv(folder / layout.REF_LOGITS).shape == (B, meta_vocab(acts))
    tokens = json.loads((layout.decode_dir(acts, 1) / layout.TOKENS).read_text())
    assert tokens["input_ids"] == [[g[0]] for g in generated(acts)] and len(tokens["tokens"]) == B


def meta_vocab(acts: Path) -> int:
    return json.loads((acts / layout.META_MODEL).read_text())["vocab_size"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_equal_generate(tiny, variant):
    """Prefill + 4 decode steps give generate()'s 5 new tokens, on a left-padded batch of two lengths."""
    model, _, acts = tiny(variant)
    assert generated(acts) == model_generate(model, acts, STEPS + 1)


def test_demo_model(demo_model, tmp_path):
    """SmolLM2-135M, two prompts of different lengths, 4 steps: generate()'s tokens, and layers 0 and 1 of
    every step verified by step 3."""
    weights = export_weights(demo_model, tmp_path / "w", "--filter",
                             r"^model\.layers\.(0|1)\.(input_layernorm|self_attn)\.")
    acts = capture(demo_model, tmp_path / "x", "--layers", "0,1", "--logits", "last",
                   prompts=("The capital of France is", "Give me a short list of three colours:"))
    ids = generated(acts)
    assert ids == model_generate(demo_model, acts, STEPS + 1)
    assert len({tuple(r) for r in ids}) == 2 and len(set(ids[0])) > 1  # real text, not one repeated id
    code, report = step3(acts, weights, tmp_path / "q")
    assert code == 0 and report["pass"] and sorted(report["decode"]) == [f"step_{s}" for s in range(1, 5)]
    assert max(m["max_rel"] for per in report["decode"].values() for q in per.values() for m in q.values()) <= RTOL


def test_rerun_with_fewer_steps_removes_the_others(tiny, tmp_path):
    model, _, _ = tiny("llama32")
    acts = capture(model, tmp_path / "x", steps=3)
    (layout.decode_dir(acts, 3) / "notes.txt").write_text("mine")
    capture(model, acts, steps=1)
    assert layout.decode_steps(acts) == [1, 3]
    assert [p.name for p in layout.decode_dir(acts, 3).iterdir()] == ["notes.txt"]  # only what step 2 wrote goes
    capture(model, acts, steps=0)
    assert layout.decode_steps(acts) == [3]


def test_bad_generate_flags(tiny, tmp_path):
    model, _, acts = tiny("llama32")
    T = json.loads((acts / layout.meta_file(0)).read_text())["seq_len"]
    r = run_script("2_get_x.py", "--model-dir", model, "--out-dir", tmp_path / "x", "--generate", "2", "--streaming")
    assert r.returncode == 2 and "--generate with --streaming" in r.stderr and len(r.stderr.splitlines()) == 1
    with pytest.raises(InputError, match="--generate -1"):
        get_x.main(["--model-dir", str(model), "--out-dir", str(tmp_path / "x"), "--generate", "-1"])
    with pytest.raises(InputError, match="max_position_embeddings"):  # room for the prompt, not for 3 more
        get_x.main(["--model-dir", str(model), "--out-dir", str(tmp_path / "x"), "--generate", "3",
                    "--position-offset", str(512 - T - 1), "--prompt", LONG, "--prompt", SHORT])
    assert not (tmp_path / "x").exists()


# --- step 3: every step over its own cache ---------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_step3_passes_every_decode_step(tiny, tmp_path, variant):
    _, weights, acts = tiny(variant)
    code, report = step3(acts, weights, tmp_path / "q")
    assert code == 0 and report["pass"], decode_failures(report)
    assert sorted(report["decode"]) == [f"step_{s}" for s in range(1, STEPS + 1)]
    assert all(sorted(per) == ["0", "1", "2"] for per in report["decode"].values())
    B = 2
    assert read_csv(layout.decode_dir(tmp_path / "q", STEPS) / layout.layer_file("k", 0)).shape[0] == B


@pytest.mark.parametrize("dropped", [-1, -2], ids=["own key", "previous token's key"])
def test_cache_missing_the_newest_key_fails(tiny, tmp_path, monkeypatch, dropped):
    """The query attends to the cache without its newest key (its own token's, or the token just before):
    every step FAILs, the prefill passes."""
    _, weights, acts = tiny("llama32")
    right = attention.with_cache

    def forgets_newest(past_kv, k, v, mask):
        k_all, v_all, mask = right(past_kv, k, v, mask)
        if past_kv is not None:
            mask = mask.copy()
            mask[:, dropped] = 0
        return k_all, v_all, mask
    monkeypatch.setattr(attention, "with_cache", forgets_newest)
    code, report = step3(acts, weights, tmp_path / "q")
    assert code == 1 and all(m["pass"] for per in report["layers"].values() for m in per.values())
    fails = decode_failures(report)
    assert sorted(fails) == [f"step_{s}" for s in range(1, STEPS + 1)]
    assert all({"probs", "attn"} <= f and not f & {"q", "k", "v"} for f in fails.values()), fails


def test_cache_that_never_grows_is_caught(tiny, tmp_path, monkeypatch):
    """A cache that keeps the prefill's K/V but never grows no longer fits the step's mask: an error, never a PASS."""
    _, weights, acts = tiny("llama32")
    monkeypatch.setattr(decode, "grow", lambda cache, k, v, B, Dh: cache if cache is not None
                        else (kv_cache.heads(k, B, Dh), kv_cache.heads(v, B, Dh)))
    with pytest.raises(ValueError, match="the mask covers"):  # T + S keys; the cache and the new row are T + 1
        step3(acts, weights, tmp_path / "q")


def test_positions_restarting_at_zero_fail(tiny, tmp_path, monkeypatch):
    _, weights, acts = tiny("llama32")
    monkeypatch.setattr(decode, "step_positions", lambda mask, offset: np.zeros((mask.shape[0], 1)))
    code, report = step3(acts, weights, tmp_path / "q")
    assert code == 1
    fails = decode_failures(report)
    assert sorted(fails) == [f"step_{s}" for s in range(1, STEPS + 1)]
    assert all({"q", "k"} <= f and "v" not in f for f in fails.values()), fails


def test_capture_that_restarts_positions_fails(tiny, tmp_path, monkeypatch):
    """A generation loop that feeds position 0 to every new token (the model runs it, step 2 records it):
    the tokens differ from generate()'s and step 3, computing positions as generate() does, FAILs."""
    model, weights, _ = tiny("llama32")
    from common.model import prompts
    right, calls = prompts.position_ids_from_mask, []

    def restarts(mask, offset=0):  # the first call is the prefill's (encode_prompts): right
        calls.append(1)
        return right(mask, offset) if len(calls) == 1 else torch.zeros_like(mask)
    monkeypatch.setattr(prompts, "position_ids_from_mask", restarts)
    acts = capture(model, tmp_path / "x", steps=2)
    monkeypatch.undo()
    assert (read_csv(layout.decode_dir(acts, 1) / layout.POSITION_IDS) == 0).all()
    code, report = step3(acts, weights, tmp_path / "q")
    assert code == 1 and {"q", "k"} <= decode_failures(report)["step_1"]


def test_bad_decode_folders(tiny, tmp_path):
    import shutil
    _, weights, acts = tiny("llama32")
    bad = tmp_path / "x"
    shutil.copytree(acts, bad)
    shutil.rmtree(layout.decode_dir(bad, 2))
    with pytest.raises(InputError, match=r"step_2/attention_mask.csv is listed in .*manifest.json but is gone"):
        step3(bad, weights, tmp_path / "q")  # step 2's manifest lists every decode file
    with pytest.raises(InputError, match=r"holds steps \[1, 3, 4\], not 1..3"):
        step3(bad, weights, tmp_path / "q", "--no-verify-hashes")
    shutil.rmtree(bad)
    shutil.copytree(acts, bad)
    tokens_path = layout.decode_dir(bad, 2) / layout.TOKENS
    tokens = json.loads(tokens_path.read_text())
    tokens["input_ids"] = [[i[0] + 1] for i in tokens["input_ids"]]
    tokens_path.write_text(json.dumps(tokens))
    with pytest.raises(InputError, match="step_2/tokens.json was modified after step 2 wrote it"):
        step3(bad, weights, tmp_path / "q")
    with pytest.raises(InputError, match="step_2/tokens.json: feeds"):
        step3(bad, weights, tmp_path / "q", "--no-verify-hashes")


# --- step 4: every node of every step, and the text generated offline -------------------------------

offline_forward = load_script("4_offline_forward.py")


def step4(acts: Path, weights: Path, out: Path, *args: str) -> tuple[int, dict]:
    code = offline_forward.main(["--acts-dir", str(acts), "--weights-dir", str(weights), "--out-dir", str(out),
                                 "--no-plots", *args])
    return code, json.loads((out / layout.REPORT_JSON).read_text())


@pytest.mark.parametrize("variant", ["llama32", "untied", "bias"])
def test_step4_layer_mode_passes_every_decode_step(tiny, tmp_path, variant):
    _, weights, acts = tiny(variant)
    code, report = step4(acts, weights, tmp_path / "f")
    assert code == 0 and report["pass"], decode_failures(report)
    assert sorted(report["decode"]) == [f"step_{s}" for s in range(1, STEPS + 1)]
    assert max(m["max_rel"] for per in report["decode"].values() for q in per.values() for m in q.values()) <= RTOL
    heads = report["decode_head"]
    assert all(h["greedy"]["pass"] and h["logits"]["max_rel"] <= RTOL for h in heads.values())
    assert read_csv(layout.decode_dir(tmp_path / "f", 2) / layout.layer_file("out", 1)).shape == (2, 64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step4_chain_generates_the_models_tokens(tiny, tmp_path, variant):
    _, weights, acts = tiny(variant)
    code, report = step4(acts, weights, tmp_path / "f", "--mode", "chain")
    assert code == 0 and report["pass"], report.get("decode")
    steps = report["decode"]
    assert sorted(steps) == [f"step_{s}" for s in range(1, STEPS + 1)]
    assert [steps[f"step_{s}"]["fed"]["offline"] for s in range(1, STEPS + 1)] == \
        [[g[s - 1] for g in generated(acts)] for s in range(1, STEPS + 1)]
    assert all(c["x0"]["max_abs"] == 0 and c["logits"]["max_rel"] <= 1e-4 for c in steps.values())
    assert "## Decode steps, generated offline" in (tmp_path / "f" / layout.REPORT_MD).read_text()


def test_step4_planted_mistakes_fail(tiny, tmp_path, monkeypatch):
    """Positions restarting at 0, and a cache without the newest key: both modes FAIL."""
    _, weights, acts = tiny("llama32")
    with monkeypatch.context() as m:
        m.setattr(decode, "step_positions", lambda mask, offset: np.zeros((mask.shape[0], 1)))
        code, report = step4(acts, weights, tmp_path / "layer", "--layers", "0")
        assert code == 1 and {"q", "k"} <= decode_failures(report)["step_1"]
        code, report = step4(acts, weights, tmp_path / "chain", "--mode", "chain")
        assert code == 1 and not report["pass"] and "FAIL" in report["verdict"]
    right = attention.with_cache

    def forgets_newest(past_kv, k, v, mask):
        k_all, v_all, mask = right(past_kv, k, v, mask)
        if past_kv is not None:
            mask = mask.copy()
            mask[:, -2] = 0
        return k_all, v_all, mask
    monkeypatch.setattr(attention, "with_cache", forgets_newest)
    code, report = step4(acts, weights, tmp_path / "chain2", "--mode", "chain")
    assert code == 1 and "decode steps generated offline differ" in report["verdict"]


def test_step4_chain_needs_the_embedding(tiny, tmp_path):
    import shutil
    _, weights, acts = tiny("untied")
    mine = tmp_path / "w"
    shutil.copytree(weights, mine)
    embedding = mine / layout.weight_file(layout.EMBEDDING)
    embedding.write_text(embedding.read_text().replace("1", "2", 1))  # one digit: below any tolerance
    with pytest.raises(InputError, match=r"embed_tokens.weight.csv was modified after step 1"):
        step4(acts, mine, tmp_path / "f", "--mode", "chain")
    embedding.unlink()
    with pytest.raises(InputError, match=r"embed_tokens.weight.csv is missing: chain mode looks up .* "
                                         r"--filter '\^model\\.embed_tokens\\.'"):
        step4(acts, mine, tmp_path / "f", "--mode", "chain")


def test_decode_tokens_that_are_not_ids(tiny, tmp_path):
    import shutil
    _, weights, acts = tiny("llama32")
    bad = tmp_path / "x"
    shutil.copytree(acts, bad)
    tokens_path = layout.decode_dir(bad, 1) / layout.TOKENS
    tokens = json.loads(tokens_path.read_text())
    tokens["input_ids"] = [["a"] for _ in tokens["input_ids"]]
    tokens_path.write_text(json.dumps(tokens))
    with pytest.raises(InputError, match="step_1/tokens.json: input_ids/next_ids are not 2 token ids"):
        step3(bad, weights, tmp_path / "q", "--no-verify-hashes")


@pytest.mark.parametrize("args", [("--padding-side", "right"), ("--position-offset", "400")],
                         ids=["right padding", "offset 400"])
def test_decode_steps_at_other_positions(tiny, tmp_path, args):
    """Right padding (the cache's padding sits between real tokens and the new ones) and positions K..:
    each new token at its prompt's last position + 1, every step passes."""
    model, weights, _ = tiny("llama32")
    acts = capture(model, tmp_path / "x", *args, steps=2)
    mask = read_csv(acts / layout.ATTENTION_MASK)
    last = read_csv(acts / layout.POSITION_IDS)[np.arange(2), mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)]
    assert (read_csv(layout.decode_dir(acts, 2) / layout.POSITION_IDS)[:, 0] == last + 2).all()
    code, report = step3(acts, weights, tmp_path / "q")
    assert code == 0 and sorted(report["decode"]) == ["step_1", "step_2"], decode_failures(report)
