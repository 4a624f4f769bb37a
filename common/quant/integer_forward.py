"""The integer-only Llama layer and head: every intermediate an integer array, every rounding named.

Formats, multipliers and tables come from calibration (common/quant/calibrate.py); after it nothing
here touches a float. A linear's input is an A-bit integer (A = act_bits: 16 by default, 8 for the
textbook int8 setting; one scale per tensor), its weight int8 per output channel, its accumulator int32
(intmm.int_matmul: exact, checked), requantized by `rule` ('single' default, or 'double',
common/quant/requant.py). q, k, v and gate are int8. Attention's q.k and p.v products are int64 numpy
matmuls (exact, no BLAS).

    xnorm  = rms_norm_int(x, gamma_in / s_xnorm) -> intA                     x Q(24, f_x)
    q, k   = apply_rope_int(requant(xnorm Wq^T), cos, sin) -> int8           Q1.14 tables per position
    v      = requant(xnorm Wv^T) -> int8
    scores = requant(q k^T) -> Q(32, f_s)                                    the 1/sqrt(Dh) is in M
    probs  = softmax_int(scores) -> Q0.15                                    I-BERT i-exp, causal + padding
    ctx    = requant(probs v) -> intA
    attn   = requant(ctx Wo^T) -> Q(24, f_attn)
    h      = add_int(x, attn) -> Q(24, f_h)                                  saturated
    hnorm  = rms_norm_int(h, gamma_post / s_hnorm) -> intA
    gate   = requant(hnorm Wg^T) -> int8;  up = requant(hnorm Wu^T) -> intA
    act    = requant(silu_table[gate + 128] up) -> intA                      int16 x intA -> int32
    mlp    = requant(act Wd^T) -> Q(24, f_mlp)
    out    = add_int(h, mlp) -> Q(24, f_out)
  head:
    norm   = rms_norm_int(out, gamma / s_norm) -> intA;  logits = requant(norm Wh^T) -> Q(32, f_l)
(requant(acc) = sat(requantize(acc, M[n], shift[n], rule)): one rounding ('single') or gemmlowp's two.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.cli import InputError
from common.llama.attention import attention_allowed
from common.quant import fixedpoint as fp
from common.quant.intmm import int_matmul
from common.quant.requant import requantize, saturate

INT8 = fp.FixedFormat(8, 0)  # q and k: the integer itself, its scale kept by calibration
PROBS_FRAC = 15
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The integer nodes of a layer, in forward order (ctx: the heads' outputs before o_proj).
INT_NODES = ("x", "xnorm", "q", "k", "v", "scores", "probs", "ctx", "attn", "h", "hnorm", "gate", "up", "act",
             "mlp", "out")
HEAD_NODES = ("norm", "logits")


@dataclass(frozen=True)
class Requant:
    M: np.ndarray  # int64 (N,) or (1,): in [2^30, 2^31)
    shift: np.ndarray  # int64, in [0, 31]


@dataclass(frozen=True)
class IntLayer:
    """One layer's integers: int8 weights (N, K), the calibrated record's formats, gammas, tables, multipliers."""
    w: dict  # linear name -> int8 (N, K)
    rq: dict  # q_proj, ..., scores, ctx, act, ... -> Requant
    fmt: dict  # x, h, out, attn, mlp, scores, silu, gamma_in, gamma_post -> FixedFormat
    gamma_in: np.ndarray  # int64 (d,)
    gamma_post: np.ndarray
    eps_x: int
    eps_h: int
    iexp: dict  # i-exp constants (integers)
    silu_table: np.ndarray  # int64 (256,)
    act_bits: int = 8  # the linears' inputs xnorm, hnorm, ctx, act and up; q, k, v, gate stay int8


@dataclass(frozen=True)
class IntHead:
    w: np.ndarray  # int8 (V, d)
    rq: Requant
    fmt_x: fp.FixedFormat
    gamma: np.ndarray
    fmt_gamma: fp.FixedFormat
    eps_x: int
    fmt_logits: fp.FixedFormat
    act_bits: int = 8


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    Hkv: int
    Dh: int


def requant(acc: np.ndarray, r: Requant, rule: str, bits: int = 8) -> np.ndarray:
    """int32 accumulators (..., N) -> signed `bits` integers with channel n's M and shift (int64)."""
    return requantize(acc, r.M, r.shift, rule, bits)


