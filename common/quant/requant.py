"""Requantization: an int32 accumulator back to an int8 activation with an integer multiplier and a shift.

The real rescale factor r = s_x * s_w / s_y (calibration, float) becomes M in [2^30, 2^31) and a right
shift `shift` in [0, 31] with

    r ~= M * 2^-(31 + shift)          M is Q0.31 (M / 2^31 in [0.5, 1)), so r in [2^-32, 1)

and then, with s = 31 + shift the TOTAL right shift (the 31 of M's Q0.31 plus `shift`), one of two rules:

  single  y = sat((acc * M + 2^(s-1)) >> s)                  one rounding, half up (toward +inf)
          (TFLite's MultiplyByQuantizedMultiplier under TFLITE_SINGLE_ROUNDING, CMSIS-NN's
          CMSIS_NN_USE_SINGLE_ROUNDING; TFLite's `shift` is -shift here, its total_shift = 31 - shift)
  double  y = sat(RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M), shift))
          (gemmlowp fixedpoint.h; TFLite's default build): two roundings, the first to nearest with
          ties toward +inf at bit 31 (its nudge is 1 - 2^30 for negatives, then a truncating division),
          the second to nearest with ties away from zero at `shift`. They differ by 1 on a small fraction
          of outputs (tflite-micro #3252); tests/test_quant_requant.py measures it.

sat() clamps to a signed `bits`-bit integer (int8 by default): explicit saturation, never a wrap.
Each rule has a plain-Python-int reference (`*_ref`, the definition) beside its vectorised int64 numpy
version; they are tested bit for bit. No float after quantize_multiplier.
"""
from __future__ import annotations

import math

import numpy as np

from common.cli import InputError

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
M_MIN, M_MAX = 2**30, 2**31 - 1
SHIFT_MIN, SHIFT_MAX = 0, 31
RULES = ("single", "double")


def quantize_multiplier(real_scale: float) -> tuple[int, int]:
    """r -> (M, shift) with r ~= M * 2^-(31 + shift), M in [2^30, 2^31), shift in [0, 31].

    TFLite's QuantizeMultiplier: frexp, then M = round(q * 2^31) half away from zero (std::round), and
    M = 2^31 (q rounded up to 1) becomes 2^30 one shift less. Relative error <= 2^-31. Where TFLite
    flushes a scale that needs a shift past 31 to M = 0 (and allows left shifts for r >= 1), both are
    refused here: an InputError names the scale.
    """
    if not (isinstance(real_scale, (int, float, np.floating)) and math.isfinite(real_scale) and real_scale > 0):
        raise InputError(f"requantization scale {real_scale!r}: give a finite number > 0")
    q, e = math.frexp(float(real_scale))  # r = q * 2^e, q in [0.5, 1)
    m = math.floor(q * 2**31 + 0.5)  # exact: q * 2^31 has <= 53 significant bits, ulp <= 2^-22
    if m == 2**31:
        m, e = 2**30, e + 1
    shift = -e
    if not SHIFT_MIN <= shift <= SHIFT_MAX:
        raise InputError(f"requantization scale {real_scale!r} needs a right shift of {shift}, outside "
                         f"[{SHIFT_MIN}, {SHIFT_MAX}] (scale must be in [2^-32, 1)): choose other activation scales")
    return m, shift


def check_multiplier(M, shift) -> tuple[np.ndarray, np.ndarray]:
    """M in [2^30, 2^31) and shift in [0, 31], integers (scalars or per-channel arrays), else InputError."""
    M_arr, s_arr = np.asarray(M), np.asarray(shift)
    for name, a, lo, hi in (("multiplier M", M_arr, M_MIN, M_MAX), ("shift", s_arr, SHIFT_MIN, SHIFT_MAX)):
        if a.dtype.kind not in "iu" or a.size == 0 or a.min() < lo or a.max() > hi:
            raise InputError(f"requantization {name} {a.tolist() if a.size < 8 else '...'} is outside "
                             f"[{lo}, {hi}] or not an integer: compute it with quantize_multiplier")
    return M_arr.astype(np.int64), s_arr.astype(np.int64)


