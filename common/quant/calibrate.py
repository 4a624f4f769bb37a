"""Calibration of the integer-only forward: every tensor's format, every requantization multiplier and
every table, chosen once from the float captures of step 2 (and the weights' int8 scales of step 1).

This is the only place floats meet the integer path (besides the final dequantize for the report):
it reads float32 ranges and scales and returns a plain dict of integers, formats and the float scales
they came from (for the record), which common/quant/integer_forward.py then runs without a float.

    activation (linear input)        s = amax / (2^(b-1) - 1) over every captured real row, q = x / s;
                                     b = ACT_BITS for xnorm, hnorm, ctx, act, up; 8 for q, k, v, gate
    residual stream x, h, out        Q(RESIDUAL_BITS, f), f = choose_format over the captured range
    linear output -> next int8       M, shift = quantize_multiplier(s_in s_w[n] / s_out)   per channel n
    linear output -> residual        M, shift = quantize_multiplier(s_in s_w[n] 2^f_out)     f_out capped so it is < 1
    norm gamma                       gamma / s_out as Q(16, f_g): the norm's output IS the linear's input
    scores                           Q(32, f_s): f_s the most that holds the range, keeps the int32 sum of
                                     softmax (Tk iexp_max < 2^31) and a right shift of the q.k accumulator
    silu                             a table over the 256 int8 gate values, Q(16, f) out
    rope                             cos/sin Q1.14 per position (fixedpoint.rope_tables, the model's scaling)

A range that no format of its bits can hold is an InputError naming the tensor and layer.
The ZK preset (calibrate_zk_*) needs far less: the norms' input formats, softmax's, 1/sqrt(Dh) and the
SiLU table over the gate range seen; its weights are q * scale at 2^16 (zk_weight).
"""
from __future__ import annotations

import math

import numpy as np

from common.cli import InputError
from common.quant import fixedpoint as fp
from common.quant.requant import check_multiplier, quantize_multiplier
from common.quant.zk_forward import ZK_SILU_IN_FRAC

RESIDUAL_BITS = 24  # x, h, out and the linears' outputs added to them (rms_norm_int takes at most 24)
GAMMA_BITS = 16  # RMSNorm weights divided by the output's int8 scale
SILU_BITS = 16  # the SiLU table's entries
LOGIT_BITS = 32  # the head's output
ACT_BITS = 16  # the linears' inputs (xnorm, hnorm, ctx, act) and up: 8 keeps the top-1 in layer mode only (docs/integer.md)
WIDE = ("xnorm", "hnorm", "ctx", "act", "up")  # at ACT_BITS; q, k, v and gate (the SiLU table's input) int8
COARSE_BITS = 8  # calibrated ranges are rounded up to this many significant bits (coarse_up)
PROBS_FRAC = 15  # softmax probabilities Q0.15
MAX_SCORE_FRAC = 15  # softmax_int takes 1..15 fraction bits


def fmt_record(f: fp.FixedFormat) -> list[int]:
    return [f.bits, f.frac]


def fmt_of(rec) -> fp.FixedFormat:
    return fp.FixedFormat(int(rec[0]), int(rec[1]))


def coarse_up(v: float) -> float:
    """|v| rounded away from zero to COARSE_BITS significant bits: a range computed in float (BLAS, SIMD
    sums) differs by an ulp from machine to machine, and an ulp must not change a scale, a format or a
    multiplier, so that the integer outputs are the same bytes everywhere."""
    if v == 0 or not math.isfinite(v):
        return v
    m, e = math.frexp(abs(v))  # |v| = m 2^e, m in [0.5, 1)
    return math.copysign(math.ldexp(math.ceil(m * 2**COARSE_BITS) / 2**COARSE_BITS, e), v)


def amax(a: np.ndarray) -> float:
    return coarse_up(float(np.max(np.abs(a)))) if a.size else 0.0


def act_scale(name: str, a: np.ndarray, bits: int = 8) -> float:
    """The activation scale amax / (2^(bits-1) - 1) (amax 0 -> 1: an all-zero tensor)."""
    m = amax(a)
    if not math.isfinite(m):
        raise InputError(f"{name}: captured values are not finite: capture again")
    return m / (2**(bits - 1) - 1) if m > 0 else 1.0


def fmt_for(name: str, a: np.ndarray, bits: int, max_frac: int = 31) -> fp.FixedFormat:
    """The format of `bits` bits holding a's captured range, else InputError naming the tensor."""
    lo, hi = (coarse_up(float(a.min())), coarse_up(float(a.max()))) if a.size else (0.0, 0.0)
    try:
        return fp.choose_format(lo, hi, bits, max_frac)
    except InputError as e:
        raise InputError(f"{name}: {e}") from None


