"""Capture what a running Llama model computes, layer by layer, and write it as step 2's files.

Everything is taken from the running model, never recomputed:
  x      forward pre-hook on decoder layer N: the hidden state entering it
         (not hidden_states[N] of the model output, whose last entry is the final norm's output)
  xnorm  forward hook on input_layernorm: what q_proj/k_proj/v_proj see (weight included)
  ref_q, ref_k, ref_v
         Q and K after RoPE, and V, as the attention function receives them (before the GQA
         repeat). transformers applies RoPE inside LlamaAttention.forward with no module to hook,
         so the attention runs through CAPTURE_ATTENTION: transformers' own eager attention,
         registered under another name, that first hands (q, k, v) to the capture.
  ref_attn
         forward hook on o_proj: the attention block's output.
  ref_probs
         the softmax probabilities CAPTURE_ATTENTION's eager attention returns (B, H, T, T).
  ref_h, ref_hnorm
         forward pre-hook and hook on post_attention_layernorm: its input (x + attention), its output.
  ref_act, ref_mlp
         forward pre-hook on mlp.down_proj (its input: act(gate) * up) and forward hook on mlp.
  ref_out
         forward hook on the decoder layer: its output (the next layer's x).
  ref_norm, ref_logits (once per run, capture_head)
         forward hooks on the final model.norm and on lm_head.

Two ways to run the model, with the same signature and the same hooks:
  full_model_capture  the whole model in memory, one forward pass
  stream_capture      one decoder layer in memory at a time (common/model/layer_loader.LayerCollector)
Both add the model's own RoPE frequencies to the meta (rope_meta) before the first layer is written:
their last bit depends on the CPU that computed them (common/llama/rope.py, point 4).

Files (SPEC, "2_get_x.py"; names from common/files/layout.py): rows batch-major (row = b*T + t),
Q/K/V columns head-major (h*Dh + d).
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Container, Iterator

import torch
from torch import nn
from tqdm import tqdm

from common.cli import InputError
from common.files import layout
from common.files.atomic import sha256_file
from common.files.manifest import save_csv, save_json
from common.llama.attention import PROBS_MAX_SEQ_LEN
from common.model import prompts  # called as prompts.f(...): a test plants a capture that restarts positions
from common.model import quant, quant_capture
from common.model.layer_loader import LayerCollector

# Eager attention that also records (q, k, v); selected by swapping config._attn_implementation
# for the duration of a capture, so a model outside a capture is untouched.
CAPTURE_ATTENTION = "eager_xray_capture"
ATTN_IMPLEMENTATION = "eager"

# attention module -> callback(q, k, v, probs); only modules inside an active capture are here.
_RECORDERS: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()

LOGITS_CHOICES = ("all", "last", "none")  # ref_logits rows: every position, each prompt's last real one, none
CSV_BYTES_PER_VALUE = 13  # what common.files.csv_io writes on average (shortest round-trip float32 + comma)


@dataclass(frozen=True)
class Settings:
    """What a capture records and how the model runs (step 2's flags), taken whole by every capture function."""
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    save_x_norm: bool = True  # xnorm_layerN.csv
    save_reference: bool = True  # ref_q/k/v/attn_layerN.csv
    save_layer_refs: bool = True  # ref_h/hnorm/act/mlp/out_layerN.csv
    save_attn_probs: bool = True  # ref_probs_layerN.csv
    logits: str = "all"  # LOGITS_CHOICES
    generate: int = 0  # greedy decode steps after the prefill (full_model_capture only)
    quant: tuple | None = None  # (Scheme, quant_head): the model quantized by torchao (common/model/quant_capture.py)


def check_generate(generate: int, streaming: bool) -> None:
    if generate < 0:
        raise InputError(f"--generate {generate}: give 0 (no decode steps) or more")
    if generate and streaming:
        raise InputError("--generate with --streaming: decode steps need the whole model and its KV cache in "
                         "memory; drop --streaming (or --generate)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device here; use --device cpu or auto")
    return torch.device(name)


def settings(dtype: str, device: str, save_x_norm: bool, save_reference: bool, save_layer_refs: bool,
             save_attn_probs: bool, seq_len: int, logits: str, generate: int, quant: tuple | None = None) -> Settings:
    """Step 2's flags as a capture's Settings: the device resolved, and attention probabilities saved up to
    PROBS_MAX_SEQ_LEN tokens only (steps 3 and 4 hold and check every head's up to there)."""
    return Settings(getattr(torch, dtype), resolve_device(device), save_x_norm, save_reference, save_layer_refs,
                    save_attn_probs and seq_len <= PROBS_MAX_SEQ_LEN, logits, generate, quant)


def plan(cfg, B: int, T: int, layers: int, s: Settings, probs_asked: bool) -> tuple[int, str]:
    """(bytes of CSV the capture writes, about; a line on the attention probabilities) for B prompts of T tokens."""
    logit_rows = {"all": B * T, "last": B, "none": 0}[s.logits]
    size = csv_bytes_estimate(cfg, B * T, layers, s, T, logit_rows)
    size += s.generate * csv_bytes_estimate(cfg, B, layers, s, T + s.generate, B if logit_rows else 0)
    probs_mb = CSV_BYTES_PER_VALUE * layers * B * cfg.num_heads * T * T / 1e6
    probs = (f"{layers} x [{B * cfg.num_heads * T}, {T}], about {probs_mb:.1f} MB" if s.save_attn_probs
             else f"off: {T} tokens > PROBS_MAX_SEQ_LEN {PROBS_MAX_SEQ_LEN}" if probs_asked else "off")
    return size, probs


def csv_bytes_estimate(cfg, tokens: int, layers: int, s: Settings, seq_len: int = 0, logit_rows: int = 0) -> int:
    """About how many bytes of CSV a capture of `tokens` rows (B*T) over `layers` layers writes
    (attention probabilities: seq_len values per row and head; logits: logit_rows rows of vocab_size)."""
    per_row = cfg.d_model * (1 + s.save_x_norm + s.save_reference)  # x, xnorm, ref_attn
    if s.save_reference:
        per_row += (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim  # ref_q, ref_k, ref_v
    if s.save_layer_refs:
        per_row += 4 * cfg.d_model + cfg.intermediate_size  # ref_h, ref_hnorm, ref_mlp, ref_out; ref_act
    if s.save_attn_probs:
        per_row += cfg.num_heads * seq_len  # ref_probs
    head = (cfg.d_model * tokens + cfg.vocab_size * logit_rows) if logit_rows else 0  # ref_norm, ref_logits
    return CSV_BYTES_PER_VALUE * (per_row * tokens * layers + head)


def _capture_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    out, probs = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    record = _RECORDERS.get(module)
    if record is not None:
        record(query, key, value, probs)
    return out, probs


def register_capture_attention() -> str:
    """Register CAPTURE_ATTENTION (and eager's mask for it) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_eager_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, eager_mask)
    return CAPTURE_ATTENTION


def rows(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B*T, C), batch-major, as a CPU copy."""
    return x.detach().reshape(-1, x.shape[-1]).to("cpu", copy=True)


def head_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) -> (B*T, H*Dh), head-major columns (h*Dh + d), as a CPU copy."""
    B, H, T, Dh = x.shape
    return x.detach().transpose(1, 2).reshape(B * T, H * Dh).to("cpu", copy=True)


def prob_rows(p: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (B*H*T, T): row (b*H + h)*T + t_query, column t_key, as a CPU copy."""
    return p.detach().reshape(-1, p.shape[-1]).to("cpu", copy=True)


def output_tensor(out) -> torch.Tensor:
    """A module's output tensor (older transformers return a tuple from decoder layers)."""
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_layers(config, layers: dict[int, nn.Module], sink: Callable[[int, dict[str, torch.Tensor]], None],
                   s: Settings) -> Iterator[None]:
    """Hook decoder layers {N: module}; when layer N finishes, call sink(N, {file stem: (rows, C) tensor}).

    `config` is the (transformers) config the layers were built with; its attention
    implementation must be "eager" and is switched to CAPTURE_ATTENTION only inside the block.
    A new node is one more hook below that calls add(n, stem, tensor), and its stem in
    common/files/layout.py (STEP2_STEMS), which write_layer and stale_files follow.
    """
    if config._attn_implementation not in ("eager", CAPTURE_ATTENTION):
        raise ValueError(f"capture needs eager attention, the model uses {config._attn_implementation!r}")
    found: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    save_x_norm, save_reference, save_layer_refs, save_attn_probs = (
        s.save_x_norm, s.save_reference, s.save_layer_refs, s.save_attn_probs)

    def add(n: int, name: str, t: torch.Tensor) -> None:
        found.setdefault(n, {})[name] = t

    for n, layer in layers.items():
        def pre(mod, args, kwargs, n=n):
            add(n, "x", rows(args[0] if args else kwargs["hidden_states"]))

        def done(mod, args, output, n=n):
            sink(n, found.pop(n, {}))

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        if save_x_norm:
            handles.append(layer.input_layernorm.register_forward_hook(
                lambda m, a, out, n=n: add(n, "xnorm", rows(out))))
        if save_reference:
            handles.append(layer.self_attn.o_proj.register_forward_hook(
                lambda m, a, out, n=n: add(n, "ref_attn", rows(out))))
        if save_layer_refs:
            post, mlp = layer.post_attention_layernorm, layer.mlp
            handles += [
                post.register_forward_pre_hook(lambda m, a, n=n: add(n, "ref_h", rows(a[0]))),
                post.register_forward_hook(lambda m, a, out, n=n: add(n, "ref_hnorm", rows(out))),
                mlp.down_proj.register_forward_pre_hook(lambda m, a, n=n: add(n, "ref_act", rows(a[0]))),
                mlp.register_forward_hook(lambda m, a, out, n=n: add(n, "ref_mlp", rows(out))),
                layer.register_forward_hook(lambda m, a, out, n=n: add(n, "ref_out", rows(output_tensor(out)))),
            ]
        if save_reference or save_attn_probs:
            def qkv(q, k, v, probs, n=n):  # (B, H, T, Dh) after RoPE; (B, Hkv, T_cache, Dh) before repeat_kv
                if save_reference:
                    # With a KV cache k and v are the whole cache; the model computed only the last T rows.
                    T = q.shape[2]
                    add(n, "ref_q", head_rows(q))
                    add(n, "ref_k", head_rows(k[:, :, -T:]))
                    add(n, "ref_v", head_rows(v[:, :, -T:]))
                if save_attn_probs:
                    add(n, "ref_probs", prob_rows(probs))  # (B, H, T, T_cache)

            _RECORDERS[layer.self_attn] = qkv
        if s.quant is not None:  # the scales torchao's quantized linears give their inputs
            handles += quant_capture.scale_hooks(s.quant[0])(n, layer, add)
        handles.append(layer.register_forward_hook(done))  # registered last: runs after the others

    previous = config._attn_implementation
    if save_reference or save_attn_probs:
        config._attn_implementation = register_capture_attention()
    try:
        yield
    finally:
        config._attn_implementation = previous
        for h in handles:
            h.remove()
        for layer in layers.values():
            _RECORDERS.pop(layer.self_attn, None)


def rope_meta(rotary: nn.Module) -> dict:
    """The rotary module's inv_freq, as the meta file records it (float32 values, exact in JSON)."""
    return {"rope_inv_freq": rotary.inv_freq.detach().float().cpu().tolist()}


def logit_rows(attention_mask: torch.Tensor, logits: str) -> torch.Tensor | None:
    """Rows (b*T + t) kept in ref_logits: None for every position ("all"), each prompt's last real one ("last")."""
    if logits == "all":
        return None
    B, T = attention_mask.shape
    last = T - 1 - attention_mask.flip(-1).long().argmax(-1).cpu()  # the last real token, either padding side
    return torch.arange(B) * T + last


@contextmanager
def capture_head(norm: nn.Module, lm_head: nn.Module, head_sink: Callable[[dict[str, torch.Tensor]], None],
                 rows_kept: torch.Tensor | None) -> Iterator[None]:
    """Hook the final norm and the head; once the head has run, head_sink({"ref_norm": .., "ref_logits": ..}).

    ref_logits keeps the rows `rows_kept` of the head's (B*T, V) output (None: all of them).
    """
    found: dict[str, torch.Tensor] = {}

    def on_head(m, a, out):
        logits = rows(out)
        found["ref_logits"] = logits if rows_kept is None else logits[rows_kept]
        head_sink(dict(found))

    handles = [norm.register_forward_hook(lambda m, a, out: found.__setitem__("ref_norm", rows(out))),
               lm_head.register_forward_hook(on_head)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_facts(config, layer: nn.Module) -> dict:
    """What the running modules were built with, for meta_model.json (transformers' defaults included)."""
    return {"hidden_act": config.hidden_act, "mlp_bias": bool(config.mlp_bias),
            "norm_class": type(layer.input_layernorm).__name__,
            "post_norm_class": type(layer.post_attention_layernorm).__name__}


def full_model_capture(model_dir: Path, batch, layers: list[int], s: Settings, out: Sink,
                       decoder: Decoder | None = None) -> dict:
    """Load the whole model (eager attention, s.dtype), run the batch once with hooks; return model_facts.

    out.meta gets rope_meta of the model before out sees the first layer. With logits "all" or
    "last" the model runs to its logits and out.head receives ref_norm and ref_logits; with "none"
    only the decoder runs. With s.generate = N > 0 the prefill fills a KV cache and N greedy decode
    steps follow (decode_capture, into decoder).
    """
    from transformers import DynamicCache, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=s.dtype,
                                             attn_implementation=ATTN_IMPLEMENTATION).to(s.device).eval()
    if s.quant is not None:
        quant.apply_scheme(model, *s.quant)
    out.meta.update(rope_meta(model.model.rotary_emb))
    hooked = {n: model.model.layers[n] for n in layers}
    cache = DynamicCache(config=model.config) if s.generate else None
    inputs = {"input_ids": batch.input_ids.to(s.device), "attention_mask": batch.attention_mask.to(s.device),
              "position_ids": batch.position_ids.to(s.device), "use_cache": bool(s.generate),
              "past_key_values": cache}
    head = (capture_head(model.model.norm, model.lm_head, out.head, logit_rows(batch.attention_mask, s.logits))
            if s.logits != "none" else nullcontext())
    with capture_layers(model.config, hooked, out.layer, s):
        if s.logits == "none" and not s.generate:
            model.model(**inputs)
        else:
            with head:
                result = model(**inputs, logits_to_keep=0)  # 0: the logits of every position
    if s.generate:
        rows_last = logit_rows(batch.attention_mask, "last")
        first = rows(result.logits)[rows_last].float().argmax(-1)  # (B,): each prompt's greedy next token
        decode_capture(model, batch, first, cache, hooked, s, decoder)
    return model_facts(model.config, model.model.layers[0])


def decode_capture(model, batch, next_ids: torch.Tensor, cache, hooked: dict[int, nn.Module], s: Settings,
                   decoder: Decoder) -> None:
    """Greedy decode steps 1..s.generate after a prefill that filled `cache` (a DynamicCache), captured as it runs.

    Each step feeds every prompt its last greedy token (next_ids, (B,)) as one new row, as
    generate() does: the attention mask grows by a 1 per step (cache + new token), and the position
    is generate()'s, cumsum(mask) - 1 (+ the batch's position offset) at the new token: each prompt's
    last position + 1, whatever its padding. decoder.step(S, fed) is the Sink of step S, where
    fed = {"input_ids" (B, 1), "attention_mask" (B, T + S), "position_ids" (B, 1)}: it receives the
    step's layers and head as in capture_layers/capture_head, and decoder.done the step's greedy
    tokens (B,).
    """

    device = next(model.parameters()).device
    mask = batch.attention_mask
    for step in tqdm(range(1, s.generate + 1), desc="decode", unit="step", disable=not os.isatty(2)):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + step)
        fed = {"input_ids": next_ids[:, None].clone(), "attention_mask": mask,
               "position_ids": prompts.position_ids_from_mask(mask, batch.position_offset)[:, -1:]}
        sink = decoder.step(step, fed)
        head = (capture_head(model.model.norm, model.lm_head, sink.head, None) if s.logits != "none"
                else nullcontext())
        with capture_layers(model.config, hooked, sink.layer, s), head:
            out = model(input_ids=fed["input_ids"].to(device), attention_mask=mask.to(device),
                        position_ids=fed["position_ids"].to(device), past_key_values=cache, use_cache=True)
        next_ids = out.logits[:, -1].float().argmax(-1).cpu()  # (B,): generate()'s greedy choice
        decoder.done(sink, fed, next_ids)


