"""Integer nonlinear ops (common/quant/fixedpoint.py) against the float32 math of common/: measured error
bounds asserted in LSBs, numpy bit for bit with the plain-Python-int references, and planted mistakes
(an exp table of the wrong scale, a shift off by one, a missing saturation, RoPE tables without the
llama3 scaling, a SiLU table of the wrong scale) that must FAIL the same bound."""
from __future__ import annotations

import math

import numpy as np
import pytest

from common.llama import rope
from common.llama.attention import softmax
from common.cli import InputError
from common.llama.mlp import silu
from common.llama.norm import rms_norm
from common.quant import fixedpoint as fp
from common.quant.fixedpoint import FixedFormat

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _lsb_error(q, fmt, ref) -> float:
    return float(np.max(np.abs(fp.from_fixed(q, fmt) - ref)) * 2.0**fmt.frac)


def test_choose_format():
    assert fp.choose_format(-3.2, 5.1, 8) == FixedFormat(8, 4)  # 5.1 * 16 = 82 <= 127; * 32 = 163 > 127
    assert fp.choose_format(-128.0, 127.0, 8) == FixedFormat(8, 0)
    assert fp.choose_format(0.0, 0.001, 16, max_frac=20) == FixedFormat(16, 20)
    for lo, hi, bits in ((-1000.0, 1000.0, 8), (0.0, 40000.0, 16), (float("nan"), 1.0, 8), (2.0, 1.0, 8)):
        with pytest.raises(InputError) as e:
            fp.choose_format(lo, hi, bits)
        assert "\n" not in str(e.value)


def test_isqrt_and_bit_length_exact():
    rng = np.random.default_rng(0)
    n = np.concatenate([np.array([0, 1, 2, 3, 4, 15, 16, 17, 2**62 - 1, 2**62, 2**63 - 1, (2**31 - 1)**2,
                                  (2**31 - 1)**2 - 1]), rng.integers(0, 2**63 - 1, 5000), rng.integers(0, 2**20, 5000)])
    np.testing.assert_array_equal(fp.isqrt_floor(n), [math.isqrt(int(v)) for v in n])
    np.testing.assert_array_equal(fp.bit_length(n), [int(v).bit_length() for v in n])


def _rms_case():
    rng = np.random.default_rng(1)
    fx, fg = FixedFormat(16, 8), FixedFormat(16, 12)
    x = rng.normal(0, 1, (6, 96)) * np.array([0.05, 0.5, 1, 4, 20, 100])[:, None]  # tiny to saturating rows
    xq = fp.to_fixed(x, fx)
    gq = fp.to_fixed(rng.normal(1, 0.4, 96), fg)
    return xq, fx, gq, fg


@pytest.mark.parametrize("fmt_out", [FixedFormat(16, 10), FixedFormat(8, 4)])
def test_rms_norm_int(fmt_out):
    xq, fx, gq, fg = _rms_case()
    eps_q = fp.rmsnorm_eps(1e-5, fx)
    y = fp.rms_norm_int(xq, fx, gq, fg, eps_q, fmt_out)
    for row, yr in zip(xq, y):
        assert yr.tolist() == fp.rms_norm_int_ref(row.tolist(), fx.frac, gq.tolist(), fg.frac, eps_q, fmt_out.frac,
                                                  fmt_out.bits)
    ref = rms_norm(fp.from_fixed(xq, fx).astype(np.float32), fp.from_fixed(gq, fg).astype(np.float32),
                   eps_q * 2.0**(-2 * fx.frac))
    ref = np.clip(ref, fmt_out.lo * 2.0**-fmt_out.frac, fmt_out.hi * 2.0**-fmt_out.frac)
    err = _lsb_error(y, fmt_out, ref)
    print(f"rmsnorm {fmt_out}: max error {err:.4f} LSB")
    assert err <= 0.52  # the output's own rounding (0.5 LSB) + x/rms at frac 16 and float32 reference
    # planted: the final shift off by one (output read one fraction bit off)
    wrong = fp.rms_norm_int(xq, fx, gq, fg, eps_q, FixedFormat(fmt_out.bits, fmt_out.frac + 1))
    assert _lsb_error(wrong, fmt_out, ref) > 2


