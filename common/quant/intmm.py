"""Exact integer matmuls and the float epilogues that scale them back, as torchao 0.18 does on CPU.

The integer product is computed with float64 BLAS: every product of two int8 values is an integer of
at most 2**14 in magnitude, and every partial sum of K of them is an integer of at most K * 2**14,
exact in float64 while it stays below 2**53 (K < 2**39). Whatever order BLAS adds them in, every
partial sum is exact, so the result is the integer; it is then checked to fit the int32 accumulator
(|acc| < 2**31, always true for int8 x int8 with K < 2**17) and never saturated silently.
int_matmul_python is the plain-integer reference beside it.
"""
from __future__ import annotations

import numpy as np

from common.quant.quantize import dequantize_weight_float32

FLOAT64_EXACT = 1 << 53  # every integer of magnitude <= 2**53 is a float64
INT32_MAX = (1 << 31) - 1


SMALL_INTS = (np.int8, np.int16)  # |product| <= 2**30: a K-chunk of 2**23 products stays below 2**53


def int_matmul(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """int8|int16 (M, K) x int8|int16 (N, K) -> int32 (M, N) = xq @ wq.T exactly (int8 x int8 -> int32).

    float64 BLAS over K-chunks short enough that no partial sum can reach 2**53; the chunk sums
    are added in int64. OverflowError if a sum does not fit int32."""
    if xq.dtype not in SMALL_INTS or wq.dtype not in SMALL_INTS:
        raise TypeError(f"int_matmul takes int8 or int16 arrays, got {xq.dtype} and {wq.dtype}")
    (M, K), (N, K2) = xq.shape, wq.shape
    if K != K2:
        raise ValueError(f"int_matmul: inner dimensions differ ({K} and {K2})")
    per_product = (1 << (8 * xq.itemsize - 1)) * (1 << (8 * wq.itemsize - 1))  # |int8 x int8| <= 2**14
    chunk = max(1, min(K, FLOAT64_EXACT // per_product))  # int8: 2**39 (never reached), int16: 2**23
    acc = None
    for k in range(0, K, chunk):
        part = xq[:, k:k + chunk].astype(np.float64) @ wq[:, k:k + chunk].astype(np.float64).T  # exact integers
        acc = part.astype(np.int64) if acc is None else acc + part.astype(np.int64)
    if acc is None:
        acc = np.zeros((M, N), np.int64)
    if acc.size and np.abs(acc).max() > INT32_MAX:
        raise OverflowError("int_matmul: an accumulator exceeds int32")
    return acc.astype(np.int32)


def int_matmul_python(xq, wq) -> list[list[int]]:
    """The plain-Python-int reference: acc[m][n] = sum_k xq[m][k] * wq[n][k], unbounded integers."""
    xs, ws = [[int(v) for v in row] for row in xq], [[int(v) for v in row] for row in wq]
    return [[sum(a * b for a, b in zip(x, w)) for w in ws] for x in xs]


def int_matmul_groups(xq: np.ndarray, wq: np.ndarray, group_size: int, x_zero_point: np.ndarray | None = None) -> np.ndarray:
    """int8 (M, K), int8 (N, K) -> int32 (G, M, N): per group g of `group_size` inputs,
    acc[g] = (xq - zp)[:, g] @ wq[:, g].T exactly (zp per token, int8 (M,) or None).

    (xq - zp) lies in [-255, 255]: it is formed in int16 and the products stay far below 2**53."""
    M, K = xq.shape
    G = K // group_size
    x = xq.astype(np.int16)
    if x_zero_point is not None:
        x -= x_zero_point.astype(np.int16).reshape(-1, 1)  # int16: exact
    out = np.empty((G, M, wq.shape[0]), np.int32)
    for g in range(G):
        cols = slice(g * group_size, (g + 1) * group_size)
        out[g] = int_matmul(x[:, cols], wq[:, cols])
    return out


# --- epilogues: int32 accumulators back to float32 ------------------------------------------------


def rescale_int8_float32(acc: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray,
                         bias: np.ndarray | None = None) -> np.ndarray:
    """w8a8: int32 (M, N) -> float32 y = ((float32(acc) * x_scale) * w_scale) + bias, every step a
    float32 operation with one rounding (ties to even), in torchao's order (int_scaled_matmul, then
    the weight scale, then the bias). Bit-identical to torchao's Int8Tensor linear on CPU.
    x_scale float32 (M, 1), w_scale float32 (N, 1) or (N,), bias float32 (N,) or None."""
    y = acc.astype(np.float32)  # int32 -> float32: rounds to nearest even above 2**24
    y = y * x_scale.reshape(-1, 1)  # float32
    y = y * w_scale.reshape(1, -1)  # float32
    if bias is not None:
        y = y + bias.reshape(1, -1)  # float32
    return y


def rescale_groups_float32(acc: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray,
                           bias: np.ndarray | None = None) -> np.ndarray:
    """w4a8: int32 (G, M, N) -> float32 y = x_scale * sum_g w_scale[:, g] * acc[g] (+ bias).

    torchao (intx, UNPACKED_TO_INT8) runs this as a float32 matmul of the dequantized activation
    and weight; this computes the same real number in float64 (products of int32 and float32
    are exact there, the sum over G groups nearly so) and rounds once to float32, so it differs
    from the running model only by torchao's own float32 rounding. x_scale (M,), w_scale (N, G)."""
    w64 = w_scale.astype(np.float64)
    y = np.zeros(acc.shape[1:], np.float64)  # (M, N)
    for g in range(acc.shape[0]):
        y += acc[g] * w64[:, g]  # int32 x float64 -> float64 (exact: 24 + 21 bits < 53)
    y = (y * x_scale.astype(np.float64).reshape(-1, 1)).astype(np.float32)
    if bias is not None:
        y = y + bias.reshape(1, -1)  # float32, as torchao's F.linear adds it
    return y


def linear_weight_only_float32(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """w8a16 / w4a16: float32 x (M, K), int8 q (N, K), float32 scale (N, G) -> float32 (M, N).

    Per channel (G = 1, torchao's Int8Tensor): y = float32(x @ q.T) * scale. Per group (intx):
    y = x @ float32(q * scale).T. The dot products are summed in float64 and rounded once, so this
    is the exactly rounded value of torchao's formula; torchao sums in float32 (its error, not ours)."""
    x64 = x.astype(np.float64)
    if scale.shape[1] == 1:
        y = (x64 @ q.astype(np.float64).T).astype(np.float32) * scale.reshape(1, -1)  # float32 product
    else:
        y = (x64 @ dequantize_weight_float32(q, scale).astype(np.float64).T).astype(np.float32)
    if bias is not None:
        y = y + bias.reshape(1, -1)
    return y