def stream_capture(model_dir: Path, batch, layers: list[int], s: Settings, out: Sink,
                   decoder: Decoder | None = None) -> dict:
    """Step 2 one layer at a time: load layer n, run it with the capture hooks, free it; return model_facts.

    out: as above (no decode steps: decoder is never used). With logits "all" or "last" every layer
    runs, then the final norm and the head (out.head as in full_model_capture); with "none" it stops
    after the last chosen layer.
    """
    col = LayerCollector(model_dir, dtype=s.dtype, device=s.device)
    out.meta.update(rope_meta(col.rotary))
    state = col.embed(batch.input_ids, batch.attention_mask, batch.position_ids)
    wanted = set(layers)
    stop = col.config.num_layers if s.logits != "none" else max(layers) + 1
    for n in tqdm(range(stop), desc="layers", unit="layer", disable=not os.isatty(2)):
        layer = col.load_layer(n)
        facts = model_facts(col.hf_config, layer)
        if s.quant is not None:
            quant_capture.quantize_layer(layer, n, s.quant[0])
        with capture_layers(col.hf_config, {n: layer} if n in wanted else {}, out.layer, s):
            col.run_layer(layer, state)
        del layer
    if s.logits != "none":
        norm, head = col.load_norm(), col.load_head()
        if s.quant is not None and s.quant[1]:
            head = quant_capture.quantize_head(head, s.quant[0])
        with capture_head(norm, head, out.head, logit_rows(batch.attention_mask, s.logits)):
            head(norm(state.hidden))  # the same modules on the same input as LlamaForCausalLM's forward
    return facts


