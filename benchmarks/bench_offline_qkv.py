"""Benchmark: 3_offline_qkv.py on every layer of the demo model, and how much of it is reading CSV.

    python benchmarks/bench_offline_qkv.py          # run it alone: flock /tmp/llama-xray-bench.lock ...

Prepares (once) the demo model's inputs in outputs/bench_offline_qkv/: step 1 (the 30 layers'
q/k/v/o_proj, ~300 MB of CSV) and step 2 (one chat prompt, 35 tokens). Then runs step 3 REPEATS
times as a user does (its own process), and side by side the baseline: a process that only reads
the same CSV files with common.files.csv_io.read_csv and does nothing else. Reports the median wall time
of each, the phases of step 3's loop timed here (PHASES: the same common/ calls step 3 makes,
read CSV / compute / write CSV) and the ratios: step 3 / read-only, and the share of step 3 spent
reading CSV.

Also step 3 with --no-verify-hashes, alternated with the default run: the cost of checking every
input's sha256 against the manifests of steps 1 and 2, as step 3 times it itself (its "input files:"
line) and as the difference of the two medians. Exits 1 when that check takes more than
HASH_SHARE_GOAL of step 3's time.
"""
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from common import paths  # noqa: E402
from common.files import layout  # noqa: E402
from steps import ensure_demo_model, run  # noqa: E402

MODEL_DIR = paths.DEMO_MODEL_DIR
WORK_DIR = paths.OUTPUTS / "bench_offline_qkv"
REPEATS = 3
HASH_SHARE_GOAL = 0.15  # the sha256 check (~1.2-1.9 GB/s) must stay a small share of step 3's wall time

# The baseline: read exactly the files step 3 reads, nothing else (same imports, same reader).
READ_ONLY = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common.files import layout
from common.files.csv_io import read_csv
acts, weights = Path(sys.argv[2]), Path(sys.argv[3])
t0 = time.perf_counter()
files = [acts / layout.ATTENTION_MASK, acts / layout.POSITION_IDS]
for n in layout.step2_layers(acts):
    meta = json.loads((acts / layout.meta_file(n)).read_text())
    files += [acts / layout.layer_file("x", n), acts / layout.layer_file("xnorm", n)]
    files += [acts / layout.ref_file(q, n) for q in ("q", "k", "v", "probs", "attn")]
    files += layout.qkv_weight_files(weights, n, meta["attention_bias"]).values()
nbytes = sum(f.stat().st_size for f in files)
for f in files:
    read_csv(f)
