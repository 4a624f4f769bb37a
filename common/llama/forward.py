"""A Llama decoder layer, the final norm and the head, from the equations, in float32 numpy.

    xnorm  = rms_norm(x, w_input_layernorm)
    attn   = attention_block(xnorm)              (common.llama.attention: q, k, v, RoPE, GQA, o_proj)
    h      = x + attn                            residual after attention
    hnorm  = rms_norm(h, w_post_attention_layernorm)
    act    = act_fn(gate_proj(hnorm)) * up_proj(hnorm)
    mlp    = down_proj(act)                      (common.llama.mlp)
    out    = h + mlp                             the layer output: the next layer's x
and after the last layer
    norm   = rms_norm(out, w_norm)
    logits = norm W_head^T                       lm_head, or the embedding when tied

Rows are batch-major (row = b*T + t) throughout. No transformers here: this is the independent
recomputation step 4 checks the model against. Each equation is called through its module
(norm.rms_norm, mlp.swiglu_mlp, ...) so that a test can swap one for a buggy twin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from common.llama import attention, mlp, norm
from common.llama.attention import AttentionWeights
from common.llama.mlp import MLPWeights
from common.llama.spec import LayerSpec

# Every node of a layer, in forward order (probs is (B, H, T, T) when kept; the others (B*T, C)).
LAYER_NODES = ("xnorm", "q", "k", "v", "probs", "attn", "h", "hnorm", "act", "mlp", "out")
HEAD_NODES = ("norm", "logits")


@dataclass(frozen=True)
class LayerWeights:
    input_layernorm: np.ndarray  # (d,)
    attn: AttentionWeights
    post_attention_layernorm: np.ndarray  # (d,)
    mlp: MLPWeights


def decoder_layer(x: np.ndarray, w: LayerWeights, layer: LayerSpec, positions: np.ndarray, mask: np.ndarray,
                  keep_probs: str | None = None,
                  past_kv: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """x (B*T, d) -> every node of LAYER_NODES; positions (B, T), mask (B, T).

    probs is every head's (B, H, T, T) with keep_probs="all", else None (common.llama.attention.attention).
    A decode step: past_kv the layer's KV cache (B, P, Hkv, Dh) each, mask (B, P + T);
    k and v are then the new rows only, probs (B, H, T, P + T).
    """
    eps = layer.rms_norm_eps
    xnorm = norm.rms_norm(x, w.input_layernorm, eps)
    a = attention.attention_block(xnorm, w.attn, layer, positions, mask, keep_probs, past_kv)
    h = x + a["attn"]
    hnorm = norm.rms_norm(h, w.post_attention_layernorm, eps)
    m = mlp.swiglu_mlp(hnorm, w.mlp, layer.hidden_act)
    return {"xnorm": xnorm, **a, "h": h, "hnorm": hnorm, "act": m["act"], "mlp": m["mlp"], "out": h + m["mlp"]}


def last_real_rows(attention_mask: np.ndarray) -> np.ndarray:
    """Row index (b*T + t) of each prompt's last real token, either padding side. (B, T) -> (B,)"""
    B, T = attention_mask.shape
    last = T - 1 - np.argmax(attention_mask[:, ::-1] > 0, axis=1)  # first real token from the right
    return np.arange(B) * T + last


def head(x: np.ndarray, norm_weight: np.ndarray, head_weight: np.ndarray | Iterable[np.ndarray], eps: float,
         rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The last layer's output x (B*T, d) -> norm (B*T, d) and logits (len(rows) or B*T, V).

    head_weight (V, d) is lm_head.weight, or model.embed_tokens.weight for tied embeddings; or its
    rows in consecutive blocks (V_i, d), so that a large vocabulary is never whole in memory.
    """
    normed = norm.rms_norm(x, norm_weight, eps)
    picked = normed if rows is None else normed[rows]
    blocks = [head_weight] if isinstance(head_weight, np.ndarray) else head_weight
    logits = np.concatenate([attention.linear(picked, w) for w in blocks], axis=1)  # (N, V)
    return {"norm": normed, "logits": logits}


def chain(x0: np.ndarray, layers: Iterable[int], load: Callable[[int], LayerWeights], position_ids: np.ndarray,
          attention_mask: np.ndarray, spec_of: Callable[[int], LayerSpec]) -> Iterator[tuple[int, dict]]:
    """Feed x0 through the layers in order, each from the previous one's output; yield (n, nodes).

    Only one layer's weights are alive at a time: each is loaded when its turn comes and dropped
    before the caller sees the result.
    """
    x = x0
    for n in layers:
        w = load(n)
        nodes = decoder_layer(x, w, spec_of(n), position_ids, attention_mask)
        del w
        yield n, nodes
        x = nodes["out"]


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """(N, V) -> (N, k) token ids, most likely first; the vocabulary is partitioned, never fully sorted."""
    k = min(k, logits.shape[-1])
    part = np.argpartition(-logits, k - 1, axis=-1)[:, :k]  # (N, k): the k largest, in no order
    order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)
