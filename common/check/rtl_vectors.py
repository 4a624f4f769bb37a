"""Golden vectors of one int8 linear for a Verilog testbench: $readmemh files, one word per line.

Every file is hexadecimal two's complement, one word per line, lowercase, zero-padded to its width,
no prefix and no comments; matrices row-major. The contract (examples/rtl/README.md):

| file        | width | words  | what                                              |
|-------------|-------|--------|---------------------------------------------------|
| dims.hex    | 32    | 3      | T, K, N                                           |
| x.hex       | 8     | T * K  | activations int8 [T x K]                          |
| w.hex       | 8     | N * K  | weights int8 [N x K] (the checkpoint's layout)    |
| m.hex       | 32    | N      | requantization multiplier M per output channel   |
| shift.hex   | 8     | N      | right shift after M's 31, per output channel      |
| acc.hex     | 32    | T * N  | expected int32 accumulators x @ w.T               |
| out.hex     | 8     | T * N  | expected int8 outputs, requantize_single(acc)     |
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.files.atomic import write_text
from common.cli import InputError
from common.quant.requant import check_acc, check_multiplier, requantize_single

# file -> (bits per word, what); the testbench reads exactly these names
FILES = {"dims.hex": 32, "x.hex": 8, "w.hex": 8, "m.hex": 32, "shift.hex": 8, "acc.hex": 32, "out.hex": 8}


def hex_words(a: np.ndarray, bits: int) -> str:
    """Integers -> two's complement hex, bits/4 digits a word, one word per line."""
    a = np.asarray(a).ravel()
    if a.dtype.kind not in "iu" or (a.size and (a.min() < -2**(bits - 1) or a.max() >= 2**bits)):
        raise InputError(f"values do not fit {bits}-bit words")
    mask, digits = (1 << bits) - 1, bits // 4
    return "".join(f"{int(v) & mask:0{digits}x}\n" for v in a)


def read_hex_words(path: str | Path, bits: int) -> np.ndarray:
    """The inverse of hex_words (signed): int64."""
    v = np.array([int(line, 16) for line in Path(path).read_text().split()], dtype=np.int64)
    return np.where(v >= 2**(bits - 1), v - 2**bits, v)


def int8_linear_golden(x: np.ndarray, w: np.ndarray, M, shift) -> tuple[np.ndarray, np.ndarray]:
    """acc = x @ w.T (int8 x int8 -> int32, exact in int64) and out = requantize_single(acc) per channel."""
    for name, a in (("activations x", x), ("weights w", w)):
        if a.ndim != 2 or a.dtype.kind not in "iu" or a.min() < -128 or a.max() > 127:
            raise InputError(f"{name}: give a 2-D int8 matrix")
    if x.shape[1] != w.shape[1]:
        raise InputError(f"x is [T x {x.shape[1]}] but w is [N x {w.shape[1]}]: K must agree")
    M, shift = check_multiplier(M, shift)
    if M.shape not in ((), (w.shape[0],)) or shift.shape not in ((), (w.shape[0],)):
        raise InputError(f"M and shift: give one value or one per output channel ({w.shape[0]})")
    acc = check_acc(x.astype(np.int64) @ w.astype(np.int64).T)  # int8 x int8 summed over K -> int32, (T, N)
    return acc, requantize_single(acc, M, shift)


def write_vectors(out_dir: str | Path, x: np.ndarray, w: np.ndarray, M, shift) -> dict[str, np.ndarray]:
    """Write the seven files of one int8 linear into out_dir; returns the expected acc and out."""
    acc, out = int8_linear_golden(x, w, M, shift)
    (T, K), N = x.shape, w.shape[0]
    M, shift = np.broadcast_to(M, (N,)), np.broadcast_to(shift, (N,))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, a in (("dims.hex", np.array([T, K, N])), ("x.hex", x), ("w.hex", w), ("m.hex", M),
                    ("shift.hex", shift), ("acc.hex", acc), ("out.hex", out)):
        write_text(out_dir / name, hex_words(a, FILES[name]))
    return {"acc": acc, "out": out}