def write_head(out_dir: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Write ref_norm.csv and ref_logits.csv; return their manifest entries (name -> entry)."""
    files = {"ref_norm": layout.REF_NORM, "ref_logits": layout.REF_LOGITS}
    return {k: v for stem, name in files.items() for k, v in save_csv(out_dir, name, tensors[stem]).items()}


def vocab_strings(tokenizer, vocab_size: int) -> list[str]:
    """Every token id's text as the tokenizer decodes it alone (ids past the tokenizer: "<id N>")."""
    n = min(len(tokenizer), vocab_size)
    return tokenizer.batch_decode([[i] for i in range(n)]) + [f"<id {i}>" for i in range(n, vocab_size)]


def write_model_files(out_dir: Path, cfg, layer_meta: dict, facts: dict, logits: str, tokenizer) -> dict[str, dict]:
    """meta_model.json (and vocab.json when there are logits); return their manifest entries.

    `facts` (model_facts) are read off the modules that ran: activation, MLP bias, norm classes.
    """
    entries = save_json(out_dir, layout.META_MODEL, {
        "num_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        **facts,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "logits": logits,
        **layer_meta,
    })
    if logits == "none":
        return entries
    return {**entries, **save_json(out_dir, layout.VOCAB, {"vocab_size": cfg.vocab_size,
                                                           "tokens": vocab_strings(tokenizer, cfg.vocab_size)})}


def write_layer(out_dir: Path, n: int, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, dict]:
    """Write layer n's captured tensors and its meta file; return their manifest entries (name -> entry)."""
    entries = {}
    for stem in layout.STEP2_STEMS:
        if stem in tensors:
            entries.update(save_csv(out_dir, layout.layer_file(stem, n), tensors[stem]))
    return {**entries, **save_json(out_dir, layout.meta_file(n), {"layer": n, **meta})}


def write_batch(out_dir: Path, batch, save_masks: bool) -> dict[str, dict]:
    """tokens.json, and (with save_masks) the attention mask and position ids: exactly what was fed.

    Returns their manifest entries (name -> entry).
    """
    entries = save_json(out_dir, layout.TOKENS, {
        "prompts": batch.prompts,
        "padding_side": batch.padding_side,
        "input_ids": batch.input_ids.tolist(),
        "tokens": batch.tokens,
    })
    if save_masks:
        entries.update(save_csv(out_dir, layout.ATTENTION_MASK, batch.attention_mask))
        entries.update(save_csv(out_dir, layout.POSITION_IDS, batch.position_ids))
    return entries


def write_decode_batch(folder: Path, batch, step: int, fed: dict[str, torch.Tensor], generated: torch.Tensor,
                       tokenizer, save_masks: bool) -> dict[str, dict]:
    """Decode step `step`'s tokens.json (and with save_masks its attention mask (B, T + step) and position
    ids (B, 1)): the token fed, the greedy next token, and every id generated so far (B, step + 1).

    Returns their manifest entries (name inside folder -> entry).
    """
    fed_ids, next_ids = fed["input_ids"].tolist(), generated[:, -1].tolist()
    entries = save_json(folder, layout.TOKENS, {
        "prompts": batch.prompts,
        "padding_side": batch.padding_side,
        "decode_step": step,
        "input_ids": fed_ids,  # [B][1]: the token this step feeds (the previous step's greedy choice)
        "tokens": [tokenizer.convert_ids_to_tokens(row) for row in fed_ids],
        "next_ids": next_ids,  # [B]: argmax of this step's logits, what step + 1 feeds
        "next_tokens": tokenizer.convert_ids_to_tokens(next_ids),
        "generated_ids": generated.tolist(),  # [B][step + 1]: the prefill's greedy token, then each step's
        "generated_text": [tokenizer.decode(row) for row in generated.tolist()],
    })
    if save_masks:
        entries.update(save_csv(folder, layout.ATTENTION_MASK, fed["attention_mask"]))
        entries.update(save_csv(folder, layout.POSITION_IDS, fed["position_ids"]))
    return entries


@dataclass
class Written:
    """What a capture wrote: manifest entries by name (a path inside the output folder), the bytes of
    attention probabilities among them, and the greedy tokens (B,) of the prefill, then of each step."""
    entries: dict[str, dict] = field(default_factory=dict)
    probs_bytes: int = 0
    generated: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Sink:
    """Where one forward pass's layers and head go: `folder`, each layer's meta file from `meta`; the
    files of decode step `step` are listed as decode/step_S/<name>."""
    written: Written
    folder: Path
    meta: dict
    step: int | None = None

    def name(self, name: str) -> str:
        return name if self.step is None else layout.decode_path(self.step, name)

    def layer(self, n: int, tensors: dict) -> None:
        entries = write_layer(self.folder, n, tensors, self.meta)
        self.written.probs_bytes += entries.get(layout.ref_file("probs", n), {}).get("bytes", 0)
        self.written.entries.update({self.name(k): e for k, e in entries.items()})

    def head(self, tensors: dict) -> None:
        self.written.entries.update({self.name(k): e for k, e in write_head(self.folder, tensors).items()})


@dataclass
class Decoder:
    """Where decode steps go: step S's layers and head in decode/step_S/ (meta: the prefill's, one new
    row over a cache of T + S - 1), then its tokens.json once its greedy token is known."""
    written: Written
    out_dir: Path
    meta: dict  # the prefill's layer meta, RoPE facts included by the time the first step runs
    batch: object
    tokenizer: object
    save_masks: bool

    def step(self, step: int, fed: dict[str, torch.Tensor]) -> Sink:
        T = self.batch.input_ids.shape[1]
        if not self.written.generated:  # step 1 feeds the prefill's greedy token
            self.written.generated.append(fed["input_ids"][:, 0])
        meta = {**self.meta, "seq_len": 1, "decode_step": step, "cache_len": T + step - 1}
        return Sink(self.written, layout.decode_dir(self.out_dir, step), meta, step)

    def done(self, sink: Sink, fed: dict[str, torch.Tensor], next_ids: torch.Tensor) -> None:
        self.written.generated.append(next_ids)
        entries = write_decode_batch(sink.folder, self.batch, sink.step, fed, torch.stack(self.written.generated, 1),
                                     self.tokenizer, self.save_masks)
        self.written.entries.update({sink.name(k): e for k, e in entries.items()})


def remove_stale(out_dir: Path, written: Container[str]) -> None:
    """Remove the files an earlier run left in out_dir (stale_files, stale_decode_files), each named."""
    for path in stale_files(out_dir, written) + stale_decode_files(out_dir, written):
        path.unlink()
        print(f"removed {path.relative_to(out_dir)} (left by an earlier run)")
    remove_empty_decode_dirs(out_dir)


def stale_decode_files(out_dir: Path, written: Container[str]) -> list[Path]:
    """Step-2 files under decode/step_S/ that this run did not write (more steps, or other settings, before);
    written holds paths inside out_dir (layout.decode_path)."""
    stale = []
    for s in layout.decode_steps(out_dir):
        folder = layout.decode_dir(out_dir, s)
        stale += stale_files(folder, {p.name for p in folder.iterdir() if layout.decode_path(s, p.name) in written})
    return stale


def remove_empty_decode_dirs(out_dir: Path) -> None:
    """The step folders (and decode/) that stale_decode_files emptied; a folder holding anything else stays."""
    for s in layout.decode_steps(out_dir):
        if not any(layout.decode_dir(out_dir, s).iterdir()):
            layout.decode_dir(out_dir, s).rmdir()
    decode = out_dir / layout.DECODE
    if decode.is_dir() and not any(decode.iterdir()):
        decode.rmdir()


def stale_files(out_dir: Path, written: Container[str]) -> list[Path]:
    """Step-2 files in out_dir that this run did not write (left by an earlier run with other settings)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.name not in written and layout.is_step2_file(p.name))


def layer_meta(cfg, batch, model_dir: Path, dtype: torch.dtype, device: torch.device | str,
               streaming: bool, chat: bool) -> dict:
    """A layer's meta file without `layer`: sizes from config.json (normalised RoPE) plus provenance."""
    import transformers

    B, T = batch.input_ids.shape
    return {
        "batch_size": B,
        "seq_len": T,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rope_type": cfg.rope_type,
        "rope_scaling": cfg.rope_scaling,
        # The CPU kernels torch picked: they set the last bit of RoPE's pow (common/llama/rope.py, point 4).
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias,
        "padding_side": batch.padding_side,
        "position_offset": batch.position_offset,
        "dtype": str(dtype).removeprefix("torch."),
        "model_dir": str(model_dir),
        "provenance": {
            "model_dir": str(Path(model_dir).resolve()),
            "config_sha256": sha256_file(Path(model_dir) / "config.json"),
            "source_dtype": cfg.torch_dtype,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "attn_implementation": ATTN_IMPLEMENTATION,
            "streaming": streaming,
            "chat": chat,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        },
    }
