"""Fixed-point formats and the integer nonlinear ops of an integer-only Llama layer.

A tensor in format FixedFormat(bits, frac) is a signed `bits`-bit integer q meaning q * 2^-frac.
Calibration (float, once) chooses formats and builds tables; after it every op below is integer-only
(int64 numpy, no float). Rounding names: half_up = ties toward +inf ((x + 2^(k-1)) >> k); half_even
only where float meets integer at the door (to_fixed); every saturation is explicit.

    rmsnorm   n = sum x^2 + eps_q D (int64); m = round_half_up((n << 2j) / D) << 2k2, in [2^60, 2^62);
              r = isqrt(m) (bit by bit); inv = round_half_up(2^62 / r);
              y = sat(((x * inv) >>r (46 - j - k2)) * gamma >>r (16 + fg - fo))
    softmax   q = s - max(s); e = i-exp(q) (I-BERT, Kim et al. 2021, Alg. 2); p = round_half_up(e * 2^PF / sum e)
    silu      y = table[x + 128]                      256 entries over the int8 input, built in float64
    rope      y1 = sat((x1 c - x2 s) >>r 14), y2 = sat((x2 c + x1 s) >>r 14)   c, s Q1.14 per position
    add       y = sat(align(a) + align(b))            align: << or >>r to the output's frac
(>>r: rounding_right_shift_half_up.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.cli import InputError
from common.llama.rope import rope_cos_sin  # float: RoPE tables are built once, at calibration
from common.quant.requant import rounding_right_shift_half_up, saturate

# I-BERT's second-order fit of exp on (-ln 2, 0]: exp(p) ~= A (p + B)^2 + C.
IEXP_A, IEXP_B, IEXP_C = 0.3585, 1.353, 0.344
ROPE_FRAC = 14  # cos/sin tables are Q1.14 in int16
RSQRT_BITS = 62  # rmsnorm normalises ms << 2k into [2^60, 2^62) before its integer sqrt
NORM_FRAC = 16  # x / rms is held at frac 16 between the reciprocal and gamma


@dataclass(frozen=True)
class FixedFormat:
    """Signed `bits`-bit integers q meaning q * 2^-frac."""
    bits: int
    frac: int

    @property
    def lo(self) -> int:
        return -2**(self.bits - 1)

    @property
    def hi(self) -> int:
        return 2**(self.bits - 1) - 1

    def __str__(self) -> str:
        return f"int{self.bits} frac {self.frac}"


def choose_format(lo: float, hi: float, bits: int, max_frac: int = 31) -> FixedFormat:
    """The format of `bits` bits with the most fraction bits whose range holds [lo, hi] (calibration).

    InputError when even frac 0 cannot hold it: give more bits.
    """
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise InputError(f"calibrated range [{lo}, {hi}]: give finite numbers lo <= hi (check the captures)")
    for frac in range(max_frac, -1, -1):
        f = FixedFormat(bits, frac)
        if round(hi * 2**frac) <= f.hi and round(lo * 2**frac) >= f.lo:
            return f
    raise InputError(f"calibrated range [{lo}, {hi}] does not fit int{bits} even with 0 fraction bits: "
                     f"give more bits")


def to_fixed(x: np.ndarray, fmt: FixedFormat) -> np.ndarray:
    """float -> int64 q = sat(round_half_even(x * 2^frac)): where floats enter (calibration, tables)."""
    return saturate(np.rint(np.asarray(x, dtype=np.float64) * 2.0**fmt.frac).astype(np.int64), fmt.bits)


def from_fixed(q: np.ndarray, fmt: FixedFormat) -> np.ndarray:
    """int -> float64 q * 2^-frac (exact), for reports and tests."""
    return np.asarray(q, dtype=np.float64) * 2.0**-fmt.frac


def check_table(name: str, table, shape: tuple[int, ...], fmt: FixedFormat) -> np.ndarray:
    """A table read from a file: integers of `shape` inside `fmt`, else InputError naming it."""
    t = np.asarray(table)
    if t.shape != shape:
        raise InputError(f"{name}: table of shape {t.shape}, expected {shape}: rebuild it for this model")
    if t.dtype.kind not in "iu" or (t.size and (t.min() < fmt.lo or t.max() > fmt.hi)):
        raise InputError(f"{name}: values must be integers in [{fmt.lo}, {fmt.hi}] ({fmt}): rebuild the table")
    return t.astype(np.int64)


def _check_ints(name: str, x, fmt: FixedFormat) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu" or (a.size and (a.min() < fmt.lo or a.max() > fmt.hi)):
        raise InputError(f"{name}: values must be integers in [{fmt.lo}, {fmt.hi}] ({fmt})")
    return a.astype(np.int64)


# ---- integer square root and RMSNorm ----

def isqrt_floor_ref(n: int) -> int:
    return math.isqrt(n)


def isqrt_floor(n: np.ndarray) -> np.ndarray:
    """floor(sqrt(n)) for 0 <= n < 2^63, the digit-by-digit (bit-by-bit) method: 32 compare-subtract steps."""
    n = np.array(n, dtype=np.int64)
    res = np.zeros_like(n)
    bit = np.int64(1) << 62
    for _ in range(32):
        t = res + bit
        ge = n >= t
        n = np.where(ge, n - t, n)
        res = np.where(ge, (res >> 1) + bit, res >> 1)
        bit >>= 2
    return res


def bit_length(n: np.ndarray) -> np.ndarray:
    """Python's int.bit_length for 0 <= n < 2^63, by binary search (a leading-zero count)."""
    v, bl = np.array(n, dtype=np.int64), np.zeros(np.shape(n), dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = (v >> s) > 0
        v, bl = np.where(big, v >> s, v), bl + np.where(big, s, 0)
    return bl + (v > 0)


def rmsnorm_eps(eps: float, fmt_x: FixedFormat) -> int:
    """eps at the frac of x^2 (2 * frac_x), rounded half even, at least 1 (calibration)."""
    return max(1, int(np.rint(eps * 2.0**(2 * fmt_x.frac))))


def rms_norm_int(x, fmt_x: FixedFormat, gamma_q, fmt_gamma: FixedFormat, eps_q: int,
                 fmt_out: FixedFormat) -> np.ndarray:
    """Integer RMSNorm over the last axis: (..., D) in fmt_x -> (..., D) in fmt_out, int64.

    Integer rsqrt: n = sum x^2 + eps_q D (frac 2 fx) is shifted left by an even 2j to just under 2^62,
    divided by D rounding half up (the mean square with ~43 significant bits), and shifted left again
    by an even 2k2 into [2^60, 2^62); its floor square root r (digit by digit, r in [2^30, 2^31),
    r ~= rms * 2^(fx + k), k = j + k2) is exact, and one reciprocal per row inv = round_half_up(2^62 / r)
    replaces a division per element: x * inv is x / rms at frac 62 - k, brought to frac 16 (rounding
    half up), times gamma (frac fg), rounded half up to fo and saturated.
    """
    if fmt_x.bits > 24:
        raise InputError(f"rmsnorm input {fmt_x}: at most 24 bits (the int64 sum of squares must not overflow)")
    x = _check_ints("rmsnorm input", x, fmt_x)
    D = x.shape[-1]
    if not 1 <= D < 2**17:
        raise InputError(f"rmsnorm over {D} values: give 1 .. 2^17 - 1")
    g = check_table("rmsnorm gamma", gamma_q, (D,), fmt_gamma)
    n = np.sum(x * x, axis=-1) + eps_q * D  # int64: D * 2^46 < 2^63; frac 2 fx
    j = (RSQRT_BITS - bit_length(n)) // 2
    mean = ((n << (2 * j)) + D // 2) // D  # mean square + eps, frac 2 (fx + j), half up
    k2 = (RSQRT_BITS - bit_length(mean)) // 2
    k = j + k2
    r = isqrt_floor(mean << (2 * k2))  # int64 in [2^30, 2^31)
    inv = ((np.int64(1) << RSQRT_BITS) + r // 2) // r  # 2^62 / r half up: in (2^31, 2^32]
    t = rounding_right_shift_half_up(x * inv[..., None], (RSQRT_BITS - NORM_FRAC - k)[..., None])  # x / rms, frac 16
    shift = NORM_FRAC + fmt_gamma.frac - fmt_out.frac
    if shift < 0:
        raise InputError(f"rmsnorm output {fmt_out}: at most {NORM_FRAC + fmt_gamma.frac} fraction bits")
    return saturate(rounding_right_shift_half_up(t * g, shift), fmt_out.bits)  # |t * g| < 2^24 * 2^15


def rms_norm_int_ref(x: list[int], fx: int, gamma: list[int], fg: int, eps_q: int, fo: int, bits: int) -> list[int]:
    """One row in plain Python ints (the definition of rms_norm_int)."""
    D = len(x)
    n = sum(v * v for v in x) + eps_q * D
    j = (RSQRT_BITS - n.bit_length()) // 2
    mean = ((n << (2 * j)) + D // 2) // D
    k2 = (RSQRT_BITS - mean.bit_length()) // 2
    r = math.isqrt(mean << (2 * k2))
    inv = (2**RSQRT_BITS + r // 2) // r

    def rrs(v: int, s: int) -> int:
        return (v + (2**(s - 1) if s else 0)) >> s

    lo, hi = -2**(bits - 1), 2**(bits - 1) - 1
    return [max(lo, min(hi, rrs(rrs(v * inv, RSQRT_BITS - NORM_FRAC - j - k2) * gv, NORM_FRAC + fg - fo)))
            for v, gv in zip(x, gamma)]


# ---- softmax with I-BERT's integer exp ----

def iexp_constants(frac_in: int) -> dict[str, int]:
    """I-BERT's i-exp constants for inputs at scale 2^-frac_in (calibration), each floor()ed as in the paper:
    q_ln2 = floor(ln2 * 2^f), q_b = floor(B * 2^f), q_c = floor(C / A * 2^2f). Output scale A * 2^-2f."""
    f = frac_in
    return {"frac_in": f, "q_ln2": math.floor(math.log(2) * 2**f), "q_b": math.floor(IEXP_B * 2**f),
            "q_c": math.floor(IEXP_C / IEXP_A * 2**(2 * f))}


def iexp(q: np.ndarray, c: dict[str, int]) -> np.ndarray:
    """exp(q * 2^-f) / (A * 2^-2f) for q <= 0, int64: q = -z ln2 + p, exp = 2^-z (A (p + B)^2 + C).

    z = floor(-q / q_ln2); q_p = q + z q_ln2 in (-q_ln2, 0]; q_L = (q_p + q_b)^2 + q_c; e = q_L >> z (floor).
    """
    z = (-q) // c["q_ln2"]
    qp = q + z * c["q_ln2"]
    qL = (qp + c["q_b"]) ** 2 + c["q_c"]  # int64 < 2^34 for f <= 15
    return qL >> np.minimum(z, 63)  # past 63 the result is 0 anyway


def iexp_max(c: dict[str, int]) -> int:
    """The largest value iexp returns (at q = 0): what the int32 sum is bounded by."""
    return c["q_b"] ** 2 + c["q_c"]


def softmax_int(scores, fmt_in: FixedFormat, allowed: np.ndarray, c: dict[str, int], frac_out: int = 15) -> np.ndarray:
    """Softmax over the last axis of integer scores at fmt_in: int64 probabilities in [0, 2^frac_out] at frac_out.

    Max subtraction over the allowed keys, I-BERT's i-exp, an int32 sum (its bound Tk * iexp_max < 2^31 is
    checked), and one division per probability rounded half up: p = (e * 2^PF + sum / 2) // sum. A row with
    no allowed key is all zeros.
    """
    if c["frac_in"] != fmt_in.frac:
        raise InputError(f"i-exp constants for frac {c['frac_in']} applied to scores at {fmt_in}: rebuild them")
    if not 1 <= fmt_in.frac <= 15 or fmt_in.bits > 32:
        raise InputError(f"softmax input {fmt_in}: give at most 32 bits and 1..15 fraction bits")
    s = _check_ints("softmax scores", scores, fmt_in)
    Tk = s.shape[-1]
    if Tk * iexp_max(c) >= 2**31:
        raise InputError(f"softmax over {Tk} keys at {fmt_in} could overflow its int32 sum: use fewer fraction bits")
    allowed = np.broadcast_to(allowed, s.shape)
    m = np.max(np.where(allowed, s, np.iinfo(np.int64).min), axis=-1, keepdims=True)
    q = np.where(allowed, s - m, 0)  # <= 0 where allowed
    e = np.where(allowed, iexp(q, c), 0)
    total = np.sum(e, axis=-1, keepdims=True)  # fits int32 (checked above)
    safe = np.maximum(total, 1)
    return np.where(total > 0, ((e << frac_out) + safe // 2) // safe, 0)


def softmax_int_ref(row: list[int], allowed: list[bool], c: dict[str, int], frac_out: int = 15) -> list[int]:
    """One row of softmax_int in plain Python ints (the definition)."""
    keep = [v for v, a in zip(row, allowed) if a]
    if not keep:
        return [0] * len(row)
    m = max(keep)
    e = []
    for v, a in zip(row, allowed):
        if not a:
            e.append(0)
            continue
        z = (m - v) // c["q_ln2"]
        qp = v - m + z * c["q_ln2"]
        e.append(((qp + c["q_b"]) ** 2 + c["q_c"]) >> min(z, 63))
    total = sum(e)
    return [((x << frac_out) + total // 2) // total for x in e]


# ---- SiLU by table ----

def silu_table(in_scale: float, fmt_out: FixedFormat) -> np.ndarray:
    """256 entries: table[i] = to_fixed(silu((i - 128) * in_scale), fmt_out), in float64 (calibration)."""
    x = np.arange(-128, 128, dtype=np.float64) * in_scale
    return to_fixed(x / (1.0 + np.exp(-x)), fmt_out)


def silu_int8(x, table: np.ndarray, fmt_out: FixedFormat) -> np.ndarray:
    """SiLU of int8 x by lookup: table[x + 128] (int64)."""
    t = check_table("silu table", table, (256,), fmt_out)
    return t[_check_ints("silu input", x, FixedFormat(8, 0)) + 128]


# ---- RoPE with Q1.14 tables ----

def rope_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin as Q1.14 int16 (P, Dh/2) for positions (P,), from float32 inv_freq (common/rope.py's,
    with the model's scaling, llama3 included): the float32 angle as the model computes it, then
    cos/sin rounded half even to 14 fraction bits (calibration)."""
    cos, sin = rope_cos_sin(np.asarray(positions)[None, :], inv_freq)  # (1, P, Dh/2) float32
    fmt = FixedFormat(16, ROPE_FRAC)
    return to_fixed(cos[0], fmt).astype(np.int16), to_fixed(sin[0], fmt).astype(np.int16)


def apply_rope_int(x, fmt_x: FixedFormat, cos_q: np.ndarray, sin_q: np.ndarray) -> np.ndarray:
    """Rotate pairs (j, j + Dh/2) (HF rotate-half): x (B, T, H, Dh) in fmt_x, cos_q/sin_q (B, T, Dh/2) Q1.14
    gathered at each token's position -> (B, T, H, Dh) in fmt_x, rounded half up, saturated (int64)."""
    x = _check_ints("rope input", x, fmt_x)
    if fmt_x.bits > 32:
        raise InputError(f"rope input {fmt_x}: at most 32 bits")
    half = x.shape[-1] // 2
    fmt_t = FixedFormat(16, ROPE_FRAC)
    c = check_table("rope cos table", cos_q, x.shape[:2] + (half,), fmt_t)[:, :, None, :]  # (B, T, 1, Dh/2)
    s = check_table("rope sin table", sin_q, x.shape[:2] + (half,), fmt_t)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]  # (B, T, H, Dh/2) each; int32 x Q1.14 -> int64
    y1 = rounding_right_shift_half_up(x1 * c - x2 * s, ROPE_FRAC)
    y2 = rounding_right_shift_half_up(x2 * c + x1 * s, ROPE_FRAC)
    return saturate(np.concatenate([y1, y2], axis=-1), fmt_x.bits)


# ---- residual add ----

def align(x: np.ndarray, frac_from: int, frac_to: int) -> np.ndarray:
    """Change fraction bits: exact left shift up, rounding half up down (int64; no saturation here)."""
    if frac_to >= frac_from:
        return x << (frac_to - frac_from)
    return rounding_right_shift_half_up(x, frac_from - frac_to)


def add_int(a, fmt_a: FixedFormat, b, fmt_b: FixedFormat, fmt_out: FixedFormat) -> np.ndarray:
    """Residual add: both aligned to fmt_out's frac, summed in int64, saturated to fmt_out's bits."""
    for f in (fmt_a, fmt_b, fmt_out):
        if f.bits > 32 or abs(fmt_out.frac - f.frac) > 30:
            raise InputError(f"residual add {f}: at most 32 bits and 30 fraction bits apart")
    a, b = _check_ints("add input a", a, fmt_a), _check_ints("add input b", b, fmt_b)
    return saturate(align(a, fmt_a.frac, fmt_out.frac) + align(b, fmt_b.frac, fmt_out.frac), fmt_out.bits)


# ---- the ZK preset ----

ZK_FRAC = 16
ZK_FORMAT = FixedFormat(64, ZK_FRAC)
# zkLLM's convention: every tensor an int64 at scale 2^16. The rounding of each op, stated:
ZK_PRESET = {
    "input, weights, tables": "to_fixed: round half even of x * 2^16, int64",
    "matmul, elementwise product": "int64 product at 2^32, then rounding_right_shift_half_up by 16",
    "add": "exact (same scale)",
    "silu": "a lookup table over the observed integer input range, entries to_fixed",
    "exp, rsqrt": "softmax_int's i-exp and rms_norm_int's isqrt, inputs aligned down to their formats",
}


def zk_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Product of two ZK tensors (scale 2^16) back to scale 2^16: (a * b) >>r 16. Inputs must be < 2^31
    in magnitude so the int64 product cannot overflow (checked)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if max(np.abs(a).max(initial=0), np.abs(b).max(initial=0)) >= 2**31:
        raise InputError("ZK product inputs must be below 2^31 in magnitude (32767 at scale 2^16)")
    return rounding_right_shift_half_up(a * b, ZK_FRAC)
