"""The text of a CSV block: float32 values as their shortest round-trip decimals (orjson, ryu), rows
cut into chunks, and the pwritev that puts a chunk's pieces into the file. Shared by the serial
writer (common/files/csv_io.py) and the forked workers (common/files/csv_pool.py).
"""
from __future__ import annotations

import os

import numpy as np
import orjson

NAN, POS_INF, NEG_INF = b"NaN", b"inf", b"-inf"
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def widen(block: np.ndarray) -> np.ndarray:
    """float32 values of a block from _source_array; exact (bf16 is the top half of a float32)."""
    if block.dtype == np.uint16:  # bfloat16 bits
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block.astype(np.float32, copy=False)


# --- formatting ------------------------------------------------------------------------------


def _row_text(row: np.ndarray) -> bytes:
    """One row's values, comma-separated; orjson writes NaN and inf as null, so respell those."""
    text = orjson.dumps(row, option=_NUMPY)[1:-1]
    if np.isfinite(row).all():
        return text
    tokens = text.split(b",")
    for j in np.flatnonzero(~np.isfinite(row)):
        tokens[j] = NAN if np.isnan(row[j]) else POS_INF if row[j] > 0 else NEG_INF
    return b",".join(tokens)


def format_block(block: np.ndarray, col_sep: bytes, row_sep: bytes, end: bytes) -> list:
    """A C-contiguous float32 (rows, cols) block as buffers for writev: values joined by `col_sep`,
    rows by `row_sep`, then `end`. The pieces are views into one orjson output: nothing is copied.
    A float16 or bfloat16-bits block is widened to float32 first."""
    block = widen(block)
    if np.isfinite(block).all():
        text = orjson.dumps(block, option=_NUMPY)  # b"[[v,v,...],[v,...],...]"
        view, find = memoryview(text), text.find
        rows, pos = [], 2
        for _ in range(block.shape[0]):
            stop = find(b"]", pos)
            rows.append(view[pos:stop])
            pos = stop + 3  # skip "],["
    else:
        rows = [_row_text(r) for r in block]
    if col_sep != b",":
        table = bytes.maketrans(b",", col_sep)
        rows = [bytes(r).translate(table) for r in rows]
    pieces = [p for r in rows for p in (r, row_sep)]
    pieces[-1] = end
    return pieces


def chunks(a: np.ndarray, col_sep: bytes, chunk_values: int) -> list[tuple[np.ndarray, bytes, bytes, bytes]]:
    """format_block arguments covering the whole file in order: blocks of about `chunk_values`
    values, whole rows of a 2-D array, or segments of a 1-D one (one line: joined by `col_sep`)."""
    if a.ndim == 2:
        step = max(1, chunk_values // max(1, a.shape[1]))
        return [(a[i:i + step], col_sep, b"\n", b"\n") for i in range(0, a.shape[0], step)]
    width = max(1, min(4096, chunk_values))
    n_full = a.size // width * width
    body = a[:n_full].reshape(-1, width)  # (n // width, width): pseudo-rows of the one line
    step = max(1, chunk_values // width)
    out = [(body[i:i + step], col_sep, col_sep, col_sep) for i in range(0, body.shape[0], step)]
    if n_full < a.size:
        out.append((a[n_full:].reshape(1, -1), col_sep, col_sep, col_sep))
    out[-1] = (*out[-1][:3], b"\n")
    return out


def pwrite_all(fd: int, pieces: list, offset: int) -> None:
    """pwritev every piece at `offset`, resuming after short writes."""
    views = [memoryview(p) for p in pieces]
    while views:
        batch = views[:_IOV_MAX]
        done = os.pwritev(fd, batch, offset)
        offset += done
        k = 0
        while k < len(batch) and done >= len(batch[k]):
            done -= len(batch[k])
            k += 1
        views = views[k:]
        if done:
            views[0] = views[0][done:]
