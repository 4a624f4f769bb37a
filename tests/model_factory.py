"""Tiny random Llama models built at test time, in the Hub's on-disk shape.

The default is Llama-3.2-shaped: several bf16 shards with model.safetensors.index.json, tied
embeddings (no lm_head.weight in the files), GQA, Llama-3 RoPE scaling, a real (trained
byte-level BPE) tokenizer with a chat template, and config.json written with `rope_theta` +
`rope_scaling` exactly as the Hub's Llama-3.2 files are. Variants change one thing each.
Benchmarks import this too (`llama_3_2_1b_config` is the real 1B shape).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Attention is all you need: queries, keys and values, rotary position embeddings.",
    "Llama models use RMSNorm, SwiGLU and grouped-query attention.",
    "0123456789 hello world, the quick brown fox jumps over the lazy dog!",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Keys and order of the Hub's meta-llama/Llama-3.2-1B-Instruct config.json.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Tiny but Llama-3.2-shaped: GQA 4:2, Llama-3 scaling with a short original context so the
# scaling changes the low frequencies noticeably for prompts of a few dozen tokens.
TINY = {
    **LLAMA_3_2_1B,
    "bos_token_id": 0,
    "eos_token_id": [1, 4],
    "head_dim": 16,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 32,
        "rope_type": "llama3",
    },
    "rope_theta": 10000.0,
    "vocab_size": 320,
}

VARIANTS = {
    "llama32": {},
    "fp16_single": {"torch_dtype": "float16"},
    "untied": {"tie_word_embeddings": False},
    "head_dim": {"head_dim": 24},  # != hidden_size / num_attention_heads
    "default_rope": {"rope_scaling": None},
    "bias": {"attention_bias": True},
    "mlp_bias": {"mlp_bias": True},
    "linear_rope": {"rope_scaling": {"factor": 2.0, "rope_type": "linear"}},
}
SINGLE_FILE = {"fp16_single"}


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[4],
                                   pad_token=SPECIAL[1])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hub_config(overrides: dict | None = None) -> dict:
    cfg = {**TINY, **(overrides or {})}
    if cfg["rope_scaling"] is None:
        cfg.pop("rope_scaling")
    return cfg


def build_model(out_dir: str | Path, variant: str = "llama32", seed: int = 0, config: dict | None = None,
                max_shard_size: str | int = "60KB", with_tokenizer: bool = True) -> Path:
    """Write a random Llama model folder in the Hub's layout and return its path.

    `config` is a full Hub-form config.json (e.g. LLAMA_3_2_1B); otherwise TINY + the variant.
    """
    out_dir = Path(out_dir)
    cfg = dict(config) if config is not None else hub_config(VARIANTS[variant])
    dtype = getattr(torch, cfg.get("torch_dtype", "bfloat16"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(cfg))).to(dtype)  # LlamaConfig edits dicts in place
    with torch.no_grad():  # random init gives norms of exactly 1; make them (and biases) matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    shard = "10GB" if variant in SINGLE_FILE else max_shard_size
    model.save_pretrained(out_dir, max_shard_size=shard)
    # transformers writes its own config form; write the Hub's instead.
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if with_tokenizer:
        build_tokenizer(cfg["vocab_size"]).save_pretrained(out_dir)
    return out_dir