def _scores():
    rng = np.random.default_rng(2)
    fmt = FixedFormat(32, 10)
    s = fp.to_fixed(rng.normal(0, 3, (4, 24, 24)), fmt)
    allowed = np.tril(np.ones((24, 24), dtype=bool))[None]  # causal
    return s, fmt, np.broadcast_to(allowed, s.shape)


def test_softmax_int():
    s, fmt, allowed = _scores()
    c = fp.iexp_constants(fmt.frac)
    p = fp.softmax_int(s, fmt, allowed, c)
    for row, a, pr in zip(s.reshape(-1, 24)[:30], allowed.reshape(-1, 24)[:30], p.reshape(-1, 24)[:30]):
        assert pr.tolist() == fp.softmax_int_ref(row.tolist(), a.tolist(), c)
    ref = softmax(fp.from_fixed(s, fmt).astype(np.float32), allowed)
    err = float(np.max(np.abs(p * 2.0**-15 - ref)))
    print(f"softmax (i-exp, frac 10 in, frac 15 out): max abs error {err:.2e}")
    assert err < 4e-3
    assert np.all(p[~allowed] == 0)
    # planted: an exp table of the wrong scale (constants for 2^-11 applied to scores at 2^-10)
    wrong = dict(fp.iexp_constants(fmt.frac + 1), frac_in=fmt.frac)
    assert float(np.max(np.abs(fp.softmax_int(s, fmt, allowed, wrong) * 2.0**-15 - ref))) > 4e-3
    with pytest.raises(InputError):  # honestly labelled, the wrong scale is refused
        fp.softmax_int(s, fmt, allowed, fp.iexp_constants(fmt.frac + 1))


def test_softmax_int32_sum_bound():
    fmt = FixedFormat(32, 15)
    c = fp.iexp_constants(15)
    with pytest.raises(InputError):
        fp.softmax_int(np.zeros((1, 2048), dtype=np.int64), fmt, np.ones((1, 2048), dtype=bool), c)


def test_silu_table():
    scale, fmt_out = 0.05, FixedFormat(16, 10)
    table = fp.silu_table(scale, fmt_out)
    x = np.arange(-128, 128)
    ref = silu((x * scale).astype(np.float32))
    err = _lsb_error(fp.silu_int8(x, table, fmt_out), fmt_out, ref)
    print(f"silu table: max error {err:.4f} LSB")
    assert err <= 0.501
    assert _lsb_error(fp.silu_int8(x, fp.silu_table(2 * scale, fmt_out), fmt_out), fmt_out, ref) > 2  # planted
    for bad in (table[:255], table.astype(np.float64), np.full(256, 2**20)):
        with pytest.raises(InputError) as e:
            fp.silu_int8(x, bad, fmt_out)
        assert "silu table" in str(e.value)


def _rope_case():
    rng = np.random.default_rng(3)
    Dh, H = 64, 2
    positions = np.array([0, 1, 7, 300, 1500, 3000, 8000, 20000])
    fmt = FixedFormat(16, 8)
    x = fp.to_fixed(rng.normal(0, 20, (1, len(positions), H, Dh)), fmt)
    inv_freq = rope.rope_inv_freq(Dh, 500000.0, LLAMA3, lanes=0)
    cos, sin = rope.rope_cos_sin(positions[None], inv_freq)
    ref = rope.apply_rope(fp.from_fixed(x, fmt).astype(np.float32), cos, sin)
    return positions, fmt, x, Dh, ref