def linear_int(x: np.ndarray, w: np.ndarray, name: str) -> np.ndarray:
    """int8|int16 (M, K) x int8 (N, K) -> int32 (M, N) = x w^T, exact; InputError if a sum leaves int32."""
    small = np.int8 if x.min(initial=0) >= -128 and x.max(initial=0) <= 127 else np.int16  # x: saturated ints
    try:
        return int_matmul(x.astype(small), w)
    except OverflowError:
        raise InputError(f"{name}: an accumulator exceeds int32: calibrate with a smaller ACT_BITS") from None


def seen(ranges: dict, name: str, a: np.ndarray) -> None:
    """Record the integer input range an op actually saw (for table-based provers)."""
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        old = ranges.get(name)
        ranges[name] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]


def attention_int(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, L: IntLayer, s: Shape, rule: str,
                  ranges: dict) -> dict:
    """q (B, T, H, Dh), k/v (B, T, Hkv, Dh) int8 after RoPE -> scores, probs (B, H, T, T), ctx (B*T, H*Dh) int8."""
    rep = s.H // s.Hkv
    qh = q.transpose(0, 2, 1, 3)  # (B, T, H, Dh) -> (B, H, T, Dh)
    kh = np.repeat(k, rep, axis=2).transpose(0, 2, 1, 3)  # query head h reads KV head h // rep: (B, H, T, Dh)
    vh = np.repeat(v, rep, axis=2).transpose(0, 2, 1, 3)
    acc = np.matmul(qh, kh.transpose(0, 1, 3, 2))  # int8 x int8 summed over Dh in int64 (< 2^31): (B, H, T, T)
    scores = requant(acc, L.rq["scores"], rule, 32)  # Q(32, f_s), 1/sqrt(Dh) folded into M
    allowed = attention_allowed(mask)[:, None]  # (B, 1, T, T): causal and not padding
    allowed_all = np.broadcast_to(allowed, scores.shape)
    m = np.max(np.where(allowed_all, scores, np.iinfo(np.int32).min), axis=-1, keepdims=True)  # int32 min: no wrap
    seen(ranges, "softmax (scores - max)", (scores - m)[allowed_all])
    probs = fp.softmax_int(scores, L.fmt["scores"], allowed, L.iexp, PROBS_FRAC)  # int64 in [0, 2^15]
    ctx = np.matmul(probs, vh)  # Q0.15 x int8 summed over T in int64 (< 2^31): (B, H, T, Dh)
    ctx = ctx.transpose(0, 2, 1, 3).reshape(s.B * s.T, s.H * s.Dh)  # (B, H, T, Dh) -> (B*T, H*Dh)
    return {"scores": scores, "probs": probs, "ctx": requant(ctx, L.rq["ctx"], rule, L.act_bits)}


