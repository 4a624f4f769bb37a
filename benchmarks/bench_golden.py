"""Benchmark: 5_golden.py's writers against step 1's CSV writer and a plain write of the same bytes.

    python benchmarks/bench_golden.py          # run it alone: flock /tmp/llama-xray-bench.lock ...

One tensor of N_VALUES float32 (a (4096, 1024) activation-shaped matrix of random normals). For each
format (bin, hex, mem, npy, npz) and encoding (float32, Q16.16) it times what 5_golden.py does per
tensor once the CSV is read: encode, format, write atomically and hash (common/check/golden.py). Side by
side, alternating, REPEATS times: step 1's CSV writer on the same tensor (common/files/csv_io.write_csv,
every core), a plain open().write() of exactly the bytes the golden file holds (the disk's speed for
that file), and that plain write followed by the sha256 the manifest needs (on one core the hash runs
at about the speed of a page-cache write, so this is the floor for a hashed file).
Goals, on the medians: bin and npy of float32 (nothing to encode) within BINARY_GOAL x the plain
write + sha256 (disk speed); hex and mem (text), every encoding, no slower than the CSV writer.
The other rows are reported for information. Exits 1 when a goal is missed.
"""
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from common import paths  # noqa: E402
from common.check import golden  # noqa: E402
from common.files.csv_io import write_csv  # noqa: E402

WORK_DIR = paths.OUTPUTS / "bench_golden"
SHAPE = (4096, 1024)  # 4 M values, 16 MB of float32
REPEATS = 5
BINARY_GOAL = 1.5  # bin/npy of float32: at most this many times a plain write + sha256 of the same bytes
FORMATS = ("bin", "hex", "mem", "npy", "npz")
ENCODINGS = (golden.make_encoding("float32"), golden.make_encoding("fixed", 32, 16))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def golden_write(x: np.ndarray, fmt: str, enc: golden.Encoding, path: Path) -> None:
    """What 5_golden.py does for one tensor after reading its CSV (common/check/golden.py's own functions)."""
    codes = golden.encode(x, enc, "bench").codes
    if fmt == "npz":
        golden.write_archive(path, {"x": codes})
    else:
        golden.write_tensor(path, codes, fmt, enc, "x")


def plain_write(data: bytes, path: Path, sha256: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if sha256:
        hashlib.sha256(data).hexdigest()


def main() -> int:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    csv_path, plain_path = WORK_DIR / "x.csv", WORK_DIR / "plain.out"
    write_csv(csv_path, x)  # warm up the CSV workers (forked once per process)
    rows, ok = [], True
    for enc in ENCODINGS:
        for fmt in FORMATS:
            path = WORK_DIR / f"x.{fmt}"
            golden_write(x, fmt, enc, path)
            data = path.read_bytes()
            t_gold, t_csv, t_plain, t_hashed = [], [], [], []
            for _ in range(REPEATS):  # alternate, so a busy moment of the machine hits all of them alike
                t_gold.append(timed(lambda: golden_write(x, fmt, enc, path)))
                t_csv.append(timed(lambda: write_csv(csv_path, x)))
                t_plain.append(timed(lambda: plain_write(data, plain_path)))
                t_hashed.append(timed(lambda: plain_write(data, plain_path, sha256=True)))
            g, c, p, h = (statistics.median(t) for t in (t_gold, t_csv, t_plain, t_hashed))
            if fmt in ("hex", "mem"):
                goal, passed = "<= CSV writer", g <= c
            elif fmt in ("bin", "npy") and enc.name == "float32":
                goal, passed = f"<= {BINARY_GOAL:g}x plain+sha", g <= BINARY_GOAL * h
            else:
                goal, passed = "(information)", True
            ok &= passed
            rows.append(f"  {fmt:>4} {enc.name:>8}  {len(data) / 1e6:6.1f} MB  {g * 1e3:7.1f} ms  "
                        f"{len(data) / g / 1e6:6.0f} MB/s  {g / p:6.2f}x  {g / h:6.2f}x  {g / c:6.2f}x   "
                        f"{goal:>19}{'' if goal.startswith('(') else (': ok' if passed else ': MISSED')}")
    csv_mb = csv_path.stat().st_size / 1e6
    print(f"5_golden.py writers, one ({SHAPE[0]}, {SHAPE[1]}) float32 tensor, median of {REPEATS}, side by side with "
          f"step 1's CSV writer ({csv_mb:.0f} MB of CSV, {statistics.median(t_csv) * 1e3:.0f} ms in the last "
          "round) and a plain write of the same bytes")
    print("   fmt encoding       size       time     speed   vs: plain  plain+sha    CSV   goal")
    print("\n".join(rows))
    for p in WORK_DIR.iterdir():
        p.unlink()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