def frac_cap(real: np.ndarray) -> int:
    """The most fraction bits f with max(real) 2^f < 1: a requantization to f bits is a right shift."""
    return -math.floor(math.log2(float(np.max(real)))) - 1


def multipliers(name: str, real: np.ndarray) -> dict:
    """Per-channel (or scalar) M and shift of quantize_multiplier, with the float scale they stand for."""
    pairs = []
    for r in np.atleast_1d(np.asarray(real, dtype=np.float64)):
        try:
            pairs.append(quantize_multiplier(float(r)))
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
    return {"M": [m for m, _ in pairs], "shift": [s for _, s in pairs]}


def to_residual(name: str, real_unit: np.ndarray, out: np.ndarray) -> tuple[fp.FixedFormat, dict]:
    """A linear whose output joins the residual stream: Q(RESIDUAL_BITS, f) holding `out`'s range, f capped so
    that every channel's s_in s_w[n] 2^f < 1 (one right shift); its multipliers."""
    f = fmt_for(name, out, RESIDUAL_BITS)
    frac = min(f.frac, frac_cap(real_unit))
    fmt = fp.FixedFormat(RESIDUAL_BITS, frac)
    return fmt, multipliers(name, real_unit * 2.0**frac)


def norm_gamma(name: str, gamma: np.ndarray, s_out: float) -> dict:
    """RMSNorm's weight divided by its output's int8 scale, as Q(GAMMA_BITS, f_g)."""
    g = gamma.astype(np.float64) / s_out
    fmt = fmt_for(name, g, GAMMA_BITS)
    return {"gamma": fp.to_fixed(g, fmt).tolist(), "fmt_gamma": fmt_record(fmt), "scale_out": s_out}


def score_frac(name: str, scores: np.ndarray, unit: float, Tk: int) -> int:
    """Fraction bits of the softmax input: the most that hold the range, keep softmax's int32 sum and
    keep the q.k requantization a right shift."""
    f = min(fmt_for(name, scores, 32, MAX_SCORE_FRAC).frac, frac_cap(np.array([unit])))
    while f >= 1 and Tk * fp.iexp_max(fp.iexp_constants(f)) >= 2**31:
        f -= 1
    if f < 1:
        raise InputError(f"{name}: no score format with 1..{MAX_SCORE_FRAC} fraction bits fits {Tk} keys and the "
                         f"q.k scale {unit:.3g}: capture a shorter prompt")
    return f


