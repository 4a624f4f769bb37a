"""Llama's gated MLP (SwiGLU with the SiLU activation), in float32 numpy.

    act = act_fn(hnorm Wgate^T (+ bgate)) * (hnorm Wup^T (+ bup))     (N, I): what down_proj sees
    mlp = act Wdown^T (+ bdown)                                        (N, d)

act_fn is config.json's `hidden_act`; only the ones in ACTIVATIONS are known, any other is an
error (a silent fallback to SiLU would be a wrong answer). Names: N rows, d model size,
I intermediate_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.llama.attention import linear


@dataclass(frozen=True)
class MLPWeights:
    """One layer's gate/up/down_proj, in the checkpoint's (out_features, in_features) layout."""
    gate: np.ndarray  # (I, d)
    up: np.ndarray  # (I, d)
    down: np.ndarray  # (d, I)
    b_gate: np.ndarray | None = None  # (I,) when mlp_bias
    b_up: np.ndarray | None = None
    b_down: np.ndarray | None = None  # (d,)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x)); exp overflows to inf for x << 0, giving -0 as torch does."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


ACTIVATIONS = {"silu": silu}  # hidden_act -> function; Llama checkpoints say "silu"


def activation(hidden_act: str):
    """The function for a config's hidden_act; ValueError for one we do not implement."""
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[hidden_act]


def swiglu_mlp(hnorm: np.ndarray, w: MLPWeights, hidden_act: str = "silu") -> dict[str, np.ndarray]:
    """hnorm (N, d) -> {"act": (N, I) the input of down_proj, "mlp": (N, d) the MLP output}."""
    act = activation(hidden_act)(linear(hnorm, w.gate, w.b_gate)) * linear(hnorm, w.up, w.b_up)
    return {"act": act, "mlp": linear(act, w.down, w.b_down)}
