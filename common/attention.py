"""Llama's attention block from its inputs, written from the equations, in float32 numpy.

    q = xnorm Wq^T (+ bq),  k = xnorm Wk^T (+ bk),  v = xnorm Wv^T (+ bv)
    q, k = rope(q), rope(k)                      (common.rope, rotate-half layout)
    query head h reads KV head h // (H / Hkv)   (grouped-query attention)
    p = softmax(q k^T / sqrt(Dh) + mask)         (causal by index, padded keys masked)
    attn = concat_h(p v) Wo^T (+ bo)

No transformers here: this is the independent recomputation that step 3 checks the model against.
Names: B prompts, T tokens, H query heads, Hkv key/value heads, Dh head size, d model size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common import rope  # called as rope.f(...) so that tests can swap one equation for a buggy one


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's q/k/v/o_proj, in the checkpoint's (out_features, in_features) layout."""
    wq: np.ndarray  # (H*Dh, d)
    wk: np.ndarray  # (Hkv*Dh, d)
    wv: np.ndarray  # (Hkv*Dh, d)
    wo: np.ndarray  # (d, H*Dh)
    bq: np.ndarray | None = None  # (H*Dh,) when attention_bias
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x W^T (+ b), as torch.nn.Linear: x (N, in), w (out, in) -> (N, out)."""
    y = x @ w.T
    return y if b is None else y + b


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """(B, T, Hkv, Dh) -> (B, T, Hkv*n_rep, Dh), KV head g repeated so query head h reads head h // n_rep."""
    return np.repeat(x, n_rep, axis=2)


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    """GQA needs whole groups: every KV head serves num_heads / num_kv_heads query heads."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")


def attention_allowed(attention_mask: np.ndarray) -> np.ndarray:
    """Which key each query may see: causal by index (j <= i) and not padding. (B, T) -> (B, T, T) bool."""
    T = attention_mask.shape[1]
    causal = np.tril(np.ones((T, T), dtype=bool))  # (T_query, T_key)
    return causal[None, :, :] & (attention_mask[:, None, :] > 0)


def softmax(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the last axis among allowed entries; a row with nothing allowed gives all zeros."""
    s = np.where(allowed, scores, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(np.float32)  # rows with nothing allowed: avoid inf - inf
    e = np.exp(s - m)  # exp(-inf) = 0 for masked entries
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scaled dot-product attention with GQA.

    q (B, T, H, Dh), k/v (B, T, Hkv, Dh), allowed (B, T, T) -> context (B, T, H, Dh), probs (B, H, T, T).
    """
    H, Hkv, Dh = q.shape[2], k.shape[2], q.shape[3]
    k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)  # (B, T, H, Dh)
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, Dh)
    scores = (qh @ kh.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(Dh))  # (B, H, T, T)
    probs = softmax(scores, allowed[:, None, :, :])
    context = probs @ vh  # (B, H, T, Dh)
    return context.transpose(0, 2, 1, 3), probs  # (B, T, H, Dh)


def attention_block(xnorm: np.ndarray, w: AttentionWeights, position_ids: np.ndarray, attention_mask: np.ndarray,
                    num_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float,
                    rope_scaling: dict | None) -> dict[str, np.ndarray]:
    """Recompute one layer's attention from its normalised input.

    xnorm (B*T, d) batch-major; position_ids, attention_mask (B, T). Returns q (B*T, H*Dh) and
    k, v (B*T, Hkv*Dh) after RoPE (v has none), head-major columns (h*Dh + j) like the model's
    projections; attn (B*T, d) after o_proj; probs (B, H, T, T).
    """
    B, T = attention_mask.shape
    H, Hkv, Dh = num_heads, num_kv_heads, head_dim
    check_heads(H, Hkv)
    q = linear(xnorm, w.wq, w.bq).reshape(B, T, H, Dh)  # (B*T, H*Dh) -> (B, T, H, Dh)
    k = linear(xnorm, w.wk, w.bk).reshape(B, T, Hkv, Dh)  # (B*T, Hkv*Dh) -> (B, T, Hkv, Dh)
    v = linear(xnorm, w.wv, w.bv).reshape(B, T, Hkv, Dh)
    cos, sin = rope.rope_cos_sin(position_ids, rope.rope_inv_freq(Dh, rope_theta, rope_scaling))
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    context, probs = attention(q, k, v, attention_allowed(attention_mask))
    attn = linear(context.reshape(B * T, H * Dh), w.wo, w.bo)  # (B, T, H, Dh) -> (B*T, H*Dh) -> (B*T, d)
    return {"q": q.reshape(B * T, H * Dh), "k": k.reshape(B * T, Hkv * Dh), "v": v.reshape(B * T, Hkv * Dh),
            "attn": attn, "probs": probs}