def calibrate_layer(n: int, c: dict, w: dict, eps: float, Dh: int, Tk: int) -> dict:
    """One layer's record from its float captures `c` (x, xnorm, q, k, v, ctx, scores, attn, h, hnorm, gate,
    up, act, mlp, out: real rows; scores: the allowed ones) and weights `w` (gamma_in, gamma_post, and
    (q int8, scale) of each linear); Tk keys per softmax row."""
    L = f"layer {n}"
    fx, fh = fmt_for(f"x {L}", c["x"], RESIDUAL_BITS), fmt_for(f"h {L}", c["h"], RESIDUAL_BITS)
    fout = fmt_for(f"out {L}", c["out"], RESIDUAL_BITS)
    s = {k: act_scale(f"{k} {L}", c[k], ACT_BITS if k in WIDE else 8) for k in ("xnorm", "v", "ctx", "hnorm", "gate",
                                                                                 "up", "act")}
    # RoPE rotates pairs: q and k take the scale of the largest pair norm, which rotation keeps.
    for k in ("q", "k"):
        pairs = c[k].reshape(c[k].shape[0], -1, 2, Dh // 2)  # (rows, H*Dh) -> (rows, H, 2, Dh/2): (j, j + Dh/2)
        s[k] = act_scale(f"{k} {L}", np.sqrt((pairs.astype(np.float64) ** 2).sum(axis=2)))
    sw = {p: w[p][1].reshape(-1).astype(np.float64) for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj")}
    unit = s["q"] * s["k"] / math.sqrt(Dh)  # one LSB of the q.k accumulator, in score units
    fs = score_frac(f"scores {L}", c["scores"], unit, Tk)
    fmt_attn, m_o = to_residual(f"attn {L}", s["ctx"] * sw["o_proj"], c["attn"])
    fmt_mlp, m_d = to_residual(f"mlp {L}", s["act"] * sw["down_proj"], c["mlp"])
    gate_values = np.arange(-128, 128, dtype=np.float64) * s["gate"]
    fmt_silu = fmt_for(f"silu table {L}", gate_values / (1.0 + np.exp(-gate_values)), SILU_BITS)
    return {
        "layer": n, "act_bits": ACT_BITS, "fmt_x": fmt_record(fx), "fmt_h": fmt_record(fh), "fmt_out": fmt_record(fout),
        "fmt_attn": fmt_record(fmt_attn), "fmt_mlp": fmt_record(fmt_mlp), "fmt_scores": [32, fs],
        "fmt_silu": fmt_record(fmt_silu), "scales": s,
        "eps_x": fp.rmsnorm_eps(eps, fx), "eps_h": fp.rmsnorm_eps(eps, fh),
        "input_norm": norm_gamma(f"input_layernorm {L}", w["gamma_in"], s["xnorm"]),
        "post_norm": norm_gamma(f"post_attention_layernorm {L}", w["gamma_post"], s["hnorm"]),
        "requant": {
            "q_proj": multipliers(f"q_proj {L}", s["xnorm"] * sw["q_proj"] / s["q"]),
            "k_proj": multipliers(f"k_proj {L}", s["xnorm"] * sw["k_proj"] / s["k"]),
            "v_proj": multipliers(f"v_proj {L}", s["xnorm"] * sw["v_proj"] / s["v"]),
            "scores": multipliers(f"scores {L}", np.array([unit * 2.0**fs])),
            "ctx": multipliers(f"ctx {L}", np.array([2.0**-PROBS_FRAC * s["v"] / s["ctx"]])),
            "o_proj": m_o,
            "gate_proj": multipliers(f"gate_proj {L}", s["hnorm"] * sw["gate_proj"] / s["gate"]),
            "up_proj": multipliers(f"up_proj {L}", s["hnorm"] * sw["up_proj"] / s["up"]),
            "act": multipliers(f"act {L}", np.array([2.0**-fmt_silu.frac * s["up"] / s["act"]])),
            "down_proj": m_d,
        },
        "iexp": fp.iexp_constants(fs),
        "silu_table": fp.silu_table(s["gate"], fmt_silu).tolist(),
    }


def calibrate_head(x_last: np.ndarray, norm: np.ndarray, logits: np.ndarray, gamma: np.ndarray, sw: np.ndarray,
                   eps: float) -> dict:
    """The final norm and the head: the last layer's out format, norm's scale (ACT_BITS), logits Q(32, f)."""
    fx = fmt_for("out of the last layer", x_last, RESIDUAL_BITS)
    s_norm = act_scale("norm", norm, ACT_BITS)
    frac = min(fmt_for("logits", logits, LOGIT_BITS).frac, frac_cap(s_norm * sw))
    fmt_logits = fp.FixedFormat(LOGIT_BITS, frac)
    m = multipliers("logits", s_norm * sw * 2.0**frac)
    return {"act_bits": ACT_BITS, "fmt_x": fmt_record(fx), "eps_x": fp.rmsnorm_eps(eps, fx),
            "norm": norm_gamma("model.norm", gamma, s_norm),
            "fmt_logits": fmt_record(fmt_logits), "requant": {"head": m}}


def check_record(rec: dict, where: str) -> None:
    """A calibration read back from JSON: every multiplier and shift in range (InputError naming it)."""
    for name, ms in rec["requant"].items():
        if not isinstance(ms, dict) or "M" not in ms or "shift" not in ms:
            raise InputError(f"{where} {name}: lacks M or shift: rebuild it (run without --calibration)")
        try:
            check_multiplier(np.array(ms["M"]), np.array(ms["shift"]))
        except InputError as e:
            raise InputError(f"{where} {name}: {e}") from None


# --- the ZK preset (common/quant/zk_forward.py): every tensor at 2^16 ----------------------------

ZK_NORM_BITS = 24  # rms_norm_int's input, aligned down from 2^16 as the range needs


def zk_weight(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """An int8 weight's real values q * scale (float64, exact) at 2^16, half even: int64 (N, K)."""
    return fp.to_fixed(q.astype(np.float64) * scale.astype(np.float64), fp.ZK_FORMAT)


def zk_norm(name: str, x: np.ndarray, gamma: np.ndarray, eps: float) -> dict:
    fmt = fmt_for(name, x, ZK_NORM_BITS, fp.ZK_FRAC)
    return {"fmt_in": fmt_record(fmt), "eps": fp.rmsnorm_eps(eps, fmt),
            "gamma": fp.to_fixed(gamma, fp.FixedFormat(32, fp.ZK_FRAC)).tolist()}


def calibrate_zk_layer(n: int, c: dict, w: dict, eps: float, Dh: int, Tk: int) -> dict:
    """One layer of the ZK preset: the norms' input formats, softmax's input format, 1/sqrt(Dh) at 2^16 and
    the SiLU table over the gate range the captures show (at ZK_SILU_IN_FRAC index bits)."""
    L = f"layer {n}"
    fs = score_frac(f"scores {L}", c["scores"], 2.0**-fp.ZK_FRAC, Tk)
    lo = math.floor(coarse_up(float(c["gate"].min())) * 2**ZK_SILU_IN_FRAC)
    hi = math.ceil(coarse_up(float(c["gate"].max())) * 2**ZK_SILU_IN_FRAC)
    g = np.arange(lo, hi + 1, dtype=np.float64) * 2.0**-ZK_SILU_IN_FRAC
    return {"layer": n, "preset": "zk", "input_norm": zk_norm(f"x {L}", c["x"], w["gamma_in"], eps),
            "post_norm": zk_norm(f"h {L}", c["h"], w["gamma_post"], eps),
            "inv_sqrt_dh": int(np.rint(2.0**fp.ZK_FRAC / math.sqrt(Dh))), "fmt_scores": [32, fs],
            "iexp": fp.iexp_constants(fs), "silu_lo": lo,
            "silu_table": fp.to_fixed(g / (1.0 + np.exp(-g)), fp.ZK_FORMAT).tolist(), "requant": {}}


def calibrate_zk_head(x_last: np.ndarray, gamma: np.ndarray, eps: float) -> dict:
    return {"preset": "zk", "norm": zk_norm("out of the last layer", x_last, gamma, eps), "requant": {}}


# --- a record read back from calibration.json: its shape checked at the door ---------------------

LAYER_KEYS = {"int8": ("layer", "act_bits", "fmt_x", "fmt_h", "fmt_out", "fmt_attn", "fmt_mlp", "fmt_scores", "fmt_silu",
                       "scales", "eps_x", "eps_h", "input_norm", "post_norm", "requant", "iexp"),
              "zk": ("layer", "input_norm", "post_norm", "inv_sqrt_dh", "fmt_scores", "iexp", "silu_lo", "silu_len")}
HEAD_KEYS = {"int8": ("act_bits", "fmt_x", "eps_x", "norm", "fmt_logits", "requant"), "zk": ("norm",)}
REQUANTS = ("q_proj", "k_proj", "v_proj", "scores", "ctx", "o_proj", "gate_proj", "up_proj", "act", "down_proj")


def check_shape(rec, keys: tuple[str, ...], where: str) -> None:
    """Every key present; every fmt_* a [bits, frac] pair of integers a format can have; act_bits 8..16."""
    if not isinstance(rec, dict) or any(k not in rec for k in keys):
        missing = [k for k in keys if not isinstance(rec, dict) or k not in rec]
        raise InputError(f"{where}: lacks {', '.join(missing)}: rebuild it (run without --calibration)")
    fmts = [(k, v) for k, v in rec.items() if k.startswith("fmt_")]
    fmts += [(f"{k}.{kk}", vv) for k, v in rec.items() if isinstance(v, dict) for kk, vv in v.items() if kk.startswith("fmt_")]
    for k, v in fmts:
        if not (isinstance(v, list) and len(v) == 2 and all(type(i) is int for i in v) and 2 <= v[0] <= 64
                and 0 <= v[1] <= 62):
            raise InputError(f"{where}: {k} {v!r} is not a format [bits 2..64, frac 0..62]: rebuild it")
    if "act_bits" in rec and rec["act_bits"] not in range(8, 17):
        raise InputError(f"{where}: act_bits {rec['act_bits']!r}: give 8..16")


def check_layer_record(L, preset: str, where: str) -> None:
    check_shape(L, LAYER_KEYS[preset], where)
    norm_keys = ("gamma", "fmt_gamma", "scale_out") if preset == "int8" else ("gamma", "fmt_in", "eps")
    for norm in ("input_norm", "post_norm"):
        check_shape(L[norm], norm_keys, f"{where} {norm}")
    if preset == "int8":
        check_shape(L["requant"], REQUANTS, f"{where} requant")
        check_record(L, where)
