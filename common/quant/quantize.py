"""Float -> int: weights (per output channel or per group) and activations (per token, dynamic),
exactly as torchao 0.18 computes them on CPU for float32 tensors (docs/quantized.md).

Every step is float32, as torch does it on a float32 tensor:

    amax  = max(-min(min(w), 0), max(max(w), 0))     per channel / group / token   (exact)
    scale = max(amax / ((qmax - qmin) / 2), eps)     float32 division (127.5 or 7.5), one rounding
    inv   = 1 / scale                                 float32, one rounding (torchao multiplies by it)
    q     = clip(round_half_even(w * inv) + zp, qmin, qmax)   float32 product, then int8

The reciprocal is part of the contract: w * (1 / scale) and w / scale differ in the last bit for
some values, and then round to different integers at a tie.
"""
from __future__ import annotations

import numpy as np

from common.quant.schemes import FLOAT32_EPS, FLOAT32_TINY, Scheme

INT8_MIN, INT8_MAX = -128, 127


def _f32(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"expected float32 values, got {x.dtype}: quantize from the float32 tensor")
    return x


def symmetric_scale_float32(amax: np.ndarray, qmin: int, qmax: int, eps: float) -> np.ndarray:
    """float32 amax -> float32 scale = max(amax / ((qmax - qmin) / 2), eps), as torchao's
    choose_qparams_affine (SYMMETRIC): for int8 that is amax / 127.5, so +amax maps to 127.5 (-> 127
    after clamping) and -amax to -127.5 (-> -128)."""
    half_range = np.float32((qmax - qmin) / 2)  # 127.5 or 7.5: exact in float32
    return np.maximum(amax / half_range, np.float32(eps))  # float32 / float32 -> float32


def quantize_round_half_even(x: np.ndarray, scale: np.ndarray, zero_point, qmin: int, qmax: int) -> np.ndarray:
    """float32 x, float32 scale (broadcast) -> int8 clip(round_half_even(x * (1 / scale)) + zp, qmin, qmax)."""
    inv = np.float32(1.0) / scale  # float32 reciprocal, one rounding (torchao: input * (1.0 / scale))
    q = np.rint(x * inv)  # float32 product, one rounding; rint = ties to even, like torch.round
    if zero_point is not None:
        q += zero_point  # float32 + small integer: exact
    return np.clip(q, qmin, qmax).astype(np.int8)  # explicit saturation, then exact cast


def _absmax_float32(x: np.ndarray) -> np.ndarray:
    """max(-min(min(x), 0), max(max(x), 0)) over the last axis (torchao's min_val_neg/max_val_pos)."""
    return np.maximum(-np.minimum(x.min(axis=-1), 0), np.maximum(x.max(axis=-1), 0))


def quantize_weight(w: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """float32 (N, K) -> (q int8 (N, K) in [qmin, qmax], scale float32 (N, 1) or (N, K // group)),
    bit-identical to torchao's qdata and scale (same shapes: Int8Tensor keeps (N, 1), intx (N, G))."""
    w = _f32(w)
    N, K = w.shape
    g = K if scheme.group_size is None else scheme.group_size
    if K % g:
        raise ValueError(f"input dimension {K} is not a multiple of the group size {g}")
    blocks = w.reshape(N, K // g, g)  # (N, K) -> (N, G, g): one scale per (row, group)
    scale = symmetric_scale_float32(_absmax_float32(blocks), scheme.qmin, scheme.qmax, scheme.weight_eps)  # (N, G)
    # Symmetric: torchao's zero point is 0 (int((qmax + qmin + 1) / 2)), adding it changes nothing.
    q = quantize_round_half_even(blocks, scale[..., None], None, scheme.qmin, scheme.qmax)
    return q.reshape(N, K), scale  # (N, G, g) -> (N, K); scale (N, 1) when per channel


def dequantize_weight_float32(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 (N, K), float32 (N, G) -> float32 q * scale per group, one rounding (torchao's dequantize)."""
    N, K = q.shape
    G = scale.shape[1]
    w = q.reshape(N, G, K // G).astype(np.float32) * scale[..., None]  # (N, G, g) x (N, G, 1)
    return w.reshape(N, K)


def quantize_activation_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (M, K) -> (xq int8 (M, K), scale float32 (M, 1)): symmetric int8 per token, as torchao's
    Int8DynamicActivationInt8WeightConfig quantizes a linear's input (w8a8). Scale >= 2**-23."""
    x = _f32(x)
    scale = symmetric_scale_float32(_absmax_float32(x), INT8_MIN, INT8_MAX, FLOAT32_EPS)[:, None]  # (M, 1)
    return quantize_round_half_even(x, scale, None, INT8_MIN, INT8_MAX), scale


def quantize_activation_per_token_asymmetric(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (M, K) -> (xq int8 (M, K), scale float32 (M,), zero_point int8 (M,)): asymmetric int8 per
    token, as torchao's Int8DynamicActivationIntxWeightConfig quantizes a linear's input (w4a8-g*):

        scale = max((max(max(x), 0) - min(min(x), 0)) / 255, 2**-126)      float32
        zp    = clip(-128 - round_half_even(min(min(x), 0) / scale), -128, 127)   (a true division)
        xq    = clip(round_half_even(x * (1 / scale)) + zp, -128, 127)
    """
    x = _f32(x)
    lo = np.minimum(x.min(axis=-1), 0)  # float32 (M,)
    hi = np.maximum(x.max(axis=-1), 0)
    scale = np.maximum((hi - lo) / np.float32(INT8_MAX - INT8_MIN), np.float32(FLOAT32_TINY))  # float32
    zp = np.clip(INT8_MIN - np.rint(lo / scale), INT8_MIN, INT8_MAX)  # float32, integral
    xq = quantize_round_half_even(x, scale[:, None], zp[:, None], INT8_MIN, INT8_MAX)
    return xq, scale, zp.astype(np.int8)


def dequantize_activation_float32(xq: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None) -> np.ndarray:
    """int8 (M, K) -> float32 (xq - zp) * scale per token, one rounding (torchao's dequantize_affine)."""
    x = xq.astype(np.float32)
    if zero_point is not None:
        x -= zero_point.astype(np.float32).reshape(-1, 1)  # small integers: exact
    return x * scale.reshape(-1, 1)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], (..., K) with K even -> uint8 (..., K // 2): two's-complement nibbles,
    element 2i in the LOW nibble, element 2i + 1 in the high nibble (ExecuTorch's and llama.cpp's order)."""
    q = np.asarray(q)
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of values per row, got {q.shape[-1]}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values outside the int4 range [-8, 7]")
    nib = q.astype(np.uint8) & 0x0F  # int8 -> its low 4 bits (two's complement)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 (..., K // 2) -> int8 (..., K) in [-8, 7]: the inverse of pack_int4 (low nibble first)."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.int8)
    lo, hi = (packed & 0x0F).astype(np.int8), (packed >> 4).astype(np.int8)
    out[..., 0::2] = np.where(lo > 7, lo - 16, lo)  # sign-extend the nibble
    out[..., 1::2] = np.where(hi > 7, hi - 16, hi)
    return out
