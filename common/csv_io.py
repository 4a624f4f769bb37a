"""The exact CSV reader/writer: plain numbers, no header, one line per row, comma-separated.

Values are written as the shortest decimal that parses back to the same float32 (polars
formats float32 with ryu), so every value reads back bit-exact with numpy, pandas or Python's
float. bf16/fp16 tensors are widened to float32 first, which is exact.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

from common.atomic import atomic_path
from common.cli import InputError


def to_float32_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def write_csv(path: str | os.PathLike, x) -> int:
    """Write a 1-D (one line) or 2-D (one line per row) tensor atomically; return bytes written."""
    a = to_float32_numpy(x)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"write_csv takes a 1-D or 2-D tensor, got shape {a.shape}")
    with atomic_path(path) as tmp:
        pl.from_numpy(a).write_csv(tmp, include_header=False)
        return tmp.stat().st_size


def read_csv(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a CSV written by write_csv as float32; with `shape`, check it and name both if they differ."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is missing")
    with open(path, "rb") as f:
        ncols = f.readline().count(b",") + 1
    try:
        a = pl.read_csv(path, has_header=False,
                        schema={f"c{i}": pl.Float32 for i in range(ncols)}).to_numpy()
    except pl.exceptions.PolarsError as e:
        raise InputError(f"{path}: not a plain numeric CSV ({str(e).splitlines()[0]})") from None
    if shape is not None:
        want = tuple(shape)
        got = a.shape if len(want) == 2 else (a.size,) if a.shape[0] == 1 else a.shape
        if got != want:
            raise InputError(f"{path} has shape {got}, expected {want}: re-export it")
        a = a.reshape(want)
    return a
