"""Benchmark: step 3 on a 4096-token prompt with Llama-3.2-1B's attention shape runs in bounded memory.

    python benchmarks/bench_long_prompt.py          # run it alone: flock /tmp/llama-xray-bench.lock ...

Prepares (once) in outputs/bench_long_prompt/: a random model with exactly Llama-3.2-1B's attention
(hidden 2048, 32 query heads, 8 KV heads, head_dim 64, its RoPE) but LAYERS decoder layers and the
tiny test tokenizer's vocabulary (the vocabulary is not part of step 3), step 1's attention
projections, and step 2's capture of one prompt of T tokens. Then runs step 3 in its own process and
reads its peak RSS (VmHWM). The baseline is arithmetic: the full score tensor B x H x T x T float32
that an unblocked attention holds (2.1 GB here) before any of its softmax temporaries.
Goal: step 3's whole peak RSS <= 1/4 of that tensor alone, and step 3 PASSes (its results are the
model's to float32 rounding). Exit 1 if either is missed.
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import common.model  # noqa: E402,F401  (first: keeps torchao's import noise off the console)
from common import paths  # noqa: E402
from common.files import layout  # noqa: E402
from steps import run  # noqa: E402

WORK_DIR = paths.OUTPUTS / "bench_long_prompt"
T = 4096  # prompt tokens
LAYERS = 1  # decoder layers of the random model (each one is the same work again)
GOAL = 0.25  # step 3's peak RSS / the full score tensor's bytes

# Step 3 in-process, then its own peak resident set (the CSV workers are children, not counted: they
# hold chunks of text, never scores).
STEP_3 = r"""
import importlib.util, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
from memory import peak_rss_mb
spec = importlib.util.spec_from_file_location("offline_qkv", sys.argv[1] + "/3_offline_qkv.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
code = mod.main(sys.argv[2:])
print(json.dumps({"code": code, "peak_rss_mb": peak_rss_mb()}))
"""


def long_prompt(model_dir: Path) -> str:
    """Text of T tokens (with the BOS) with this tokenizer: whole words added until it is that long."""
    import model_factory
    from common.model.prompts import load_tokenizer

    tok = load_tokenizer(model_dir)
    words, text = " ".join(model_factory.CORPUS * (T // 10)).split(" "), ""
    for word in words:
        longer = f"{text} {word}" if text else word
        if len(tok(longer)["input_ids"]) > T:
            break
        text = longer
    while len(tok(text)["input_ids"]) < T:  # the last word overshot: single characters to fill
        text += "!"
    return text


def prepare() -> tuple[Path, Path, Path]:
    model, weights, acts = WORK_DIR / "model", WORK_DIR / layout.WEIGHTS, WORK_DIR / layout.ACTS
    norm = weights / layout.weight_file(layout.norm_weight_name(0, "input_layernorm"))  # older preparations lack it
    if not (WORK_DIR / ".prepared").is_file() or not (acts / layout.MANIFEST).is_file() or not norm.is_file():
        import model_factory

        print(f"preparing a {LAYERS}-layer Llama-3.2-1B-shaped model and a {T}-token capture in {WORK_DIR} ...",
              flush=True)
        config = {**model_factory.LLAMA_3_2_1B, "num_hidden_layers": LAYERS, "vocab_size": model_factory.TINY[
            "vocab_size"], "bos_token_id": 0, "eos_token_id": [1, 4], "tie_word_embeddings": True}
        model_factory.build_model(model, config=config, max_shard_size="2GB")
        run("1_model_weights.py", "--model-dir", str(model), "--out-dir", str(weights),
            "--filter", layout.ATTENTION_FILTER)  # what step 3 reads
        run("2_get_x.py", "--model-dir", str(model), "--out-dir", str(acts), "--prompt", long_prompt(model),
            "--no-save-layer-refs", "--logits", "none")  # step 3's files only: what is benchmarked
        (WORK_DIR / ".prepared").write_text("")
    return model, weights, acts


def main() -> int:
    model, weights, acts = prepare()
    meta = json.loads((acts / layout.meta_file(0)).read_text())
    B, T_got, H = meta["batch_size"], meta["seq_len"], meta["num_heads"]
    full_mb = B * H * T_got * T_got * 4 / 2**20
    t0 = time.perf_counter()
    r = run("-c", STEP_3, str(ROOT), "--model-dir", str(model), "--weights-dir", str(weights), "--acts-dir",
            str(acts), "--out-dir", str(WORK_DIR / layout.QKV), ok=(0, 1))  # 1: a FAIL, reported below
    seconds = time.perf_counter() - t0
    res = json.loads(r.stdout.strip().splitlines()[-1])
    report = json.loads((WORK_DIR / layout.QKV / layout.REPORT_JSON).read_text())
    from common.llama.attention import QUERY_BLOCK

    ratio = res["peak_rss_mb"] / full_mb
    if T_got != T:
        print(f"note: the prompt is {T_got} tokens, not {T}")
    print(f"3_offline_qkv.py, Llama-3.2-1B attention shape, {LAYERS} layer(s), B={B} T={T_got} H={H}, "
          f"QUERY_BLOCK {QUERY_BLOCK}: {'PASS' if report['pass'] else 'FAIL'} "
          f"(worst max_rel {report['worst']['max_rel']:.1e}), {seconds:.1f} s")
    print(f"  full score tensor B*H*T*T*4 (baseline)    {full_mb:8.0f} MB")
    print(f"  step 3 peak RSS, whole process            {res['peak_rss_mb']:8.0f} MB   "
          f"ratio {ratio:.2f} (goal <= {GOAL})")
    ok = report["pass"] and res["code"] == 0 and ratio <= GOAL
    if not ok:
        print("GOAL MISSED" + ("" if report["pass"] else ": step 3 did not PASS"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