def check_acc(acc) -> np.ndarray:
    """int32 accumulators as int64, else InputError."""
    a = np.asarray(acc)
    if a.dtype.kind not in "iu" or (a.size and (a.min() < INT32_MIN or a.max() > INT32_MAX)):
        raise InputError("accumulator values must be int32 integers: check the integer matmul")
    return a.astype(np.int64)


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 32:
        raise InputError(f"output bits {bits}: give 2..32")


# ---- plain-Python-int references (the definitions) ----

def saturate_ref(x: int, bits: int) -> int:
    return max(-2**(bits - 1), min(2**(bits - 1) - 1, x))


def requantize_single_ref(acc: int, M: int, shift: int, bits: int = 8) -> int:
    s = 31 + shift  # total right shift, s in [31, 62]
    return saturate_ref((acc * M + 2**(s - 1)) >> s, bits)  # >> on Python ints is floor: round half up


def saturating_rounding_doubling_high_mul_ref(a: int, b: int) -> int:
    """gemmlowp: 2*a*b / 2^32 to nearest, ties toward +inf; (INT32_MIN, INT32_MIN) -> INT32_MAX (saturation)."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    t = ab + nudge
    return t // 2**31 if t >= 0 else -((-t) // 2**31)  # C's integer division truncates toward zero


def rounding_divide_by_pot_ref(x: int, exponent: int) -> int:
    """gemmlowp: x / 2^exponent rounded half away from zero, exponent in [0, 31]."""
    mask = 2**exponent - 1
    remainder = x & mask  # two's complement bits of x, as in C
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def requantize_double_ref(acc: int, M: int, shift: int, bits: int = 8) -> int:
    return saturate_ref(rounding_divide_by_pot_ref(saturating_rounding_doubling_high_mul_ref(acc, M), shift), bits)


# ---- vectorised int64 numpy versions (bit for bit the references) ----

def saturate(x: np.ndarray, bits: int) -> np.ndarray:
    """Clamp int64 to a signed `bits`-bit range (explicit saturation)."""
    return np.clip(x, -2**(bits - 1), 2**(bits - 1) - 1)


def rounding_right_shift_half_up(x: np.ndarray, k) -> np.ndarray:
    """x / 2^k rounded half up (toward +inf): (x + 2^(k-1)) >> k for k >= 1, x for k = 0. int64, k <= 62."""
    x, k = np.asarray(x, dtype=np.int64), np.asarray(k, dtype=np.int64)
    half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
    return (x + half) >> k  # numpy >> on int64 is arithmetic (floor)


def requantize_single(acc, M, shift, bits: int = 8) -> np.ndarray:
    """sat((acc * M + 2^(s-1)) >> s), s = 31 + shift: int32 acc -> signed `bits`-bit, as int64."""
    _check_bits(bits)
    a = check_acc(acc)
    M, shift = check_multiplier(M, shift)
    prod = a * M  # int32 x int32 -> int64, |prod| < 2^62
    return saturate(rounding_right_shift_half_up(prod, 31 + shift), bits)  # + 2^(s-1) <= 2^61: no overflow


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    ab = a * b  # int64, |ab| <= 2^62
    t = ab + np.where(ab >= 0, 2**30, 1 - 2**30)
    high = np.where(t >= 0, t >> 31, -((-t) >> 31))  # truncating division by 2^31
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)


def rounding_divide_by_pot(x: np.ndarray, exponent) -> np.ndarray:
    x, e = np.asarray(x, dtype=np.int64), np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def requantize_double(acc, M, shift, bits: int = 8) -> np.ndarray:
    """sat(RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M), shift)) -> signed `bits`-bit, int64."""
    _check_bits(bits)
    a = check_acc(acc)
    M, shift = check_multiplier(M, shift)
    return saturate(rounding_divide_by_pot(saturating_rounding_doubling_high_mul(a, M), shift), bits)


def requantize(acc, M, shift, rule: str = "single", bits: int = 8) -> np.ndarray:
    """The named rule ('single' default, or 'double'), as recorded in a manifest."""
    if rule not in RULES:
        raise InputError(f"requantization rule {rule!r}: give one of {', '.join(RULES)}")
    return (requantize_single if rule == "single" else requantize_double)(acc, M, shift, bits)
