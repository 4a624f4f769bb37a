"""Before any load: do a model folder's safetensors hold exactly the tensors its config.json implies?

transformers fills a missing weight with random values (and drops an unexpected one) with no more
than a load report, so a config.json that disagrees with the files (more layers than stored,
attention_bias without bias tensors) would give a capture from random weights, exit 0. Step 2
calls check_weights for both its paths (full model and streaming) before anything is loaded; it
reads only the safetensors headers.
"""
from __future__ import annotations

from pathlib import Path

from common.cli import InputError
from common.files.safetensors_io import list_tensors
from common.model.model_config import ModelConfig

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers older checkpoints saved; transformers recomputes them
SHOWN = 3  # names quoted in an error


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a LlamaForCausalLM with this config loads."""
    d, V, I = cfg.d_model, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    mlp_bias = bool(cfg.raw.get("mlp_bias", False))
    out = {"model.embed_tokens.weight": (V, d)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (I, d), p + "mlp.up_proj.weight": (I, d),
                p + "mlp.down_proj.weight": (d, I)}
        if cfg.attention_bias:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (d,)}
        if mlp_bias:
            out |= {p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,), p + "mlp.down_proj.bias": (d,)}
    out["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, d)
    return out


def _some(names: list[str]) -> str:
    more = f" (and {len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_weights(model_dir: str | Path, cfg: ModelConfig) -> None:
    """InputError naming the first few missing, unexpected or mis-shaped tensors, if any."""
    model_dir = Path(model_dir)
    have = list_tensors(model_dir)  # headers only: checked, duplicates refused
    want = expected_tensors(cfg)
    fix = "the files do not match config.json: fix config.json or download the model again"
    missing = [n for n in want if n not in have]
    if missing:
        raise InputError(f"{model_dir}: tensors missing from the safetensors files: {_some(missing)}; {fix}")
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # some tied files store it anyway
    unexpected = [n for n in have if n not in want and n not in optional and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise InputError(f"{model_dir}: tensors config.json does not describe: {_some(unexpected)}; {fix}")
    wrong = [f"{n} {list(have[n].shape)} (config.json implies {list(s)})" for n, s in
             (*want.items(), *((n, want["model.embed_tokens.weight"]) for n in optional if n in have))
             if tuple(have[n].shape) != s]
    if wrong:
        raise InputError(f"{model_dir}: tensor shapes disagree with config.json: {_some(wrong)}; {fix}")
    odd = [f"{n} ({have[n].dtype})" for n in want if have[n].dtype not in FLOAT_DTYPES]
    if odd:
        raise InputError(f"{model_dir}: weights that are not floating point: {_some(odd)}; download the model again")
