"""The ZK preset of the integer-only forward: zkLLM's convention, every tensor an int64 at scale 2^16.

The same layer as common/quant/integer_forward.py with another rounding and format set (docs/integer.md):
weights, inputs and tables enter by to_fixed (half even, at calibration); a product of two tensors is
exact in int64 at 2^32 and comes back by >>r 16 (rounding_right_shift_half_up); adds are exact; the
nonlinear ops are the fixed-point ones, each input aligned to the format its algorithm takes, and SiLU
is a lookup table over the integer range the calibration saw (at ZK_SILU_IN_FRAC input bits; an index
outside it is clamped, explicitly). Matmuls are int64 numpy (exact, no BLAS; the bound
max|x| max|w| K < 2^63 is checked).

    xnorm  = rms_norm_int(x >>r (16 - f_x), gamma) at 2^16          x aligned to Q(24, f_x) first
    q, k, v = (xnorm W^T) >>r 16;  q, k = apply_rope_int(q, k)       Q1.14 tables
    scores = ((q k^T >>r 16) inv_sqrt_dh) >>r 16;  probs = softmax_int(scores >>r (16 - f_s), frac_out 16)
    ctx    = (probs v) >>r 16;  attn = (ctx Wo^T) >>r 16;  h = x + attn
    act    = (silu_table[clamp(gate >>r (16 - 8)) - lo] up) >>r 16;  mlp = (act Wd^T) >>r 16;  out = h + mlp
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.cli import InputError
from common.llama.attention import attention_allowed
from common.quant import fixedpoint as fp
from common.quant.integer_forward import Shape, seen
from common.quant.requant import rounding_right_shift_half_up

ZK = fp.ZK_FORMAT  # Q(64, 16)
ZK_SILU_IN_FRAC = 8  # the SiLU table's index: gate at 2^8
ZK_NORM_OUT = fp.FixedFormat(32, fp.ZK_FRAC)  # a norm's output: |y| < 2^15 at 2^16

ZK_ROUNDING = {
    "float -> int (calibration: x at the door, weights q * scale, gammas, tables)": "to_fixed: half even at 2^16",
    "matmul, elementwise product": "exact int64 at 2^32, then >>r 16 (half up); matmul bound checked",
    "add": "exact (same scale)",
    "rmsnorm": "x >>r to Q(24, f) (half up, saturate), then rms_norm_int (fixedpoint) out at 2^16",
    "softmax": "scores >>r to Q(32, f_s) (half up, saturate), softmax_int (I-BERT i-exp), probs at 2^16",
    "scores": "(q k^T >>r 16) * round_half_even(2^16 / sqrt(Dh)) >>r 16",
    "silu": "gate >>r 8 (half up), index clamped to the calibrated range, table entries half even at 2^16",
    "rope": "Q1.14 tables, >>r 14 (half up), saturate to 32 bits",
}


@dataclass(frozen=True)
class ZkLayer:
    w: dict  # linear name -> int64 (N, K) at 2^16
    gamma_in: np.ndarray  # int64 (d,) at 2^16
    gamma_post: np.ndarray
    fmt_norm_x: fp.FixedFormat  # x aligned into Q(24, f) for rms_norm_int
    fmt_norm_h: fp.FixedFormat
    eps_x: int
    eps_h: int
    inv_sqrt_dh: int  # round_half_even(2^16 / sqrt(Dh))
    fmt_scores: fp.FixedFormat  # softmax's input Q(32, f_s)
    iexp: dict
    silu_lo: int  # the table's first index (gate at 2^ZK_SILU_IN_FRAC)
    silu_table: np.ndarray  # int64 at 2^16


def matmul_zk(x: np.ndarray, w: np.ndarray, name: str) -> np.ndarray:
    """(M, K) x (N, K) at 2^16 -> (M, N) at 2^16: the int64 sum at 2^32 (exact, checked), >>r 16."""
    bound = int(np.abs(x).max(initial=0)) * int(np.abs(w).max(initial=0)) * x.shape[-1]  # a Python int
    if bound >= 2**63:
        raise InputError(f"{name}: the int64 sum could overflow (bound {bound}): the ZK preset cannot hold it")
    return rounding_right_shift_half_up(np.matmul(x, w.T), fp.ZK_FRAC)


def mul_zk(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise product at 2^16 (fixedpoint.zk_mul: inputs below 2^31, checked)."""
    return fp.zk_mul(a, b)


def norm_zk(x: np.ndarray, fmt_in: fp.FixedFormat, gamma: np.ndarray, eps_q: int) -> np.ndarray:
    """RMSNorm of a 2^16 tensor: aligned to fmt_in (at most 24 bits, saturated), then rms_norm_int at 2^16."""
    xa = fp.saturate(fp.align(x, fp.ZK_FRAC, fmt_in.frac), fmt_in.bits)
    return fp.rms_norm_int(xa, fmt_in, gamma, ZK_NORM_OUT, eps_q, ZK_NORM_OUT)


