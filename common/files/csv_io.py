"""The exact CSV format: plain numbers, no header, one line per row, comma-separated.

Values are written as the shortest decimal that parses back to the same float32 (orjson formats
numpy float32 with ryu's shortest round-trip algorithm), so every value reads back bit-exact with
numpy, pandas or Python's float. bf16/fp16 tensors are widened to float32 first, which is exact.
A 1-D tensor is one line. NaN is written `NaN` and infinities `inf` / `-inf` (what polars and
pandas write, and what numpy, pandas and Python read back); a NaN's sign and payload are not kept.

Formatting is the cost (~13 bytes per value), so a large tensor is cut into row chunks
(common/files/csv_format.py) that the forked workers of common/files/csv_pool.py format at once,
each writing its own chunks into the file. The file appears under its final name only once complete (common.files.atomic).
Reading: polars parses straight to float32 (correctly rounded) on every core.

This module does not import torch (step 3 stays a numpy-only process): it accepts a torch tensor
only from a caller that has torch loaded already.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

# polars' allocator (jemalloc) keeps freed pages for 10 s by default, so a process that has read a
# large CSV stays much larger than it needs to (benchmarks/README.md). Return them at once (reading
# is a little slower); set before polars loads, and only if the user set nothing.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")
import polars as pl  # noqa: E402

from common.cli import InputError
from common.files import csv_format, csv_pool
from common.files.atomic import atomic_file

CHUNK_VALUES = 1 << 20  # most values formatted at once: ~14 MB of text held per worker
MIN_CHUNK_VALUES = 1 << 16
PARALLEL_MIN_VALUES = 1 << 18  # below this, handing the work out costs more than it saves


def _is_tensor(x) -> bool:
    """A torch tensor? torch is not imported for it: a process that never imported torch (step 3)
    holds no tensors, and importing it would cost step 3 memory for nothing."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_float32_numpy(x) -> np.ndarray:
    if _is_tensor(x):
        import torch
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _source_array(x) -> np.ndarray:
    """A C-contiguous numpy array of float32, float16, or bfloat16 bits (as uint16), unwidened:
    the writers widen chunk by chunk (exactly), so the whole float32 copy never exists."""
    if _is_tensor(x):
        import torch
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return np.ascontiguousarray(x.view(torch.int16).numpy().view(np.uint16))
        if x.dtype == torch.float16:
            return np.ascontiguousarray(x.numpy())
    if isinstance(x, np.ndarray) and x.dtype == np.float16:
        return np.ascontiguousarray(x)
    return to_float32_numpy(x)


def cpu_workers() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- writing ---------------------------------------------------------------------------------


def _write_serial(fd: int, chunks: list, digest, on_chunk) -> int:
    offset = 0
    for block, *seps in chunks:
        pieces = csv_format.format_block(block, *seps)
        if digest is not None:
            for p in pieces:
                digest.update(p)
        csv_format.pwrite_all(fd, pieces, offset)
        offset += sum(map(len, pieces))
        if on_chunk:
            on_chunk(block.size)
    return offset


