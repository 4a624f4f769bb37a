"""CSV files of plain integers (no header, one line per row), written exactly (read back with
common.files.csv_io.read_int_csv).

Step 1 --quant's <tensor>.q.csv (and its float32 .scale.csv, written the same way) and step 4
--integer-only's int_*.csv and tables. No torch here: step 4 imports it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import orjson

from common.files.atomic import atomic_file

Q_SUFFIX, SCALE_SUFFIX = ".q.csv", ".scale.csv"  # step 1 --quant: a quantized weight's integers and scales
ROWS_PER_CHUNK = 1 << 12


def csv_chunks(a: np.ndarray):
    """A 2-D integer or finite float32 array as CSV bytes, a block of rows at a time: no header, one
    line per row. orjson writes float32 as the shortest decimal that parses back exactly, the same
    bytes as common.files.csv_io.write_numbers."""
    for i in range(0, a.shape[0], ROWS_PER_CHUNK):
        text = orjson.dumps(a[i:i + ROWS_PER_CHUNK], option=orjson.OPT_SERIALIZE_NUMPY)  # b"[[1,-2],[3,4]]"
        yield text[2:-2].replace(b"],[", b"\n") + b"\n"


def write_csv_exact(path: Path, a: np.ndarray) -> tuple[int, str]:
    """Write a (2-D int, or finite float32) atomically as CSV; (bytes, sha256)."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{path}: a scale is not finite")
    digest, size = hashlib.sha256(), 0
    with atomic_file(path) as f:
        for chunk in csv_chunks(a):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
