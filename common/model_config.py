"""config.json parsing: sizes and RoPE parameters, read the same way by every step.

RoPE may be written in two forms and both must work:
  - `rope_theta` + `rope_scaling` (what the Hub's Llama-3.2 files say; old files say `type`)
  - `rope_parameters` (transformers >= 5: one dict holding rope_theta and rope_type)
Both normalise to `rope_theta` (float) and `rope_scaling` (None for plain RoPE, else a dict
with `rope_type` and that type's parameters).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.atomic import read_json
from common.cli import InputError
from common.rope import check_scaling

# Architectures whose attention block is Llama's (RMSNorm, q/k/v/o_proj, rotate-half RoPE, GQA).
SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool
    tie_word_embeddings: bool
    torch_dtype: str | None
    raw: dict

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"


def normalize_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config form; rope_scaling is None for plain RoPE."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if params:
        theta = params.get("rope_theta", cfg.get("rope_theta"))
        scaling = dict(params)
    else:
        theta = cfg.get("rope_theta")
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else {}
    scaling.pop("rope_theta", None)
    if theta is None:
        theta = 10000.0  # transformers' LlamaConfig default
    if "type" in scaling and "rope_type" not in scaling:  # pre-4.45 spelling
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    try:
        rope_type = check_scaling(scaling)
    except ValueError as e:  # config.json is this function's input: say so as an InputError
        raise InputError(str(e)) from None
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **{k: v for k, v in scaling.items() if k != "rope_type"}}


def read_config_json(model_dir: str | Path) -> dict:
    if not Path(model_dir).is_dir():
        raise InputError(f"model folder {model_dir} does not exist: run 0_download_models.py (or --demo) first")
    return read_json(Path(model_dir) / "config.json",
                     "a model folder needs a valid config.json: download the model again (0_download_models.py)")


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and check config.json of a Llama-family model folder."""
    cfg = read_config_json(model_dir)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{Path(model_dir) / 'config.json'}: model_type {model_type!r} is not Llama-family "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    d_model, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    theta, scaling = normalize_rope(cfg)
    return ModelConfig(
        model_type=model_type,
        d_model=d_model,
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or d_model // num_heads,
        vocab_size=cfg["vocab_size"],
        intermediate_size=cfg.get("intermediate_size", 0),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        raw=cfg,
    )
