"""How far a recomputed quantity is from the model's own, and whether that is close enough."""
from __future__ import annotations

import math

import numpy as np

QUANTITIES = ("xnorm", "q", "k", "v", "probs", "attn")  # step 3's checks, in forward order
COMPARE_ROWS = 256  # rows compared at a time

# Written into report.md and report.json, so the numbers there say what they mean.
DEFINITION = """Over the real (non-padding) token rows only, for one layer and one quantity (xnorm, q, k, v,
probs, attn; probs rows are the real query rows of every head):

    max_abs = max |a - r|                 (elementwise, a = recomputed, r = the model's file: ref_*, or
                                           step 2's xnorm_layerN.csv for xnorm)
    scale   = max |r|
    max_rel = max_abs / scale             (relative to the largest reference value)
    PASS   <=> max_abs <= ATOL + RTOL * scale

max_rel is relative to the quantity's scale rather than elementwise: an elementwise |a-r|/|r| blows
up wherever r crosses zero and says nothing. fp32 recomputation lands near 1e-7..1e-6; any real
mistake (RoPE layout, scaling, head mapping, a missing bias, a (1 + w) norm) lands near 1e-2..1.
NaN or inf anywhere in the compared rows is a FAIL.
"""


LOW_PRECISION_ERROR = {"bfloat16": 1e-2, "float16": 1e-3}  # roughly what a capture in that dtype is off by


def low_precision_note(dtype: str, rtol: float) -> str | None:
    """The line a step prints when the references were not computed in float32 (None when they were)."""
    if dtype == "float32":
        return None
    return (f"note: the references were computed in {dtype}, this recomputation is float32: expect errors "
            f"near {LOW_PRECISION_ERROR.get(dtype, 1e-2):g}, far above RTOL {rtol:g} (which is for float32 captures)")


def compare(actual: np.ndarray, ref: np.ndarray, real_rows: np.ndarray, atol: float, rtol: float) -> dict:
    """Error metrics of `actual` vs `ref` (both (B*T, n)) over rows where real_rows (B*T,) is true."""
    if actual.shape != ref.shape:
        raise ValueError(f"shapes differ: recomputed {actual.shape}, reference {ref.shape}")
    rows = np.flatnonzero(real_rows)
    if rows.size == 0:
        raise ValueError("no real tokens to compare (the attention mask is all padding)")
    max_abs, scale, finite, worst = 0.0, 0.0, True, (int(rows[0]), 0)
    for i in range(0, rows.size, COMPARE_ROWS):  # float64 copies of a long prompt's rows would be GBs
        idx = rows[i:i + COMPARE_ROWS]
        a, r = actual[idx].astype(np.float64), ref[idx].astype(np.float64)
        diff = np.abs(a - r)
        diff[~np.isfinite(diff)] = np.inf  # NaN or inf anywhere: the worst element
        finite = finite and bool(np.isfinite(diff).all())
        scale = max(scale, float(np.abs(r).max()))
        # Where the worst element is (the first, if several), so a failure can be looked at.
        k = int(np.argmax(diff))
        if i == 0 or diff.flat[k] > max_abs:
            max_abs, worst = float(diff.flat[k]), (int(idx[k // diff.shape[1]]), k % diff.shape[1])
    if not finite:
        max_abs = scale = math.nan
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = finite and max_abs <= atol + rtol * scale
    return {"max_abs": max_abs, "max_rel": max_rel, "max_ref": scale, "tol": atol + rtol * scale,
            "pass": bool(passed), "worst_row": worst[0], "worst_col": int(worst[1])}
