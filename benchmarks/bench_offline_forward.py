"""Benchmark: 4_offline_forward.py (and step 2 with every node on), as ratios against baselines run side by side.

    python benchmarks/bench_offline_forward.py      # run it alone: flock /tmp/llama-xray-bench.lock ...

Three goals (issue 11):
  1. layer mode on every layer of the demo model takes at most 1.5x a process that only reads the
     same CSV files (common.files.csv_io.read_csv, nothing else);
  2. chain mode on a random Llama-3.2-1B-shaped model holds one layer's weights at a time: its peak
     RSS stays below 3x the largest layer's float32 weights plus the float32 embedding;
  3. step 2 with every node on (layer refs, attention probabilities, logits) costs at most 1.5x
     step 2 as it was (x, xnorm, ref_q/k/v/attn only) on that model.
The 1B-shaped model has exactly Llama-3.2-1B's config.json (d 2048, 32/8 heads, I 8192, vocab
128256, tied) but only NUM_LAYERS decoder layers, so that exporting it as CSV (~4.8 GB) and
reading it back stays feasible on a small shared machine; the per-layer sizes are the real ones.
Inputs are prepared once in outputs/bench_offline_forward/ (and outputs/bench_models/).
"""
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import paths  # noqa: E402
from common.files import layout  # noqa: E402
from steps import ensure_demo_model, run  # noqa: E402

DEMO_DIR = paths.DEMO_MODEL_DIR
WORK_DIR = paths.OUTPUTS / "bench_offline_forward"
BIG_DIR = paths.OUTPUTS / "bench_models" / "llama-3.2-1b-2layers-random"
NUM_LAYERS = 2  # decoder layers of the 1B-shaped model (the real one has 16)
PROMPT = "The capital of France is"
REPEATS = 3  # demo runs of each, alternating; medians reported
TIME_GOAL = 1.5  # step 4 layer mode / read-only; step 2 every node / step 2 as it was
RSS_GOAL = 3.0  # chain peak RSS < RSS_GOAL x largest layer (fp32) + embedding (fp32)

# The baseline: read exactly the CSV files step 4's layer mode reads, nothing else.
READ_ONLY = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common.files import layout
from common.files.csv_io import read_csv
acts, weights = Path(sys.argv[2]), Path(sys.argv[3])
t0 = time.perf_counter()
meta = json.loads((acts / layout.META_MODEL).read_text())
files = [acts / layout.ATTENTION_MASK, acts / layout.POSITION_IDS]
for n in range(meta["num_layers"]):
    files.append(acts / layout.layer_file("x", n))
    files.append(acts / layout.layer_file("xnorm", n))
    files += [acts / layout.ref_file(s, n) for s in ("q", "k", "v", "probs", "attn", "h", "hnorm", "act", "mlp", "out")]
    files += layout.layer_weight_files(weights, n, meta["attention_bias"], meta["mlp_bias"]).values()
files += [acts / layout.REF_NORM, acts / layout.REF_LOGITS]
files += layout.head_weight_files(weights, meta["tie_word_embeddings"]).values()
nbytes = sum(f.stat().st_size for f in files)
for f in files:
    read_csv(f)