print(json.dumps({"read_s": time.perf_counter() - t0, "files": len(files), "bytes": nbytes}))
"""

# Step 3's loop, phase by phase: the same common/ calls 3_offline_qkv.py makes, each timed.
PHASES = r"""
import json, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common.check import meta_check, offline
from common.files import layout
from common.llama import attention, norm
from common.llama.spec import LayerSpec
acts, weights = Path(sys.argv[2]), Path(sys.argv[3])
t = {"read_csv": 0.0, "compute": 0.0, "write_csv": 0.0}
t_start = time.perf_counter()
layers = layout.step2_layers(acts)
metas = meta_check.read_metas(acts, layers)
B, T = metas[layers[0]]["batch_size"], metas[layers[0]]["seq_len"]
with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    mask, position_ids, _ = offline.read_batch(acts, B, T)
    t["read_csv"] += time.perf_counter() - t0
    real_rows = mask.reshape(B * T) > 0
    real_probs = offline.real_prob_rows(mask, metas[layers[0]]["num_heads"])
    for n in layers:
        m = metas[n]
        t0 = time.perf_counter()
        x, w = offline.read_layer_input(acts, n, m), offline.read_attention_weights(weights, n, m)
        w_norm = offline.read_input_norm(weights, n, m)
        t["read_csv"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        xnorm = norm.rms_norm(x, w_norm, m["rms_norm_eps"])
        keep = offline.probs_to_keep(T, None)
        res = attention.attention_block(xnorm, w, LayerSpec.from_meta(m), position_ids, mask, keep_probs=keep)
        rows = offline.as_rows({"xnorm": xnorm, **res}, B * T, with_probs=keep == "all")
        t["compute"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        offline.write_outputs(Path(out), n, rows)
        t["write_csv"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        offline.verify(acts, n, rows, real_rows, real_probs, 1e-7, 1e-5)  # reads the references
        t["read_csv"] += time.perf_counter() - t0
t["total"] = time.perf_counter() - t_start
print(json.dumps(t))
"""


def prepare() -> tuple[Path, Path]:
    weights, acts = WORK_DIR / "weights", WORK_DIR / "x"
    ensure_demo_model(MODEL_DIR)
    if not (WORK_DIR / ".prepared").is_file() or not (acts / layout.MANIFEST).is_file():  # older: no manifest
        print(f"preparing step 1 and step 2 outputs in {WORK_DIR} ...", flush=True)
        run("1_model_weights.py", "--model-dir", str(MODEL_DIR), "--out-dir", str(weights),
            "--filter", layout.ATTENTION_FILTER)
        run("2_get_x.py", "--model-dir", str(MODEL_DIR), "--out-dir", str(acts), "--chat")
        (WORK_DIR / ".prepared").write_text("")
    return weights, acts


def main() -> int:
    weights, acts = prepare()
    out = WORK_DIR / "qkv"
    step3, unverified, hash_s, read_only, phases = [], [], [], [], []
    for _ in range(REPEATS):  # alternate, so a busy moment of the machine hits both alike
        t0 = time.perf_counter()
        r = run("3_offline_qkv.py", "--model-dir", str(MODEL_DIR), "--weights-dir", str(weights),
                "--acts-dir", str(acts), "--out-dir", str(out))
        step3.append(time.perf_counter() - t0)
        hashed = re.search(r"^input files: the sha256 of all (\d+) input files \(([\d.]+) MB\) match .*\(([\d.]+) s\)$",
                           r.stdout, re.M)
        hash_s.append(float(hashed[3]))
        t0 = time.perf_counter()
        run("3_offline_qkv.py", "--model-dir", str(MODEL_DIR), "--weights-dir", str(weights),
            "--acts-dir", str(acts), "--out-dir", str(WORK_DIR / "qkv_unverified"), "--no-verify-hashes")
        unverified.append(time.perf_counter() - t0)
        phases.append(json.loads(run("-c", PHASES, str(ROOT), str(acts), str(weights)).stdout))
        t0 = time.perf_counter()
        info = json.loads(run("-c", READ_ONLY, str(ROOT), str(acts), str(weights)).stdout)
        read_only.append(time.perf_counter() - t0)

    report = json.loads((out / layout.REPORT_JSON).read_text())
    meta = json.loads((acts / layout.meta_file(0)).read_text())
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    s3, ro = statistics.median(step3), statistics.median(read_only)
    print(f"3_offline_qkv.py, demo model: {len(report['layers'])} layers, B={meta['batch_size']} "
          f"T={meta['seq_len']}, {info['files']} CSV files read, {info['bytes'] / 1e6:.0f} MB; "
          f"median of {REPEATS}; {'PASS' if report['pass'] else 'FAIL'}")
    print(f"  step 3, whole process (imports included)   {s3:7.2f} s")
    print(f"    its loop, timed phase by phase          {med['total']:7.2f} s")
    print(f"      reading CSV                           {med['read_csv']:7.2f} s  "
          f"({100 * med['read_csv'] / med['total']:.0f}% of the loop, {100 * med['read_csv'] / s3:.0f}% of the process)")
    print(f"      compute (norm, RoPE, attention, o_proj) {med['compute']:5.2f} s")
    print(f"      writing CSV (q, k, v, probs, attn)    {med['write_csv']:7.2f} s")
    print(f"  baseline: a process that only reads them  {ro:7.2f} s")
    print(f"  ratio step 3 / read-only baseline         {s3 / ro:7.2f}x")
    hs, s3_unverified = statistics.median(hash_s), statistics.median(unverified)
    share = hs / s3
    print(f"  sha256 of its {hashed[1]} input files ({float(hashed[2]):.0f} MB), timed by step 3  {hs:7.2f} s  "
          f"({float(hashed[2]) / 1e3 / hs:.2f} GB/s; {100 * share:.1f}% of step 3, goal <= {100 * HASH_SHARE_GOAL:.0f}%)")
    print(f"  step 3 --no-verify-hashes                 {s3_unverified:7.2f} s  "
          f"(difference of the medians {s3 - s3_unverified:+.2f} s, ratio {s3 / s3_unverified:.3f}x)")
    if share > HASH_SHARE_GOAL:
        print(f"MISSED: the hash check took {100 * share:.1f}% of step 3 (goal {100 * HASH_SHARE_GOAL:.0f}%)")
    return 0 if report["pass"] and share <= HASH_SHARE_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
