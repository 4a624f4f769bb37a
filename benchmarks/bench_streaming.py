"""Benchmark: 2_get_x.py --streaming vs the full-model capture, peak RSS and time, on Llama-3.2-1B's shape.

    python benchmarks/bench_streaming.py            # run it alone: flock /tmp/llama-xray-bench.lock ...

Builds (once, ~1 min, ~8 GB RAM while building) a random model with exactly
meta-llama/Llama-3.2-1B-Instruct's config.json (bf16 shards, tied, 128256 vocab; the tokenizer is
the tiny test one, whose ids are all valid rows) in outputs/bench_models/, then captures one prompt
both ways, each in its own process so that each peak RSS is its own. Goal (issue 6): streaming
peak RSS under 1/3 of the full-model path's, at no more than 1.5x its time.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import paths  # noqa: E402
from memory import peak_rss_mb  # noqa: E402

MODEL_DIR = paths.OUTPUTS / "bench_models" / "llama-3.2-1b-random"
PROMPT = "The capital of France is"
REPEATS = 1  # runs of each path, alternating; the best time and the largest RSS are reported
RSS_GOAL = 1 / 3  # streaming peak RSS / full peak RSS must be below this
TIME_GOAL = 1.5  # streaming time / full time must be at most this


def build_model(model_dir: Path) -> None:
    import model_factory

    print(f"building a random Llama-3.2-1B-shaped model in {model_dir} ...", flush=True)
    model_factory.build_model(model_dir, config=model_factory.LLAMA_3_2_1B, max_shard_size="2GB")
    (model_dir / ".complete").write_text("")


def child(mode: str, model_dir: Path, out_dir: Path) -> None:
    """One capture in this process; print its time and this process's peak RSS as JSON."""
    spec = importlib.util.spec_from_file_location("get_x", ROOT / "2_get_x.py")
    get_x = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(get_x)
    import torch  # noqa: F401  (imported before timing: both paths pay the same import)
    import transformers  # noqa: F401

    argv = ["--model-dir", str(model_dir), "--out-dir", str(out_dir), "--prompt", PROMPT, "--device", "cpu"]
    t0 = time.perf_counter()
    get_x.main(argv + (["--streaming"] if mode == "streaming" else []))
    seconds = time.perf_counter() - t0
    rss_mb = peak_rss_mb()
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mb": rss_mb}))


def measure(mode: str, model_dir: Path, out_dir: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir),
                        "--out-dir", str(out_dir)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{mode} capture failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--child", choices=("full", "streaming"), help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.out_dir)
        return 0
    if args.build:
        build_model(MODEL_DIR)
        return 0

    if args.model_dir == MODEL_DIR and not (MODEL_DIR / ".complete").is_file():
        # in its own process, so this one stays small while the captures run
        subprocess.run([sys.executable, __file__, "--build"], check=True, cwd=ROOT)
    out = paths.OUTPUTS / "bench_models" / "x"
    runs: dict[str, list[dict]] = {"full": [], "streaming": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(measure(mode, args.model_dir, out / mode))
            print(f"  {mode:<9} {runs[mode][-1]['seconds']:7.2f} s  peak RSS {runs[mode][-1]['peak_rss_mb']:8.0f} MB")
    same = all(
        (out / "full" / f).read_bytes() == (out / "streaming" / f).read_bytes()
        for f in (p.name for p in (out / "full").glob("*.csv")))
    t = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
    rss = {m: max(r["peak_rss_mb"] for r in rs) for m, rs in runs.items()}
    rss_ratio, time_ratio = rss["streaming"] / rss["full"], t["streaming"] / t["full"]
    print(f"streaming / full: peak RSS {rss_ratio:.3f} (goal < {RSS_GOAL:.3f}), "
          f"time {time_ratio:.2f}x (goal <= {TIME_GOAL}x); CSVs identical: {same}")
    ok = rss_ratio < RSS_GOAL and time_ratio <= TIME_GOAL and same
    print("goal met" if ok else "goal MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