def silu_zk(gate: np.ndarray, Z: ZkLayer) -> np.ndarray:
    """Lookup over the calibrated index range: gate >>r (16 - 8), clamped to [lo, lo + len - 1], table[i - lo]."""
    i = rounding_right_shift_half_up(gate, fp.ZK_FRAC - ZK_SILU_IN_FRAC)
    i = np.clip(i, Z.silu_lo, Z.silu_lo + len(Z.silu_table) - 1)  # explicit saturation of the index
    return Z.silu_table[i - Z.silu_lo]


def layer_zk(x: np.ndarray, Z: ZkLayer, cos_q: np.ndarray, sin_q: np.ndarray, mask: np.ndarray, s: Shape,
             ranges: dict) -> dict[str, np.ndarray]:
    """x (B*T, d) at 2^16 -> every node at 2^16 (probs at 2^16 in [0, 2^16]), int64."""
    B, T, H, Hkv, Dh = s.B, s.T, s.H, s.Hkv, s.Dh
    seen(ranges, "rmsnorm x", x)
    xnorm = norm_zk(x, Z.fmt_norm_x, Z.gamma_in, Z.eps_x)
    q = matmul_zk(xnorm, Z.w["q_proj"], "q_proj").reshape(B, T, H, Dh)  # (B*T, H*Dh) -> (B, T, H, Dh)
    k = matmul_zk(xnorm, Z.w["k_proj"], "k_proj").reshape(B, T, Hkv, Dh)
    v = matmul_zk(xnorm, Z.w["v_proj"], "v_proj").reshape(B, T, Hkv, Dh)
    seen(ranges, "rope q, k", np.concatenate([q.ravel(), k.ravel()]))
    fmt_rope = fp.FixedFormat(32, fp.ZK_FRAC)
    q, k = fp.apply_rope_int(q, fmt_rope, cos_q, sin_q), fp.apply_rope_int(k, fmt_rope, cos_q, sin_q)
    rep = H // Hkv
    qh = q.transpose(0, 2, 1, 3)  # (B, H, T, Dh)
    kh = np.repeat(k, rep, axis=2).transpose(0, 2, 1, 3)
    vh = np.repeat(v, rep, axis=2).transpose(0, 2, 1, 3)
    dots = rounding_right_shift_half_up(np.matmul(qh, kh.transpose(0, 1, 3, 2)), fp.ZK_FRAC)  # (B, H, T, T) at 2^16
    scores = rounding_right_shift_half_up(dots * Z.inv_sqrt_dh, fp.ZK_FRAC)
    allowed = attention_allowed(mask)[:, None]
    sa = fp.saturate(fp.align(scores, fp.ZK_FRAC, Z.fmt_scores.frac), Z.fmt_scores.bits)  # softmax's input format
    allowed_all = np.broadcast_to(allowed, sa.shape)
    m = np.max(np.where(allowed_all, sa, np.iinfo(np.int32).min), axis=-1, keepdims=True)
    seen(ranges, "softmax (scores - max)", (sa - m)[allowed_all])
    probs = fp.softmax_int(sa, Z.fmt_scores, allowed, Z.iexp, fp.ZK_FRAC)  # [0, 2^16]
    ctx = rounding_right_shift_half_up(np.matmul(probs, vh), fp.ZK_FRAC)  # (B, H, T, Dh)
    ctx = ctx.transpose(0, 2, 1, 3).reshape(B * T, H * Dh)  # (B, H, T, Dh) -> (B*T, H*Dh)
    attn = matmul_zk(ctx, Z.w["o_proj"], "o_proj")
    h = x + attn  # exact: same scale
    seen(ranges, "rmsnorm h", h)
    hnorm = norm_zk(h, Z.fmt_norm_h, Z.gamma_post, Z.eps_h)
    gate = matmul_zk(hnorm, Z.w["gate_proj"], "gate_proj")
    up = matmul_zk(hnorm, Z.w["up_proj"], "up_proj")
    seen(ranges, "silu", rounding_right_shift_half_up(gate, fp.ZK_FRAC - ZK_SILU_IN_FRAC))
    act = mul_zk(silu_zk(gate, Z), up)
    mlp = matmul_zk(act, Z.w["down_proj"], "down_proj")
    return {"x": x, "xnorm": xnorm, "q": q.reshape(B * T, H * Dh), "k": k.reshape(B * T, Hkv * Dh),
            "v": v.reshape(B * T, Hkv * Dh), "scores": scores, "probs": probs, "ctx": ctx, "attn": attn, "h": h,
            "hnorm": hnorm, "gate": gate, "up": up, "act": act, "mlp": mlp, "out": h + mlp}


def head_zk(x: np.ndarray, fmt_in: fp.FixedFormat, gamma: np.ndarray, eps_q: int, w: np.ndarray,
            rows: np.ndarray | None, ranges: dict) -> dict[str, np.ndarray]:
    """The last layer's out at 2^16 -> norm and logits (of `rows`, None: all) at 2^16."""
    seen(ranges, "rmsnorm final", x)
    norm = norm_zk(x, fmt_in, gamma, eps_q)
    picked = norm if rows is None else norm[rows]
    return {"norm": norm, "logits": matmul_zk(picked, w, "head")}
