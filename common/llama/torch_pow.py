"""torch's float32 `base ** exponent` on the CPU, bit for bit, in numpy (no torch).

transformers' RoPE frequencies are `theta ** exponent` with a Python float theta and a float32
exponent tensor: torch rounds theta to float32 and runs its pow kernel (ATen PowKernel.cpp,
cpu_kernel_vec). That kernel's vectorized_loop takes 2 * Vec::size() elements per step through the
SIMD pow, SLEEF's Sleef_powf{8,16}_u10 (1 ulp, not correctly rounded), and the remainder one by one
through std::pow(float, float), i.e. the C library's powf (glibc's: < 1 ulp, also not always
correctly rounded). Which element takes which path depends on the array's length and on the CPU:
Vec::size() is 16 floats under torch's AVX512 kernels, 8 under AVX2; the DEFAULT kernels have no
SIMD pow at all (every element through powf). So one frequency can differ by an ulp from one machine
to the next, and from the correctly rounded power.

Mirrored here: `sleef_powf_u10` is a numpy port of SLEEF's xpowf (sleefsimdsp.c: logkf, expkf and the
double-float helpers of dfsp.h, FMA variant as built for AVX2/AVX512), SLEEF (c) Naoki Shibata and
contributors, Boost Software License 1.0, for a normal float32 base > 0; `libm_powf` calls the C
library's own powf through ctypes (the standard library's, so step 3 stays free of torch).
Checked against torch 2.13 on this machine (glibc 2.36) under AVX512, and under AVX2 and DEFAULT
(ATEN_CPU_CAPABILITY), for every head_dim 16..256 and dozens of thetas: equal bit for bit
(tests/test_long_positions.py). A step 3 on another C library may differ on the tail's powf; its
comparison with the model's recorded frequencies says so (common/check/offline.py, rope_check).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import numpy as np

f32, f64 = np.float32, np.float64

# torch.backends.cpu.get_cpu_capability() -> floats per Vectorized<float>; 0: no SIMD pow. x86 only:
# other CPUs (ARM's NEON/SVE kernels) have their own vectors, unverified here.
LANES = {"AVX512": 16, "AVX2": 8, "DEFAULT": 0}


def lanes_of(capability: str | None) -> int:
    """Floats per SIMD pow step under a torch CPU capability; None: the capability torch has here."""
    return LANES.get(capability or local_capability(), 0)


def torch_powf(base: float, exponent: np.ndarray, lanes: int) -> np.ndarray:
    """float32(base) ** exponent as torch's CPU kernel with `lanes` floats per vector computes it. (n,)"""
    exponent = np.asarray(exponent, f32)
    block = 2 * lanes  # vectorized_loop's step: two vectors at a time
    vec = exponent.size // block * block if block else 0
    if not np.finfo(f32).tiny <= f32(base) < np.inf:  # outside the port (no RoPE has such a theta)
        vec = 0
    return np.concatenate([sleef_powf_u10(f32(base), exponent[:vec]), libm_powf(f32(base), exponent[vec:])])


@functools.cache
def _libm():
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    lib.powf.restype, lib.powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    return lib


def libm_powf(base: np.float32, exponent: np.ndarray) -> np.ndarray:
    """The C library's powf, element by element (std::pow(float, float) in torch's scalar loop)."""
    lib = _libm()
    if lib is None:  # no C library to ask: the correctly rounded power, which it nearly always equals
        return (f64(base) ** exponent.astype(f64)).astype(f32)
    return np.array([lib.powf(float(base), float(e)) for e in exponent], f32)


@functools.cache
def local_capability() -> str:
    """The CPU capability torch would pick here, without importing torch (Linux x86; else DEFAULT).

    ATen's rule (cpu/Utils.cpp, DispatchStub.cpp): ATEN_CPU_CAPABILITY if set, else AVX512 with
    avx512f/vl/bw/dq and fma, else AVX2 with avx2 and fma, else DEFAULT.
    """
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").upper()
    if forced in LANES:
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "DEFAULT"
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"} <= set(flags):
        return "AVX512"
    return "AVX2" if {"avx2", "fma"} <= set(flags) else "DEFAULT"


# --- SLEEF's powf, 1-ulp version, in float32 numpy --------------------------------------------------
# Pairs (hi, lo) are double-float numbers: hi + lo with |lo| <= ulp(hi) / 2. Every operation below is
# one float32 operation of SLEEF's code, in its order; fma() is the FMA instruction.

