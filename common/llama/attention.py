"""Llama's attention block from its inputs, written from the equations, in float32 numpy.

    q = xnorm Wq^T (+ bq),  k = xnorm Wk^T (+ bk),  v = xnorm Wv^T (+ bv)
    q, k = rope(q), rope(k)                      (common.llama.rope, rotate-half layout)
    query head h reads KV head h // (H / Hkv)   (grouped-query attention)
    p = softmax(q k^T / sqrt(Dh) + mask)         (causal by index, padded keys masked;
                                                  QUERY_BLOCK query rows at a time)
    decode: k, v = concat(cache, new rows)       (the new queries are the last rows of the keys)
    attn = concat_h(p v) Wo^T (+ bo)

No transformers here: this is the independent recomputation that step 3 checks the model against.
Names: B prompts, T tokens, H query heads, Hkv key/value heads, Dh head size, d model size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.llama import rope  # called as rope.f(...) so that tests can swap one equation for a buggy one
from common.llama.spec import LayerSpec

# Query rows per block. Attention is computed QUERY_BLOCK rows at a time, so its memory is a few
# B x H x QUERY_BLOCK x T arrays, never the B x H x T x T score tensor (2.1 GB for one 4096-token
# prompt on Llama-3.2-1B's 32 heads): a long prompt runs in bounded memory, and every row is
# computed as in one T x T block. Small blocks stay in cache, but they are many small products,
# which OpenBLAS's threads slow down on a busy machine; there OPENBLAS_NUM_THREADS=1 helps
# (benchmarks/bench_long_prompt.py; figures in benchmarks/README.md).
QUERY_BLOCK = 32
# Above this many tokens the full probabilities (B*H*T x T values, keep_probs="all") are not kept
# or written: at 2048 tokens and 32 heads they are 134M values, ~1.7 GB of CSV per layer.
PROBS_MAX_SEQ_LEN = 1024


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
    """x W^T (+ b), as torch.nn.Linear: x (N, in), w (out, in) -> (N, out).
    A quantized weight (common.quant.linear.QuantWeight) computes itself, as the quantized model does."""
    if hasattr(w, "apply"):
        return w.apply(x, b)
    y = x @ w.T
    return y if b is None else y + b


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """(B, T, Hkv, Dh) -> (B, T, Hkv*n_rep, Dh), KV head g repeated so query head h reads head h // n_rep."""
    return np.repeat(x, n_rep, axis=2)


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    """GQA needs whole groups: every KV head serves num_heads / num_kv_heads query heads."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")


def attention_allowed(attention_mask: np.ndarray, rows: slice = slice(None), keys: int | None = None,
                      past: int = 0) -> np.ndarray:
    """Which key each query may see: causal by index (j <= i) and not padding.

    attention_mask (B, past + T) covers the keys: a KV cache of `past` rows, then the T queries' own.
    -> (B, t, n) bool for the query rows `rows` (of T) and the first n = keys keys; query i is key past + i.
    """
    T = attention_mask.shape[1] - past
    n = past + T if keys is None else keys
    i = past + np.arange(T)[rows]  # (t,) query indices among the keys
    causal = np.arange(n)[None, :] <= i[:, None]  # (t, n)
    return causal[None, :, :] & (attention_mask[:, None, :n] > 0)


def softmax(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the last axis among allowed entries; a row with nothing allowed gives all zeros.

    Works in place on `scores` (a fresh array per block): a block's few temporaries are its memory.
    """
    np.copyto(scores, -np.inf, where=~allowed)
    m = scores.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0  # rows with nothing allowed: avoid inf - inf
    e = np.exp(np.subtract(scores, m, out=scores), out=scores)  # exp(-inf) = 0 for masked entries
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, attention_mask: np.ndarray,
              keep_probs: str | tuple[int, int] | None = None, block: int | None = None):
    """Scaled dot-product attention with GQA, QUERY_BLOCK query rows at a time.

    q (B, T, H, Dh), k/v (B, Tk, Hkv, Dh), attention_mask (B, Tk) -> context (B, T, H, Dh), probs.
    Tk = T without a KV cache; with one (a decode step) the T queries are the last T keys.
    probs: None; with keep_probs="all" every head's (B, H, T, Tk); with keep_probs=(b, h) that
    prompt's and head's (T, Tk) only (what a plot needs). Only "all" ever holds B x H x T x Tk.
    """
    B, T, H, Dh = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    past = Tk - T  # KV-cache rows before the first query
    if attention_mask.shape[1] != Tk:
        raise ValueError(f"the mask covers {attention_mask.shape[1]} keys, the cache and the new rows are {Tk}")
    block = block or QUERY_BLOCK
    if keep_probs == "all" and T > PROBS_MAX_SEQ_LEN:
        raise ValueError(f"every head's probabilities of {T} tokens ({B * H * T * T * 4 / 1e9:.1f} GB): "
                         f"kept up to PROBS_MAX_SEQ_LEN = {PROBS_MAX_SEQ_LEN} tokens only")
    # Keys and values contiguous per head (and each query block below): BLAS multiplies those up to
    # three times faster than strided views.
    kh = np.ascontiguousarray(repeat_kv(k, H // Hkv).transpose(0, 2, 1, 3))  # (B, Tk, H, Dh) -> (B, H, Tk, Dh)
    vh = np.ascontiguousarray(repeat_kv(v, H // Hkv).transpose(0, 2, 1, 3))
    qh = q.transpose(0, 2, 1, 3)  # (B, H, T, Dh), a view
    scale = np.float32(1.0 / np.sqrt(Dh))
    context = np.empty((B, H, T, Dh), np.float32)
    probs = (np.zeros((B, H, T, Tk), np.float32) if keep_probs == "all"
             else np.zeros((T, Tk), np.float32) if keep_probs is not None else None)
    for s in range(0, T, block):
        rows = slice(s, min(s + block, T))
        n = past + rows.stop  # causal: the rows of this block see keys 0 .. past + rows.stop - 1 only
        q_rows = np.ascontiguousarray(qh[:, :, rows])  # (B, H, t, Dh)
        scores = (q_rows @ kh[:, :, :n].transpose(0, 1, 3, 2)) * scale  # (B, H, t, n)
        p = softmax(scores, attention_allowed(attention_mask, rows, n, past)[:, None])  # (B, H, t, n)
        context[:, :, rows] = p @ vh[:, :, :n]  # (B, H, t, Dh)
        if keep_probs == "all":
            probs[:, :, rows, :n] = p
        elif keep_probs is not None:
            probs[rows, :n] = p[keep_probs]
    return context.transpose(0, 2, 1, 3), probs  # (B, T, H, Dh)


def with_cache(past_kv: tuple[np.ndarray, np.ndarray] | None, k: np.ndarray, v: np.ndarray,
               attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keys and values the new queries attend to: the cache's (B, P, Hkv, Dh), then their own
    (B, T, Hkv, Dh); attention_mask (B, P + T) covers both. No cache: k, v as they are."""
    if past_kv is None:
        return k, v, attention_mask
    return np.concatenate([past_kv[0], k], axis=1), np.concatenate([past_kv[1], v], axis=1), attention_mask


def attention_block(xnorm: np.ndarray, w: AttentionWeights, layer: LayerSpec, positions: np.ndarray,
                    mask: np.ndarray, keep_probs: str | tuple[int, int] | None = None,
                    past_kv: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Recompute one layer's attention from its normalised input.

    xnorm (B*T, d) batch-major; positions (B, T); mask (B, T), or (B, P + T) with a
    KV cache past_kv = (k, v), each (B, P, Hkv, Dh) after RoPE: the keys of earlier tokens, which
    the new queries attend to before their own (a decode step: T = 1). Returns q (B*T, H*Dh) and
    k, v (B*T, Hkv*Dh) after RoPE (v has none) of the new rows only, head-major columns (h*Dh + j)
    like the model's projections; attn (B*T, d) after o_proj; probs as `attention` keeps them.
    layer: its heads and RoPE; layer.pow_lanes the capture machine's SIMD width for RoPE's pow
    (common/llama/rope.py, point 4; None: here's).
    """
    B, T = positions.shape
    H, Hkv, Dh = layer.num_heads, layer.num_kv_heads, layer.head_dim
    check_heads(H, Hkv)
    q = linear(xnorm, w.wq, w.bq).reshape(B, T, H, Dh)  # (B*T, H*Dh) -> (B, T, H, Dh)
    k = linear(xnorm, w.wk, w.bk).reshape(B, T, Hkv, Dh)  # (B*T, Hkv*Dh) -> (B, T, Hkv, Dh)
    v = linear(xnorm, w.wv, w.bv).reshape(B, T, Hkv, Dh)
    inv_freq = rope.rope_inv_freq(Dh, layer.rope_theta, layer.rope_scaling, layer.pow_lanes)
    cos, sin = rope.rope_cos_sin(positions, inv_freq)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    k_all, v_all, mask = with_cache(past_kv, k, v, mask)
    context, probs = attention(q, k_all, v_all, mask, keep_probs)  # over (B, P + T) keys
    attn = linear(context.reshape(B * T, H * Dh), w.wo, w.bo)  # (B, T, H, Dh) -> (B*T, H*Dh) -> (B*T, d)
    return {"q": q.reshape(B * T, H * Dh), "k": k.reshape(B * T, Hkv * Dh), "v": v.reshape(B * T, Hkv * Dh),
            "attn": attn, "probs": probs}