def layer_int(x: np.ndarray, L: IntLayer, cos_q: np.ndarray, sin_q: np.ndarray, mask: np.ndarray, s: Shape, rule: str,
              ranges: dict) -> dict[str, np.ndarray]:
    """x (B*T, d) in fmt x -> every node of INT_NODES (int64); cos_q/sin_q (B, T, Dh/2) Q1.14 at each token's position."""
    B, T, H, Hkv, Dh = s.B, s.T, s.H, s.Hkv, s.Dh
    seen(ranges, "rmsnorm x", x)
    A = fp.FixedFormat(L.act_bits, 0)  # a linear's input: the integer itself, its scale kept by calibration

    def linear(x_in: np.ndarray, p: str, bits: int = 8) -> np.ndarray:  # intA x int8 -> int32 -> requant to `bits`
        return requant(linear_int(x_in, L.w[p], p), L.rq[p], rule, bits)
    xnorm = fp.rms_norm_int(x, L.fmt["x"], L.gamma_in, L.fmt["gamma_in"], L.eps_x, A)
    q = linear(xnorm, "q_proj").reshape(B, T, H, Dh)  # (B*T, H*Dh) -> (B, T, H, Dh)
    k = linear(xnorm, "k_proj").reshape(B, T, Hkv, Dh)  # (B*T, Hkv*Dh) -> (B, T, Hkv, Dh)
    v = linear(xnorm, "v_proj").reshape(B, T, Hkv, Dh)
    seen(ranges, "rope q, k", np.concatenate([q.ravel(), k.ravel()]))
    q, k = fp.apply_rope_int(q, INT8, cos_q, sin_q), fp.apply_rope_int(k, INT8, cos_q, sin_q)  # int8, saturated
    a = attention_int(q, k, v, mask, L, s, rule, ranges)
    attn = linear(a["ctx"], "o_proj", L.fmt["attn"].bits)
    h = fp.add_int(x, L.fmt["x"], attn, L.fmt["attn"], L.fmt["h"])
    seen(ranges, "rmsnorm h", h)
    hnorm = fp.rms_norm_int(h, L.fmt["h"], L.gamma_post, L.fmt["gamma_post"], L.eps_h, A)
    gate, up = linear(hnorm, "gate_proj"), linear(hnorm, "up_proj", L.act_bits)
    seen(ranges, "silu", gate)
    silu = fp.silu_int8(gate, L.silu_table, L.fmt["silu"])  # int16 values, fmt silu
    act = requant(silu * up, L.rq["act"], rule, L.act_bits)  # int16 x intA -> int32 (< 2^30)
    mlp = linear(act, "down_proj", L.fmt["mlp"].bits)
    out = fp.add_int(h, L.fmt["h"], mlp, L.fmt["mlp"], L.fmt["out"])
    return {"x": x, "xnorm": xnorm, "q": q.reshape(B * T, H * Dh), "k": k.reshape(B * T, Hkv * Dh),
            "v": v.reshape(B * T, Hkv * Dh), **a, "attn": attn, "h": h, "hnorm": hnorm, "gate": gate, "up": up,
            "act": act, "mlp": mlp, "out": out}


def next_input(out: np.ndarray, fmt_out: fp.FixedFormat, fmt_x: fp.FixedFormat) -> np.ndarray:
    """Chain: a layer's out, aligned to the next layer's x format (rounding half up), saturated."""
    return saturate(fp.align(out, fmt_out.frac, fmt_x.frac), fmt_x.bits)


def head_int(x: np.ndarray, Hd: IntHead, rows: np.ndarray | None, rule: str, ranges: dict) -> dict[str, np.ndarray]:
    """The last layer's out (B*T, d) -> norm intA (B*T, d), logits Q(32, f_l) of `rows` (None: all)."""
    seen(ranges, "rmsnorm final", x)
    norm = fp.rms_norm_int(x, Hd.fmt_x, Hd.gamma, Hd.fmt_gamma, Hd.eps_x, fp.FixedFormat(Hd.act_bits, 0))
    picked = norm if rows is None else norm[rows]
    return {"norm": norm, "logits": requant(linear_int(picked, Hd.w, "head"), Hd.rq, rule, Hd.fmt_logits.bits)}


def rope_positions(cos_table: np.ndarray, sin_table: np.ndarray,
                   position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q1.14 tables (P, Dh/2) gathered at position_ids (B, T) -> (B, T, Dh/2) each."""
    return cos_table[position_ids], sin_table[position_ids]