def fma(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32: the float64 product is exact, the sum is rounded to odd
    (no double-rounding error) before the final rounding to float32."""
    p, c = np.asarray(a, f32).astype(f64) * np.asarray(b, f32).astype(f64), np.asarray(c, f32).astype(f64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly (TwoSum)
    inexact_even = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(inexact_even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(f32)


def _add2_ff(x, y):  # dfadd2_vf2_vf_vf
    s = x + y
    v = s - x
    return s, (x - (s - v)) + (y - v)


def _add_22(x, y):  # dfadd_vf2_vf2_vf2 (|x| >= |y|)
    s = x[0] + y[0]
    return s, (((x[0] - s) + y[0]) + x[1]) + y[1]


def _add2_22(x, y):  # dfadd2_vf2_vf2_vf2
    s = x[0] + y[0]
    v = s - x[0]
    return s, ((x[0] - (s - v)) + (y[0] - v)) + (x[1] + y[1])


def _add2_2f(x, y):  # dfadd2_vf2_vf2_vf
    s = x[0] + y
    v = s - x[0]
    return s, ((x[0] - (s - v)) + (y - v)) + x[1]


def _add_f2(x, y):  # dfadd_vf2_vf_vf2
    s = x + y[0]
    return s, ((x - s) + y[0]) + y[1]


def _normalize(x):
    s = x[0] + x[1]
    return s, (x[0] - s) + x[1]


def _div(n, d):  # dfdiv_vf2_vf2_vf2, FMA variant
    t = f32(1) / d[0]
    s = n[0] * t
    u = fma(t, n[0], -s)
    v = fma(-d[1], t, fma(-d[0], t, f32(1)))
    return s, fma(s, v, fma(n[1], t, u))


def _squ(x):  # dfsqu_vf2_vf2
    s = x[0] * x[0]
    return s, fma(x[0] + x[0], x[1], fma(x[0], x[0], -s))


def _mul_22(x, y):  # dfmul_vf2_vf2_vf2
    s = x[0] * y[0]
    return s, fma(x[0], y[1], fma(x[1], y[0], fma(x[0], y[0], -s)))


def _mul_2f(x, y):  # dfmul_vf2_vf2_vf
    s = x[0] * y
    return s, fma(x[1], y, fma(x[0], y, -s))


def _logkf(d: np.ndarray):
    """log(d) as a double-float, d > 0 normal: d = m 2^e with m in [0.75, 1.5), log m by atanh series."""
    e = ((np.asarray(d * f32(1 / 0.75), f32).view(np.int32) >> 23) & 0xFF) - 0x7F
    m = np.ldexp(d, -e).astype(f32)
    x = _div(_add2_ff(f32(-1), m), _add2_ff(f32(1), m))
    x2 = _squ(x)
    t = f32(0.240320354700088500976562)
    t = fma(t, x2[0], f32(0.285112679004669189453125))
    t = fma(t, x2[0], f32(0.400007992982864379882812))
    c = (f32(0.66666662693023681640625), f32(3.69183861259614332084311e-09))
    s = _mul_2f((f32(0.69314718246459960938), f32(-1.904654323148236017e-09)), e.astype(f32))
    s = _add_22(s, (x[0] * f32(2), x[1] * f32(2)))
    return _add_22(s, _mul_22(_mul_22(x2, x), _add2_22(_mul_2f(x2, t), c)))


def _expkf(d) -> np.ndarray:
    """exp of a double-float: d = q ln2 + s, exp(s) by a degree-5 polynomial, times 2^q."""
    q = np.rint((d[0] + d[1]) * f32(1.442695040888963407359924681001892137426645954152985934135449406931))
    s = _add2_2f(d, q.astype(f32) * f32(-0.693145751953125))
    s = _add2_2f(s, q.astype(f32) * f32(-1.428606765330187045e-06))
    s = _normalize(s)
    u = f32(0.00136324646882712841033936)
    u = fma(u, s[0], f32(0.00836596917361021041870117))
    u = fma(u, s[0], f32(0.0416710823774337768554688))
    u = fma(u, s[0], f32(0.166665524244308471679688))
    u = fma(u, s[0], f32(0.499999850988388061523438))
    t = _add_f2(f32(1), _add_22(s, _mul_2f(_squ(s), u)))
    u = np.where(d[0] < f32(-104), f32(0), t[0] + t[1])
    return np.ldexp(u, q.astype(np.int32)).astype(f32)


def sleef_powf_u10(base: np.float32, exponent: np.ndarray) -> np.ndarray:
    """Sleef_powf_u10 for a normal float32 base > 0 (RoPE's theta) and finite exponents: exp(y log x). (n,)"""
    if exponent.size and not (np.finfo(f32).tiny <= base < np.inf and np.isfinite(exponent).all()):
        raise ValueError(f"sleef_powf_u10 mirrors a normal base > 0 and finite exponents only (base {base})")
    with np.errstate(over="ignore", under="ignore"):
        y = np.asarray(exponent, f32)
        log_x = _logkf(np.full(y.shape, base, f32))
        r = _expkf(_mul_2f(log_x, y))
        # SLEEF's special cases that a positive finite base can reach: y == 0 or x == 1 give 1,
        # overflow gives inf.
        r = np.where(np.isnan(r), f32(np.inf), r)
        return np.where((y == 0) | (base == 1), f32(1), r).astype(f32)
