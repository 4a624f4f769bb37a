"""One decoder layer's shape and constants: everything its equations need besides the weights.

Built once per layer from its meta file (meta_layerN.json, or meta_model.json for every layer) and
handed whole to the math: attention_block(xnorm, w, layer, positions, mask), decoder_layer(...).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    """Sizes, heads, RoPE, eps, activation and bias flags of one layer (the checkpoint's names)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    hidden_act: str = "silu"
    pow_lanes: int | None = None  # the capture machine's SIMD width for RoPE's pow (common/llama/rope.py)
    d_model: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_meta(cls, meta: dict, pow_lanes: int | None = None) -> LayerSpec:
        """From a checked meta file (a layer's has no activation: step 3 needs none, SiLU stands in)."""
        return cls(meta["num_heads"], meta["num_kv_heads"], meta["head_dim"], meta["rope_theta"],
                   meta.get("rope_scaling"), meta["rms_norm_eps"], meta.get("hidden_act", "silu"), pow_lanes,
                   meta["d_model"], bool(meta["attention_bias"]), bool(meta.get("mlp_bias", False)))
