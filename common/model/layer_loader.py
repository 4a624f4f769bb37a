"""Layer-by-layer loading: compute and capture without holding the whole model.

A LayerCollector reads a model folder through the same shard/index reading as step 1
(common/files/safetensors_io) and hands out real transformers modules, one at a time:

    col = LayerCollector("model_paths/meta-llama_Llama-3.2-1B-Instruct")
    state = col.embed(input_ids, attention_mask)       # hidden (B, T, d), mask, positions, cos/sin
    for n in range(col.config.num_layers):
        layer = col.load_layer(n)                       # a LlamaDecoderLayer with its weights
        col.run_layer(layer, state)                     # state.hidden <- layer(state.hidden)
        del layer                                       # only one layer is ever in memory
    col.top_k(state, k=5)                               # (B, 5) next-token ids

The mask, positions and rotary cos/sin are built once by transformers' own functions, with the
same config as LlamaForCausalLM.from_pretrained, so in float32 every layer computes bit for bit
what the full model computes. Modules are built on the meta device and then given the file's
tensors (no random init, no copy); torch's global defaults are never changed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from common.cli import InputError
from common.files.atomic import write_json
from common.model.model_config import ModelConfig, load_config
from common.model.prompts import position_ids_from_mask
from common.files.safetensors_io import (TensorInfo, merge_headers, read_header, read_tensor, shard_files,
                                   shard_signature)

CACHE_VERSION = 2  # 2: shard signatures as {size, mtime_ns}, as in step 1's manifest


class ModelFolderError(InputError, FileNotFoundError):
    """A model folder or its config.json is missing (an InputError for scripts, a FileNotFoundError for code)."""


@dataclass
class ForwardState:
    """What every decoder layer takes, built once per batch."""
    hidden: torch.Tensor  # (B, T, d): the hidden state entering the next layer
    attention_mask: torch.Tensor | None  # 2-D (B, T), 1 real token: what was fed
    causal_mask: torch.Tensor | None  # 4-D (B, 1, T, T) additive mask, as transformers builds it
    position_ids: torch.Tensor  # (B, T)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin), each (B, T, Dh)


def read_rows(info: TensorInfo, rows: list[int]) -> torch.Tensor:
    """Rows of a 2-D tensor (the embedding rows of some token ids), reading only those rows' bytes."""
    with safe_open(str(info.shard), framework="pt") as f:
        table = f.get_slice(info.name)
        return torch.cat([table[r:r + 1] for r in rows])  # (len(rows), d)


