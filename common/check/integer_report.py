"""Step 4 --integer-only's report: each integer node as the real numbers it stands for, against the float32
references of step 2 (SQNR, NMSE, cosine, max_abs per node and layer; at the logits KL, top-1, top-5).

Floats here are the report's only: nothing computed in this module feeds the integer path.
"""
from __future__ import annotations

import math

import numpy as np

from common.llama import forward
from common.quant import calibrate as cal
from common.quant import fixedpoint as fp
from common.quant import integer_forward as ifw


def dequantize(node: str, q: np.ndarray, L: dict, preset: str = "int8") -> np.ndarray:
    """An integer node as the real numbers it stands for (float64, for the report only)."""
    if preset == "zk":
        return fp.from_fixed(q, fp.ZK_FORMAT)
    s = L["scales"]
    if node in ("xnorm", "q", "k", "v", "ctx", "hnorm", "gate", "up", "act"):
        return q * s[node]
    if node == "probs":
        return q * 2.0**-ifw.PROBS_FRAC
    return fp.from_fixed(q, cal.fmt_of(L[f"fmt_{node}"]))


def metrics(ours: np.ndarray, ref: np.ndarray) -> dict:
    """SQNR (dB), NMSE, cosine and max_abs of ours against the float reference."""
    o, r = np.asarray(ours, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    err, power = float(np.sum((o - r) ** 2)), float(np.sum(r ** 2))
    norm = math.sqrt(float(np.sum(o ** 2)) * power)
    return {"sqnr_db": 10 * math.log10(power / err) if err > 0 else math.inf, "nmse": err / power if power else 0.0,
            "cosine": float(np.dot(o, r)) / norm if norm else 1.0, "max_abs": float(np.max(np.abs(o - r), initial=0.0))}


def node_metrics(nodes: dict, L: dict, c: dict, real_rows: np.ndarray, seen_scores: np.ndarray, preset: str) -> dict:
    out = {}
    for node in ifw.INT_NODES:
        if node not in c:
            continue
        ours, ref = dequantize(node, nodes[node], L, preset), c[node]
        if node in ("scores", "probs"):  # the entries softmax reads: allowed keys of real queries
            ours, ref = ours.reshape(seen_scores.shape)[seen_scores], ref.reshape(seen_scores.shape)[seen_scores]
        else:
            ours, ref = ours[real_rows], ref[real_rows]
        out[node] = metrics(ours, ref)
    return out


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logit_metrics(ours: np.ndarray, ref: np.ndarray, last: np.ndarray) -> dict:
    """KL(ref || ours), top-1 agreement, top-5 overlap at each prompt's last position (rows `last` of both)."""
    o, r = ours[last].astype(np.float64), ref[last].astype(np.float64)
    lp, lq = log_softmax(r), log_softmax(o)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    top1 = forward.top_k(o, 1)[:, 0] == forward.top_k(r, 1)[:, 0]
    top5 = [len(set(a) & set(b)) / 5 for a, b in zip(forward.top_k(o, 5).tolist(), forward.top_k(r, 5).tolist())]
    return {**metrics(o, r), "kl": kl, "top1_agree": int(top1.sum()), "prompts": len(last),
            "top1": top1.tolist(), "top5_overlap": float(np.mean(top5)),
            "ref_top1": forward.top_k(r, 1)[:, 0].tolist(), "int_top1": forward.top_k(o, 1)[:, 0].tolist()}


def report_markdown(settings: dict, report: dict, head: dict, passed: bool) -> str:
    lines = ["# Step 4 --integer-only: every node vs the float32 references", "",
             *(f"- {k}: {v}" for k, v in settings.items()), "",
             "SQNR in dB (higher is better) of each node per layer; the head's logits below.", "",
             "| layer | " + " | ".join(n for n in ifw.INT_NODES if n in report[0]) + " |",
             "|---" * (1 + len(report[0])) + "|"]
    for n, nodes in report.items():
        lines.append(f"| {n} | " + " | ".join(f"{m['sqnr_db']:.1f}" for m in nodes.values()) + " |")
    lm = head["logits"]
    lines += ["", f"norm: SQNR {head['norm']['sqnr_db']:.1f} dB, cosine {head['norm']['cosine']:.4f}",
              f"logits: SQNR {lm['sqnr_db']:.1f} dB, NMSE {lm['nmse']:.3g}, cosine {lm['cosine']:.4f}, "
              f"max_abs {lm['max_abs']:.3g}, KL {lm['kl']:.3g}, top-1 {lm['top1_agree']}/{lm['prompts']}, "
              f"top-5 overlap {lm['top5_overlap']:.2f}"
              + (f"; top-1 at every real position {lm['top1_every_position'][0]}/{lm['top1_every_position'][1]}"
                 if "top1_every_position" in lm else ""), "", f"**{'PASS' if passed else 'FAIL'}**", ""]
    return "\n".join(lines)