print(json.dumps({"read_s": time.perf_counter() - t0, "files": len(files), "bytes": nbytes}))
"""

# Step 4 or step 2 in this child process; prints its wall time and peak RSS as JSON.
CHILD = r"""
import importlib.util, json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
from memory import peak_rss_mb
spec = importlib.util.spec_from_file_location("step", sys.argv[2])
step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step)
t0 = time.perf_counter()
code = step.main(sys.argv[3:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}))
"""


def child(script: str, *argv: str) -> dict:
    return json.loads(run("-c", CHILD, str(ROOT), str(ROOT / script), *argv).stdout.strip().splitlines()[-1])


def prepare_demo() -> tuple[Path, Path]:
    weights, acts = WORK_DIR / "demo_weights", WORK_DIR / "demo_x"
    ensure_demo_model(DEMO_DIR)
    if not (WORK_DIR / ".demo_prepared").is_file() or not (acts / layout.MANIFEST).is_file():  # older: no manifest
        print(f"preparing the demo model's step 1 (every tensor) and step 2 outputs in {WORK_DIR} ...", flush=True)
        run("1_model_weights.py", "--model-dir", str(DEMO_DIR), "--out-dir", str(weights))
        run("2_get_x.py", "--model-dir", str(DEMO_DIR), "--out-dir", str(acts), "--chat")
        (WORK_DIR / ".demo_prepared").write_text("")
    return weights, acts


def prepare_big() -> Path:
    weights = WORK_DIR / "big_weights"
    if not (BIG_DIR / ".complete").is_file():
        import model_factory
        print(f"building a random Llama-3.2-1B-shaped model with {NUM_LAYERS} layers in {BIG_DIR} ...", flush=True)
        config = {**model_factory.LLAMA_3_2_1B, "num_hidden_layers": NUM_LAYERS}
        model_factory.build_model(BIG_DIR, config=config, max_shard_size="2GB")
        (BIG_DIR / ".complete").write_text("")
    if not (WORK_DIR / ".big_prepared").is_file():
        print(f"exporting it as CSV (~4.8 GB) to {weights} ...", flush=True)
        run("1_model_weights.py", "--model-dir", str(BIG_DIR), "--out-dir", str(weights))
        (WORK_DIR / ".big_prepared").write_text("")
    return weights


def bench_layer_mode() -> bool:
    weights, acts = prepare_demo()
    out = WORK_DIR / "demo_forward"
    step4, read_only = [], []
    for _ in range(REPEATS):  # alternate, so a busy moment of the machine hits both alike
        t0 = time.perf_counter()
        run("4_offline_forward.py", "--model-dir", str(DEMO_DIR), "--weights-dir", str(weights),
            "--acts-dir", str(acts), "--out-dir", str(out))
        step4.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        info = json.loads(run("-c", READ_ONLY, str(ROOT), str(acts), str(weights)).stdout)
        read_only.append(time.perf_counter() - t0)
    report = json.loads((out / layout.REPORT_JSON).read_text())
    s4, ro = statistics.median(step4), statistics.median(read_only)
    ok = report["pass"] and s4 / ro <= TIME_GOAL
    print(f"1. 4_offline_forward.py layer mode, demo model, {len(report['layers'])} layers + head "
          f"({info['files']} CSV files, {info['bytes'] / 1e6:.0f} MB), median of {REPEATS}: "
          f"{'PASS' if report['pass'] else 'FAIL'}")
    print(f"   step 4 (whole process)           {s4:7.2f} s")
    print(f"   a process that only reads them   {ro:7.2f} s")
    print(f"   ratio {s4 / ro:.2f}x (goal <= {TIME_GOAL}x): {'met' if ok else 'MISSED'}")
    return ok


def layer_bytes(config: dict) -> int:
    """float32 bytes of one decoder layer's weights (norms, attention, MLP, biases when present)."""
    d, H, Hkv, I = (config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                          "intermediate_size"))
    Dh = config.get("head_dim") or d // H
    return 4 * (2 * d + 2 * d * H * Dh + 2 * d * Hkv * Dh + 3 * d * I)


def bench_big() -> bool:
    weights = prepare_big()
    config = json.loads((BIG_DIR / "config.json").read_text())
    acts_all, acts_old = WORK_DIR / "big_x_every_node", WORK_DIR / "big_x_as_it_was"
    common = ["--model-dir", str(BIG_DIR), "--prompt", PROMPT, "--device", "cpu"]
    as_it_was = ["--no-save-layer-refs", "--no-save-attn-probs", "--logits", "none"]
    every, old = [], []
    for _ in range(REPEATS):
        every.append(child("2_get_x.py", *common, "--out-dir", str(acts_all)))
        old.append(child("2_get_x.py", *common, "--out-dir", str(acts_old), *as_it_was))
    t_every, t_old = statistics.median(r["seconds"] for r in every), statistics.median(r["seconds"] for r in old)
    ok2 = t_every / t_old <= TIME_GOAL

    out = WORK_DIR / "big_chain"
    shutil.rmtree(out, ignore_errors=True)
    chain = child("4_offline_forward.py", "--model-dir", str(BIG_DIR), "--weights-dir", str(weights),
                  "--acts-dir", str(acts_all), "--out-dir", str(out), "--mode", "chain")
    report = json.loads((out / layout.REPORT_JSON).read_text())
    layer_mb, embed_mb = layer_bytes(config) / 2**20, 4 * config["vocab_size"] * config["hidden_size"] / 2**20
    goal_mb = RSS_GOAL * layer_mb + embed_mb
    ok3 = report["pass"] and chain["peak_rss_mb"] < goal_mb
    print(f"2. 4_offline_forward.py chain mode, random Llama-3.2-1B shape with {NUM_LAYERS} layers "
          f"(one layer {layer_mb:.0f} MB fp32, embedding {embed_mb:.0f} MB fp32): {report['verdict']}")
    print(f"   {chain['seconds']:.1f} s, peak RSS {chain['peak_rss_mb']:.0f} MB "
          f"(goal < {RSS_GOAL:g} x {layer_mb:.0f} + {embed_mb:.0f} = {goal_mb:.0f} MB; the whole model in fp32 "
          f"would be {NUM_LAYERS * layer_mb + embed_mb:.0f} MB): {'met' if ok3 else 'MISSED'}")
    print(f"3. 2_get_x.py on that model, one prompt, median of {REPEATS}: every node {t_every:.2f} s, "
          f"as it was (x, xnorm, q/k/v/attn) {t_old:.2f} s, ratio {t_every / t_old:.2f}x "
          f"(goal <= {TIME_GOAL}x): {'met' if ok2 else 'MISSED'}")
    return ok2 and ok3


def main() -> int:
    ok = bench_layer_mode()
    ok = bench_big() and ok
    print("goals met" if ok else "goal MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
