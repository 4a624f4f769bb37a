"""Benchmark: step 1 --quant against step 1's float export of the same model, side by side.

    .venv/bin/python benchmarks/bench_quant_export.py               # the demo model, w8a8, ~2 min
    .venv/bin/python benchmarks/bench_quant_export.py --scheme w4a8-g32 --repeats 3
    .venv/bin/python benchmarks/bench_quant_export.py --check-all   # + every tensor against torchao

Each run is `1_model_weights.py` as a user runs it (a child process, fresh OUT_DIR, --force),
float export and --quant alternated, best of REPEATS each: the machine is shared, the best run is
what the code can do. Goal (issue 19): --quant at most GOAL x the float export's time (it writes the
seven linears of every layer as integers + scales instead of floats, and every other tensor as floats).
--check-all: every quantized weight of the model against torchao's qdata and scale (np.array_equal),
which the test suite does for the tiny models and two layers of the demo model.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import paths  # noqa: E402
from steps import ensure_demo_model, run  # noqa: E402

GOAL = 1.2
REPEATS = 3


def timed_export(model_dir: Path, out_dir: Path, *extra: str) -> float:
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    run("1_model_weights.py", "--model-dir", str(model_dir), "--out-dir", str(out_dir), "--force", *extra)
    return time.perf_counter() - t0


def check_all(model_dir: Path, scheme_name: str) -> None:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from common.model.quant import apply_scheme, torchao_qdata
    from common.quant.quantize import quantize_weight
    from common.quant.schemes import get_scheme
    scheme = get_scheme(scheme_name)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    floats = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    names = apply_scheme(model, scheme)
    t_torchao = time.perf_counter() - t0
    t0 = time.perf_counter()
    equal = sum(np.array_equal(q, tq) and np.array_equal(s, ts)
                for (q, s), (tq, ts) in ((quantize_weight(floats[n], scheme), pair)
                                         for n, pair in torchao_qdata(model, names).items()))
    t_numpy = time.perf_counter() - t0
    print(f"{scheme_name}: {equal}/{len(names)} weights bit-identical to torchao's qdata and scale "
          f"(torchao quantize_ {t_torchao:.1f} s, numpy {t_numpy:.1f} s)")
    if equal != len(names):
        sys.exit(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=paths.DEMO_MODEL_DIR)
    p.add_argument("--scheme", default="w8a8")
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--check-all", action="store_true")
    args = p.parse_args()
    if args.model_dir == paths.DEMO_MODEL_DIR:
        ensure_demo_model(args.model_dir)
    floats, quants = [], []
    with tempfile.TemporaryDirectory(dir=paths.OUTPUTS) as tmp:
        for _ in range(args.repeats):
            floats.append(timed_export(args.model_dir, Path(tmp) / "float"))
            quants.append(timed_export(args.model_dir, Path(tmp) / "quant", "--quant", args.scheme))
    ratio = min(quants) / min(floats)
    print(f"step 1 on {args.model_dir.name}, best of {args.repeats}: float export {min(floats):.2f} s, "
          f"--quant {args.scheme} {min(quants):.2f} s: {ratio:.2f}x (goal <= {GOAL}x) "
          f"{'PASS' if ratio <= GOAL else 'MISS'}")
    if args.check_all:
        check_all(args.model_dir, args.scheme)
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