def test_rope_int_with_llama3_scaling():
    positions, fmt, x, Dh, ref = _rope_case()
    cos_q, sin_q = fp.rope_tables(positions, rope.rope_inv_freq(Dh, 500000.0, LLAMA3, lanes=0))
    assert cos_q.dtype == np.int16 and cos_q.shape == (len(positions), Dh // 2) and cos_q[0, 0] == 2**14
    err = _lsb_error(fp.apply_rope_int(x, fmt, cos_q[None], sin_q[None]), fmt, ref)
    print(f"rope Q1.14: max error {err:.4f} LSB")
    half = Dh // 2
    table_bound = float(np.max(np.abs(x[..., :half]) + np.abs(x[..., half:]))) * 2.0**-15  # |x1| + |x2| times 2^-15
    assert err <= 0.5 + table_bound + 1e-3  # the output's rounding + the Q1.14 tables' rounding
    # planted: tables without the llama3 scaling
    cos_p, sin_p = fp.rope_tables(positions, rope.default_inv_freq(Dh, 500000.0, lanes=0))
    assert _lsb_error(fp.apply_rope_int(x, fmt, cos_p[None], sin_p[None]), fmt, ref) > 100
    with pytest.raises(InputError):
        fp.apply_rope_int(x, fmt, cos_q[None, :-1], sin_q[None, :-1])  # a table of the wrong length


def test_rope_saturates():
    fmt = FixedFormat(8, 0)
    x = np.array([127, 127], dtype=np.int64).reshape(1, 1, 1, 2)  # rotated by pi/4: 179.6 -> 127, not a wrap
    c = s = np.full((1, 1, 1), round(math.sqrt(0.5) * 2**14), dtype=np.int64)
    assert fp.apply_rope_int(x, fmt, c, s).ravel().tolist() == [0, 127]


def test_residual_add():
    rng = np.random.default_rng(4)
    fa, fb, fo = FixedFormat(16, 8), FixedFormat(16, 11), FixedFormat(16, 8)
    a = rng.integers(fa.lo, fa.hi + 1, 5000)
    b = rng.integers(fb.lo, fb.hi + 1, 5000)
    y = fp.add_int(a, fa, b, fb, fo)
    exact = np.clip(fp.from_fixed(a, fa) + fp.from_fixed(b, fb), fo.lo / 256, fo.hi / 256)
    err = _lsb_error(y, fo, exact)
    assert err <= 0.5 and np.any(y == fo.hi) and np.any(y == fo.lo)
    wrapped = ((fp.align(a, 8, 8) + fp.align(b, 11, 8) + 2**15) & 0xFFFF) - 2**15  # planted: no saturation
    assert _lsb_error(wrapped, fo, exact) > 2
    np.testing.assert_array_equal(fp.add_int(a, fa, a, fa, FixedFormat(32, 10)), a * 8)  # exact left shift


def test_zk_preset():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 10, 1000), rng.normal(0, 10, 1000)
    qa, qb = fp.to_fixed(a, fp.ZK_FORMAT), fp.to_fixed(b, fp.ZK_FORMAT)
    err = _lsb_error(fp.zk_mul(qa, qb), fp.ZK_FORMAT, fp.from_fixed(qa, fp.ZK_FORMAT) * fp.from_fixed(qb, fp.ZK_FORMAT))
    assert err <= 0.5
    with pytest.raises(InputError):
        fp.zk_mul(np.array([2**31]), np.array([1]))


def _float_uses(op) -> list[str]:
    """True divisions, float constants and float names (dtypes, exp, sqrt, ...) in a function's body."""
    import ast
    import inspect
    import textwrap
    fn = ast.parse(textwrap.dedent(inspect.getsource(op))).body[0]
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # without the docstring
    banned = ("float", "float32", "float64", "exp", "sqrt", "log", "rint", "round", "cos", "sin")
    found = []
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Div) or (isinstance(node, ast.Constant) and isinstance(node.value, float)):
            found.append(ast.dump(node))
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in banned:
            found.append(name)
    return found


def test_integer_path_has_no_float():
    """Every op that runs after calibration is integers only."""
    from common.quant import requant as rq
    ops = [rq.saturate, rq.rounding_right_shift_half_up, rq.requantize_single, rq.requantize_double, rq.requantize,
           rq.saturating_rounding_doubling_high_mul, rq.rounding_divide_by_pot, rq.check_acc, rq.check_multiplier,
           fp.isqrt_floor, fp.bit_length, fp.rms_norm_int, fp.iexp, fp.softmax_int, fp.silu_int8,
           fp.apply_rope_int, fp.align, fp.add_int, fp.zk_mul, fp.check_table]
    for op in ops:
        assert _float_uses(op) == [], op.__name__

    def planted(x):  # a division that would make floats
        return np.asarray(x) / 2
    assert _float_uses(planted)