class LayerCollector:
    """Loads the pieces of a Llama-family model on demand: embedding, decoder layers, final norm, head."""

    def __init__(self, model_dir: str | Path, cache_path: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            where = self.model_dir / "config.json" if self.model_dir.is_dir() else self.model_dir
            raise ModelFolderError(f"{where} does not exist: a model folder needs config.json "
                                   "(run 0_download_models.py)")
        self.config: ModelConfig = load_config(self.model_dir)  # sizes, normalised RoPE; Llama-family only
        self.dtype, self.device = dtype, torch.device(device)
        # The config exactly as from_pretrained reads it, so RoPE and masks come out identical.
        self.hf_config = LlamaConfig.from_pretrained(str(self.model_dir))
        self.hf_config._attn_implementation = "eager"
        self.rotary = LlamaRotaryEmbedding(self.hf_config).to(self.device)
        self._headers: dict[Path, dict[str, TensorInfo]] = {}  # shard -> parsed header, read on first use
        self.weight_map = self._weight_map(Path(cache_path) if cache_path else None)
        self._norm: nn.Module | None = None
        self._head: nn.Module | None = None

    # -- where each tensor lives -------------------------------------------------------------
    def _weight_map(self, cache_path: Path | None) -> dict[str, Path]:
        shards = shard_files(self.model_dir)
        signature = shard_signature(shards)
        if cache_path is not None and cache_path.is_file():
            try:
                cached = json.loads(cache_path.read_text())
                if cached.get("version") == CACHE_VERSION and cached.get("shards") == signature:
                    return {name: self.model_dir / shard for name, shard in cached["weight_map"].items()}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError):
                pass  # an unreadable cache is rebuilt below, never trusted
        for shard in shards:
            self._headers[shard] = read_header(shard)
        weight_map = {name: info.shard for name, info in merge_headers(self._headers).items()}
        if cache_path is not None:
            write_json(cache_path, {"version": CACHE_VERSION, "model_dir": str(self.model_dir),
                                    "shards": signature,
                                    "weight_map": {n: s.name for n, s in weight_map.items()}})
        return weight_map

    def info(self, name: str) -> TensorInfo:
        shard = self.weight_map.get(name)
        if shard is None:
            raise InputError(f"{self.model_dir}: no tensor {name!r} in the safetensors files: download the model again")
        if shard not in self._headers:
            self._headers[shard] = read_header(shard)
        return self._headers[shard][name]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, in the collector's dtype and device (bf16/fp16 -> fp32 widening is exact)."""
        return read_tensor(self.info(name)).to(self.device, self.dtype)

    def _module(self, make: Callable[[], nn.Module], prefix: str) -> nn.Module:
        """Build a module on the meta device (no init), then give it the files' tensors under `prefix`."""
        with torch.device("meta"):
            module = make()
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        module.load_state_dict({n: self.tensor(prefix + n) for n in names}, strict=True, assign=True)
        return module.requires_grad_(False).eval()

    # -- the pieces ------------------------------------------------------------------------
    def load_embedding(self) -> nn.Embedding:
        c = self.hf_config
        return self._module(lambda: nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id),
                            "model.embed_tokens.")

    def load_norm(self) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return self._module(lambda: LlamaRMSNorm(self.hf_config.hidden_size, eps=self.hf_config.rms_norm_eps),
                            "model.norm.")

    def load_head(self) -> nn.Linear:
        """lm_head, or the tied input embedding when the files hold no lm_head.weight."""
        prefix = "lm_head." if "lm_head.weight" in self.weight_map else "model.embed_tokens."
        c = self.hf_config
        return self._module(lambda: nn.Linear(c.hidden_size, c.vocab_size, bias=False), prefix)

    def load_layer(self, n: int) -> nn.Module:
        """Decoder layer n as a transformers LlamaDecoderLayer with its weights (biases included)."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        if not 0 <= n < self.config.num_layers:
            raise IndexError(f"layer {n}: {self.model_dir} has layers 0..{self.config.num_layers - 1}")
        return self._module(lambda: LlamaDecoderLayer(self.hf_config, n), f"model.layers.{n}.")

    # -- compute ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> ForwardState:
        """Embedding rows of input_ids (B, T), plus the causal+padding mask, position ids and rotary cos/sin.

        Only the rows of the ids are read from the files, never the whole embedding table.
        Position ids default to generate()'s: each row counts its real tokens from 0.
        """
        from transformers.masking_utils import create_causal_mask

        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        position_ids = position_ids.to(self.device)
        ids = input_ids.reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the embedding of {self.model_dir} "
                             f"(vocab_size {self.config.vocab_size}): use this model's tokenizer")
        unique = sorted(set(ids))
        table = read_rows(self.info("model.embed_tokens.weight"), unique).to(self.device, self.dtype)
        where = {tok: i for i, tok in enumerate(unique)}
        hidden = table[torch.tensor([where[i] for i in ids], device=self.device)]
        hidden = hidden.reshape(*input_ids.shape, -1)  # (B*T, d) -> (B, T, d)
        causal = create_causal_mask(config=self.hf_config, inputs_embeds=hidden, attention_mask=attention_mask,
                                    past_key_values=None, position_ids=position_ids)
        cos_sin = self.rotary(hidden, position_ids=position_ids)
        return ForwardState(hidden, attention_mask, causal, position_ids, cos_sin)

    def run_layer(self, layer: nn.Module, state: ForwardState) -> torch.Tensor:
        """Run one decoder layer on state.hidden; store and return its output (B, T, d)."""
        state.hidden = layer(state.hidden, attention_mask=state.causal_mask, position_ids=state.position_ids,
                             position_embeddings=state.position_embeddings)
        return state.hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + head on (..., d) -> (..., vocab). Both stay loaded until free_head()."""
        if self._head is None:
            self._norm, self._head = self.load_norm(), self.load_head()
        return self._head(self._norm(hidden))

    def top_k(self, state: ForwardState, k: int = 1) -> torch.Tensor:
        """(B, k) most likely next-token ids after each row's last real token (either padding side)."""
        T = state.attention_mask.shape[1]
        # index of the last real token: T-1 with left padding, count-1 with right padding
        last = T - 1 - state.attention_mask.flip(-1).long().argmax(-1)
        rows = state.hidden[torch.arange(state.hidden.shape[0], device=self.device), last]  # (B, d)
        return self.logits(rows).topk(k, dim=-1).indices

    def free_head(self) -> None:
        self._norm = self._head = None
