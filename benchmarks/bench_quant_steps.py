"""Benchmark: steps 3 and 4 on a w8a8 capture of the demo model vs the same steps on its float capture.

    python benchmarks/bench_quant_steps.py      # run it alone: flock /tmp/llama-xray-bench.lock ...

Goal (issue 19): step 3 and step 4 (layer mode, every layer) on the torchao-quantized model's w8a8
capture take at most 1.3x their time on the float32 capture of the same prompt, in the same run:
the integer matmul is float64 BLAS (common/quant/intmm.py), not a numpy integer loop, and the
integer files (xq, xscale, acc of every linear) are written besides. Runs alternate, medians reported.
Inputs are prepared once in outputs/bench_quant_steps/.
"""
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import paths  # noqa: E402
from steps import ensure_demo_model, run  # noqa: E402

DEMO_DIR = paths.DEMO_MODEL_DIR
WORK_DIR = paths.OUTPUTS / "bench_quant_steps"
PROMPT = "The capital of France is"
SCHEME = "w8a8"
REPEATS = 3  # runs of each, alternating; medians reported
TIME_GOAL = 1.3  # quantized / float, per step


def prepare() -> dict[str, tuple[Path, Path]]:
    """kind ("float" | SCHEME) -> (weights dir, acts dir), made once."""
    ensure_demo_model(DEMO_DIR)
    folders = {}
    for kind, quant in (("float", []), (SCHEME, ["--quant", SCHEME])):
        weights, acts = WORK_DIR / f"weights-{kind}", WORK_DIR / f"x-{kind}"
        done = WORK_DIR / f".prepared-{kind}"
        if not done.is_file():
            print(f"preparing the demo model's {kind} step 1 and step 2 outputs in {WORK_DIR} ...", flush=True)
            run("1_model_weights.py", "--model-dir", str(DEMO_DIR), "--out-dir", str(weights), *quant)
            run("2_get_x.py", "--model-dir", str(DEMO_DIR), "--out-dir", str(acts), "--prompt", PROMPT, *quant)
            done.write_text("")
        folders[kind] = weights, acts
    return folders


def main() -> int:
    folders = prepare()
    steps = {"step 3": ("3_offline_qkv.py",), "step 4 layer": ("4_offline_forward.py", "--no-plots")}
    ok = True
    for name, (script, *extra) in steps.items():
        times = {kind: [] for kind in folders}
        for _ in range(REPEATS):  # alternate, so a busy moment of the machine hits both alike
            for kind, (weights, acts) in folders.items():
                t0 = time.perf_counter()
                run(script, "--weights-dir", str(weights), "--acts-dir", str(acts),
                    "--out-dir", str(WORK_DIR / f"{name.replace(' ', '_')}-{kind}"), *extra)
                times[kind].append(time.perf_counter() - t0)
        f, q = statistics.median(times["float"]), statistics.median(times[SCHEME])
        met = q <= TIME_GOAL * f
        ok = ok and met
        print(f"{name}: float32 {f:.2f} s, {SCHEME} {q:.2f} s (median of {REPEATS}, whole process): "
              f"{q / f:.2f}x, goal <= {TIME_GOAL}x: {'met' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
