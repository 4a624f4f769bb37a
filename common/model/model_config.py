"""config.json parsing: sizes and RoPE parameters, read the same way by every step.

RoPE may be written in two forms and both must work:
  - `rope_theta` + `rope_scaling` (what the Hub's Llama-3.2 files say; old files say `type`)
  - `rope_parameters` (transformers >= 5: one dict holding rope_theta and rope_type)
Both normalise to `rope_theta` (float) and `rope_scaling` (None for plain RoPE, else a dict
with `rope_type` and that type's parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from common.cli import InputError
from common.files.atomic import read_json
from common.llama.mlp import ACTIVATIONS
from common.llama.rope import ROPE_PARAMS, check_scaling

# Architectures whose attention block is Llama's (RMSNorm, q/k/v/o_proj, rotate-half RoPE, GQA).
SUPPORTED_MODEL_TYPES = ("llama",)
# What the pipeline reads without a default (the rest: transformers' LlamaConfig defaults).
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")


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
    for key, value in (("rope_parameters", params), ("rope_scaling", cfg.get("rope_scaling"))):
        if value is not None and not isinstance(value, dict):
            raise InputError(f"{key} is a {type(value).__name__}, not a mapping like "
                             '{"rope_type": "llama3", "factor": 8.0, ...}')
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
    if not isinstance(scaling.get("rope_type", "default"), str):
        raise InputError(f"rope_type {scaling['rope_type']!r} is not a name like \"llama3\"")
    try:
        rope_type = check_scaling(scaling)
    except ValueError as e:  # config.json is this function's input: say so as an InputError
        raise InputError(str(e)) from None
    theta = _number("rope_theta", theta)
    for key in ROPE_PARAMS[rope_type]:
        _number(f"rope_scaling {key}", scaling[key], integer=key == "original_max_position_embeddings")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise InputError("rope_scaling high_freq_factor must be larger than low_freq_factor")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **{k: v for k, v in scaling.items() if k != "rope_type"}}


def _number(key: str, value, integer: bool = False, minimum: float = 0.0, strict: bool = True):
    """A finite int/float (an int with `integer`) above `minimum` (or equal, without `strict`)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        what = "an integer" if integer else "a finite number"
        raise InputError(f"{key} is {value!r}: it must be {what} {'>' if strict else '>='} {minimum:g}")
    return value if integer else float(value)


def read_config_json(model_dir: str | Path) -> dict:
    if not Path(model_dir).is_dir():
        raise InputError(f"model folder {model_dir} does not exist: run 0_download_models.py (or --demo) first")
    return read_json(Path(model_dir) / "config.json",
                     "a model folder needs a valid config.json: download the model again (0_download_models.py)")


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and check config.json of a Llama-family model folder: every field the pipeline uses,
    its type, range and consistency with the others; any fault is one InputError naming the file."""
    path = Path(model_dir) / "config.json"
    cfg = read_config_json(model_dir)
    try:
        return check_config(cfg)
    except InputError as e:
        raise InputError(f"{path}: {e}: fix config.json or download the model again") from None


def check_config(cfg: dict) -> ModelConfig:
    """A ModelConfig from a parsed config.json, or an InputError saying which field is wrong."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model_type {model_type!r} is not Llama-family (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise InputError(f"{', '.join(missing)} missing")
    d_model = _number("hidden_size", cfg["hidden_size"], integer=True)
    num_heads = _number("num_attention_heads", cfg["num_attention_heads"], integer=True)
    kv = cfg.get("num_key_value_heads")
    num_kv_heads = num_heads if kv is None else _number("num_key_value_heads", kv, integer=True)
    if num_heads % num_kv_heads:
        raise InputError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if d_model % num_heads:
            raise InputError(f"hidden_size {d_model} is not a multiple of num_attention_heads {num_heads} "
                             "(and there is no head_dim)")
        head_dim = d_model // num_heads
    head_dim = _number("head_dim", head_dim, integer=True)
    if head_dim % 2:
        raise InputError(f"head_dim {head_dim} is odd: RoPE rotates pairs of dimensions")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if not isinstance(cfg.get(flag, False), bool):
            raise InputError(f"{flag} is {cfg[flag]!r}, not true or false")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise InputError(f"torch_dtype is {dtype!r}, not a name like \"bfloat16\"")
    # Checked here, at the door: transformers would fail deep in the capture (KeyError from ACT2FN), and
    # steps 3 and 4 recompute only the activations common/mlp.py knows (each of which transformers has).
    hidden_act = cfg.get("hidden_act", "silu")  # LlamaConfig's default
    if not isinstance(hidden_act, str) or hidden_act not in ACTIVATIONS:
        raise InputError(f"hidden_act {hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    theta, scaling = normalize_rope(cfg)
    return ModelConfig(
        model_type=model_type,
        d_model=d_model,
        num_layers=_number("num_hidden_layers", cfg["num_hidden_layers"], integer=True),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=_number("vocab_size", cfg["vocab_size"], integer=True),
        intermediate_size=_number("intermediate_size", cfg["intermediate_size"], integer=True),
        rms_norm_eps=_number("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=_number("max_position_embeddings", cfg.get("max_position_embeddings", 2048),
                                        integer=True),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=cfg.get("attention_bias", False),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        torch_dtype=dtype,
        raw=cfg,
    )
