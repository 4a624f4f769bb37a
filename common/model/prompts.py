"""Prompts -> a padded batch: input ids, attention mask and the position ids the model would use.

Positions follow transformers' generate(): each row counts its own real tokens from 0
(cumsum of the mask - 1), so a left- or right-padded prompt gets the same positions as the
prompt alone; padding slots get position 1, a value that nothing real ever attends to.
A position offset K starts every prompt at K instead (K + cumsum - 1): the same tokens as if a
context of K tokens came before them, without computing it, so that a check reaches the long
positions where RoPE's scaling and float32 angles are hard (common/llama/rope.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import InputError


@dataclass
class PromptBatch:
    prompts: list[str]
    input_ids: torch.Tensor  # (B, T) int64, padded
    attention_mask: torch.Tensor  # (B, T) int64: 1 real token, 0 padding
    position_ids: torch.Tensor  # (B, T) int64
    tokens: list[list[str]]  # (B, T) token strings, padding included
    padding_side: str
    position_offset: int = 0  # the first real token's position in every prompt


def position_ids_from_mask(attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(B, T) positions as generate() builds them, shifted by offset: offset.. over real tokens, 1 on padding."""
    pos = attention_mask.long().cumsum(-1) - 1 + offset
    return pos.masked_fill(attention_mask == 0, 1)


def check_position_offset(offset: int, length: int, max_positions: int | None) -> None:
    """The offset K must leave room for the longest prompt: 0 <= K <= max_position_embeddings - T."""
    if offset < 0:
        raise InputError(f"position offset {offset} is negative: give 0 or more")
    if max_positions is not None and offset + length > max_positions:
        raise InputError(f"position offset {offset} + {length} tokens passes max_position_embeddings "
                         f"({max_positions}, config.json): use an offset of at most {max(max_positions - length, 0)}")


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # tokenizers raises bare Exceptions for a broken tokenizer.json
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{model_dir}: no usable tokenizer ({first}): "
                         "download the model again (tokenizer.json / tokenizer_config.json)") from None


def chat_text(tokenizer, prompt: str) -> str:
    """One user turn through the tokenizer's chat template (jinja2, sandboxed by transformers)."""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        said = " ".join(str(e).split())[:200]
        raise InputError(f"the chat template (tokenizer_config.json / chat_template.jinja) failed: "
                         f"{type(e).__name__}: {said}; fix the template or encode without it") from None
    if not isinstance(text, str):
        raise InputError("the chat template did not produce text: fix it or encode without it")
    return text


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False, padding_side: str = "left",
                   max_positions: int | None = None, vocab_size: int | None = None,
                   position_offset: int = 0) -> PromptBatch:
    """Tokenize prompts (through the chat template with `chat`) into one padded batch; positions from
    position_offset.

    With vocab_size, every id (padding included) must fall inside the embedding.
    """
    if not prompts:
        raise InputError("no prompt given: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"prompt {i} is empty: give it some text")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
            raise InputError(f"prompt {i} is not valid UTF-8: pass the text in UTF-8") from None
    if padding_side not in ("left", "right"):
        raise InputError(f"padding side {padding_side!r} is not left or right")
    if chat:
        if not tokenizer.chat_template:
            raise InputError("this tokenizer has no chat template (tokenizer_config.json): encode without it")
        texts = [chat_text(tokenizer, p) for p in prompts]
        add_special = False  # the template writes the BOS itself
    else:
        texts, add_special = list(prompts), True
    ids = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]
    for i, row in enumerate(ids):
        if not row:
            raise InputError(f"prompt {i} tokenizes to nothing: give it some text")
        if max_positions is not None and len(row) > max_positions:
            raise InputError(f"prompt {i} is {len(row)} tokens, longer than max_position_embeddings "
                             f"({max_positions}): shorten it")
    # Llama-3 tokenizers have no pad token; any id works (the mask hides it), EOS is the convention.
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    B, T = len(ids), max(len(r) for r in ids)
    check_position_offset(position_offset, T, max_positions)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(ids):
        s = T - len(row) if padding_side == "left" else 0
        input_ids[b, s:s + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, s:s + len(row)] = 1
    if vocab_size is not None:
        too_big = [i for row in ids for i in row] + [pad_id]
        if not all(0 <= i < vocab_size for i in too_big):
            bad = next(i for i in too_big if not 0 <= i < vocab_size)
            raise InputError(f"the tokenizer gives id {bad}, outside the embedding (vocab_size {vocab_size}): "
                             "the tokenizer files do not belong to this model; download the model again")
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()]
    position_ids = position_ids_from_mask(attention_mask, position_offset)
    return PromptBatch(list(prompts), input_ids, attention_mask, position_ids, tokens, padding_side, position_offset)