def write_numbers(path: str | os.PathLike, x, sep: str = ",", workers: int | None = None,
                  sha256: bool = False, on_chunk: Callable[[int], None] | None = None,
                  file_slice: tuple[Path, int] | None = None) -> tuple[int, str | None]:
    """write_csv with a choice of separator (" " for txt); returns (bytes written, sha256 hex or None).

    `workers`: processes that format at once (default: every core this process may use);
    `on_chunk(n_values)` is called as parts of the file are finished (for a progress bar);
    `file_slice` (file, byte offset): where x's bytes also lie, C order, little-endian, as in a
    safetensors file; the workers then read them from there instead of from a copy.
    """
    a = _source_array(x)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim not in (1, 2):
        raise ValueError(f"write_csv takes a 1-D or 2-D tensor, got shape {a.shape}")
    workers = workers or cpu_workers()
    digest = hashlib.sha256() if sha256 else None
    with atomic_file(path) as f:
        fd = os.dup(f.fileno())  # read-write: the pool's parent re-reads to hash
        try:
            if a.size == 0:
                text = b"\n" * (a.shape[0] if a.ndim == 2 else 1)
                os.write(fd, text)
                if digest is not None:
                    digest.update(text)
                size = len(text)
            elif workers > 1 and a.size >= PARALLEL_MIN_VALUES and _pool_available():
                # several chunks per worker, so that one slow chunk does not hold up the end
                chunk_values = min(CHUNK_VALUES, max(MIN_CHUNK_VALUES, a.size // (4 * workers)))
                size = csv_pool.write(workers, fd, a, sep.encode(), chunk_values, digest, on_chunk,
                                      file_slice if sys.byteorder == "little" else None)
            else:
                size = _write_serial(fd, csv_format.chunks(a, sep.encode(), CHUNK_VALUES), digest, on_chunk)
        finally:
            os.close(fd)
    return size, digest.hexdigest() if digest is not None else None


def _pool_available() -> bool:
    return all(hasattr(m, f) for m, f in ((os, "fork"), (os, "memfd_create"), (socket, "send_fds")))


def write_csv(path: str | os.PathLike, x, workers: int | None = None) -> int:
    """Write a 1-D (one line) or 2-D (one line per row) tensor atomically; return bytes written."""
    return write_numbers(path, x, ",", workers)[0]


# --- reading ---------------------------------------------------------------------------------


def read_csv(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a CSV written by write_csv as float32; with `shape`, check it and name both if they differ.

    polars parses straight to float32 (correctly rounded) on every core; a row with a missing or
    extra value, or a field that is not a number, is an InputError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is missing")
    with open(path, "rb") as f:
        first = f.readline()
        one_line = f.read(1) == b""
    if not first.strip():
        a = np.zeros((0, 0), np.float32)
    elif one_line:  # a 1-D tensor: parse its one line as one column (wide rows are slow to parse)
        a = _parse(io.BytesIO(first.strip().replace(b",", b"\n")), 1, path).reshape(1, -1)
    else:
        a = _parse(path, first.count(b",") + 1, path)
    if shape is not None:
        want = tuple(shape)
        got = a.shape if len(want) == 2 else (a.size,) if a.shape[0] == 1 else a.shape
        if got != want:
            raise InputError(f"{path} has shape {got}, expected {want}: re-export it")
        a = a.reshape(want)
    return a


def _parse(source, ncols: int, path: Path) -> np.ndarray:
    try:
        df = pl.read_csv(source, has_header=False, schema={f"c{i}": pl.Float32 for i in range(ncols)})
    except pl.exceptions.PolarsError as e:
        raise InputError(f"{path}: not a plain numeric CSV ({str(e).splitlines()[0]})") from None
    if df.null_count().sum_horizontal().item():
        raise InputError(f"{path}: not a plain numeric CSV (a row has fewer than {ncols} values, or an empty one)")
    return df.to_numpy(order="c")  # (rows, ncols), row-major like the file


def read_csv_blocks(path: str | os.PathLike, shape: tuple[int, int], block_rows: int) -> Iterator[np.ndarray]:
    """A 2-D CSV of `shape` as float32 blocks of up to `block_rows` rows, in order: a large matrix
    (an embedding used as the head) never whole in memory. The row count is checked at the end."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is missing")
    rows, ncols = shape
    seen = 0
    with open(path, "rb") as f:
        while lines := list(itertools.islice(f, block_rows)):
            block = _parse(io.BytesIO(b"".join(lines)), ncols, path)
            if block.shape[1] != ncols or seen + len(block) > rows:
                raise InputError(f"{path} has more than {rows} rows or not {ncols} columns, expected {shape}: "
                                 "re-export it")
            seen += len(block)
            yield block
    if seen != rows:
        raise InputError(f"{path} has shape ({seen}, {ncols}), expected {shape}: re-export it")


def read_int_csv(path: str | os.PathLike) -> np.ndarray:
    """A CSV of plain integers (step 1's .q.csv, steps 3/4's xq_/acc_ files) as int64, exact: an int32
    accumulator past 2^24 is no float32. A field that is not an integer is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is missing")
    with open(path, "rb") as f:
        ncols = f.readline().count(b",") + 1
    try:
        df = pl.read_csv(path, has_header=False, schema={f"c{i}": pl.Int64 for i in range(ncols)})
    except pl.exceptions.PolarsError as e:
        raise InputError(f"{path}: not a CSV of plain integers ({str(e).splitlines()[0]})") from None
    if df.null_count().sum_horizontal().item():
        raise InputError(f"{path}: not a CSV of plain integers (a row has fewer than {ncols} values, or an empty one)")
    return df.to_numpy(order="c")
