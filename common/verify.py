"""How far a recomputed quantity is from the model's own, and whether that is close enough."""
from __future__ import annotations

import math

import numpy as np

QUANTITIES = ("q", "k", "v", "attn")

# Written into report.md and report.json, so the numbers there say what they mean.
DEFINITION = """Over the real (non-padding) token rows only, for one layer and one quantity (q, k, v, attn):

    max_abs = max |a - r|                 (elementwise, a = recomputed, r = the model's ref_ file)
    scale   = max |r|
    max_rel = max_abs / scale             (relative to the largest reference value)
    PASS   <=> max_abs <= ATOL + RTOL * scale

max_rel is relative to the quantity's scale rather than elementwise: an elementwise |a-r|/|r| blows
up wherever r crosses zero and says nothing. fp32 recomputation lands near 1e-7..1e-6; any real
mistake (RoPE layout, scaling, head mapping, a missing bias) lands near 1e-2..1.
NaN or inf anywhere in the compared rows is a FAIL.
"""


def compare(actual: np.ndarray, ref: np.ndarray, real_rows: np.ndarray, atol: float, rtol: float) -> dict:
    """Error metrics of `actual` vs `ref` (both (B*T, n)) over rows where real_rows (B*T,) is true."""
    if actual.shape != ref.shape:
        raise ValueError(f"shapes differ: recomputed {actual.shape}, reference {ref.shape}")
    a = actual[real_rows].astype(np.float64)
    r = ref[real_rows].astype(np.float64)
    if a.size == 0:
        raise ValueError("no real tokens to compare (the attention mask is all padding)")
    finite = bool(np.isfinite(a).all() and np.isfinite(r).all())
    diff = np.abs(a - r)
    max_abs = float(diff.max()) if finite else math.nan
    scale = float(np.abs(r).max()) if finite else math.nan
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    passed = finite and max_abs <= atol + rtol * scale
    # Where the worst element is, so a failure can be looked at: (row, column) in the CSV.
    worst = np.unravel_index(int(np.argmax(np.where(np.isfinite(diff), diff, np.inf))), diff.shape)
    worst_row = int(np.flatnonzero(real_rows)[worst[0]])
    return {"max_abs": max_abs, "max_rel": max_rel, "max_ref": scale, "tol": atol + rtol * scale,
            "pass": bool(passed), "worst_row": worst_row, "worst_col": int(worst[1])}
