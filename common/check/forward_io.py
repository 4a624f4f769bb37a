"""Step 4's files: a layer's weights and inputs read from steps 1 and 2, its nodes written and checked.

The math is common/llama/forward.py; this module only moves arrays between it and the CSV files named
by common/files/layout.py, every shape taken from meta_model.json, and refuses what the math does not
implement (another activation, another norm) instead of computing something else.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from common.check import qkv
from common.cli import InputError
from common.files import layout
from common.files.atomic import read_json
from common.files.csv_io import read_csv, read_csv_blocks, write_csv
from common.llama import forward, mlp, norm
from common.llama.attention import AttentionWeights
from common.llama.mlp import MLPWeights

MODEL_KEYS = ("num_layers", "vocab_size", "intermediate_size", "hidden_act", "mlp_bias", "norm_class",
              "tie_word_embeddings", "logits", *layout.META_KEYS, "rms_norm_eps")
# Nodes step 4 checks per layer, in forward order: its own files plus step 3's quantities
# (qkv.verify compares them, xnorm against step 2's xnorm_layerN.csv).
CHECKED = ("xnorm", "q", "k", "v", "probs", "attn", "h", "hnorm", "act", "mlp", "out")


def read_model_meta(acts_dir: Path, model_dir: str | Path) -> dict:
    """meta_model.json, checked: every key, an activation and a norm that common/ implements."""
    path = acts_dir / layout.META_MODEL
    meta = read_json(path, layout.rerun_step2(model_dir))
    missing = [k for k in MODEL_KEYS if k not in meta]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: {layout.rerun_step2(model_dir)}")
    layout.check_meta(meta, path)
    if meta["hidden_act"] not in mlp.ACTIVATIONS:
        raise InputError(f"{path}: hidden_act {meta['hidden_act']!r} is not supported (supported: "
                         f"{', '.join(mlp.ACTIVATIONS)}); refusing to compute another activation")
    for key in ("norm_class", "post_norm_class"):
        if meta.get(key, meta["norm_class"]) not in norm.SUPPORTED_NORMS:
            raise InputError(f"{path}: the model's norm is {meta[key]!r}, whose formula is not Llama's RMSNorm "
                             f"(supported: {', '.join(norm.SUPPORTED_NORMS)}); refusing to guess")
    return meta


def layer_spec(meta: dict, pow_lanes: int | None = None) -> forward.LayerSpec:
    return forward.LayerSpec(meta["num_heads"], meta["num_kv_heads"], meta["head_dim"], meta["rope_theta"],
                             meta.get("rope_scaling"), meta["rms_norm_eps"], meta["hidden_act"], pow_lanes)


def step1_command(meta: dict, weights_dir: Path, layers: list[int], head: bool, model_dir: str | Path) -> str:
    """The step-1 command that exports what step 4 needs: everything, or these layers (and the head)."""
    src = shlex.quote(str(meta.get("model_dir") or model_dir))
    cmd = f"python 1_model_weights.py --model-dir {src} --out-dir {shlex.quote(str(weights_dir))}"
    if head and layers == list(range(meta["num_layers"])):
        return cmd
    parts = [r"model\.layers\.(" + "|".join(map(str, layers)) + r")\."] if layers else []
    if head:
        parts += [r"model\.norm\.", r"model\.embed_tokens\." if meta["tie_word_embeddings"] else r"lm_head\."]
    return f"{cmd} --filter {shlex.quote('^(' + '|'.join(parts) + ')')}"


def weight_files(weights_dir: Path, meta: dict, layers: list[int], head: bool) -> list[Path]:
    """Every step-1 file step 4 reads: the layers' tensors, and (with `head`) the final norm and the head."""
    files = [p for n in layers
             for p in layout.layer_weight_files(weights_dir, n, meta["attention_bias"], meta["mlp_bias"]).values()]
    if head:
        files += list(layout.head_weight_files(weights_dir, meta["tie_word_embeddings"]).values())
    return files


def step2_inputs(mode: str, layers: list[int]) -> list[str]:
    """Every step-2 file step 4 reads. Layer mode: each layer's meta, x and references of CHECKED (ref_out
    included: the head's input); chain mode: x_layer0 and each layer's ref_out. Both: batch and model files."""
    per_layer = (qkv.step2_inputs(layers, CHECKED) if mode == "layer"
                 else [layout.layer_file("x", 0), *(layout.ref_file("out", n) for n in layers)])
    return [layout.META_MODEL, layout.VOCAB, layout.REF_NORM, layout.REF_LOGITS, *layout.BATCH_FILES, *per_layer]


def check_weights(weights_dir: Path, meta: dict, layers: list[int], head: bool, model_dir: str | Path) -> None:
    """Every weight file step 4 will read exists, or one InputError naming the step-1 command."""
    missing = [p for p in weight_files(weights_dir, meta, layers, head) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{missing[0]} is missing{more}: run {step1_command(meta, weights_dir, layers, head, model_dir)}")


def _proj_shapes(meta: dict) -> dict[str, tuple[int, int]]:
    d, H, Hkv, Dh, I = (meta[k] for k in ("d_model", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"))
    return {"q_proj": (H * Dh, d), "k_proj": (Hkv * Dh, d), "v_proj": (Hkv * Dh, d), "o_proj": (d, H * Dh),
            "gate_proj": (I, d), "up_proj": (I, d), "down_proj": (d, I)}


def read_layer_weights(weights_dir: Path, n: int, meta: dict, read=read_csv) -> forward.LayerWeights:
    """Every tensor of layer n from step 1's CSV, each checked against meta's sizes.
    read(path, shape): read_csv, or a quantized capture's reader (common/files/quant_weights.py)."""
    shapes = {**_proj_shapes(meta), **{norm: (meta["d_model"],) for norm in layout.NORMS}}
    arrays = {}
    for name, path in layout.layer_weight_files(weights_dir, n, meta["attention_bias"], meta["mlp_bias"]).items():
        module, kind = name.split(".")[-2:]  # model.layers.N.<block>.<module>.<kind>, or ...<norm>.weight
        arrays[(module, kind)] = read(path, shapes[module] if kind == "weight" else shapes[module][:1])
    get = arrays.get
    return forward.LayerWeights(
        input_layernorm=arrays[("input_layernorm", "weight")],
        attn=AttentionWeights(*(get((p, "weight")) for p in layout.ATTENTION_PROJ),
                              *(get((p, "bias")) for p in layout.ATTENTION_PROJ)),
        post_attention_layernorm=arrays[("post_attention_layernorm", "weight")],
        mlp=MLPWeights(*(get((p, "weight")) for p in layout.MLP_PROJ), *(get((p, "bias")) for p in layout.MLP_PROJ)))


HEAD_BLOCK_VALUES = 1 << 24  # the head is read in row blocks of ~64 MB of float32: never whole in memory


def read_head_weights(weights_dir: Path, meta: dict) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """The final norm's weight (d,) and the head's rows (lm_head, or the embedding when tied), as an
    iterator of (rows, d) blocks in order (read as they are consumed)."""
    norm_w, head_w = layout.head_weight_files(weights_dir, meta["tie_word_embeddings"]).values()
    V, d = meta["vocab_size"], meta["d_model"]
    return read_csv(norm_w, (d,)), read_csv_blocks(head_w, (V, d), max(1, HEAD_BLOCK_VALUES // d))


def read_vocab(acts_dir: Path, vocab_size: int) -> list[str] | None:
    """Token id -> text from step 2's vocab.json; None when there is none (tables then show ids)."""
    path = acts_dir / layout.VOCAB
    if not path.is_file():
        return None
    tokens = read_json(path, "run 2_get_x.py again").get("tokens")
    return tokens if isinstance(tokens, list) and len(tokens) == vocab_size else None


def write_layer_nodes(out_dir: Path, n: int, nodes: dict[str, np.ndarray]) -> list[str]:
    """Step 4's files of layer n (layout.FORWARD_STEMS); returns their names."""
    names = []
    for stem in layout.FORWARD_STEMS:
        names.append(layout.layer_file(stem, n))
        write_csv(out_dir / names[-1], nodes[stem])
    return names


def read_ref_logits(acts_dir: Path, meta: dict, n_rows: int) -> np.ndarray:
    return read_csv(acts_dir / layout.REF_LOGITS, (n_rows, meta["vocab_size"]))


def logit_rows(meta: dict, attention_mask: np.ndarray) -> np.ndarray | None:
    """The rows of (B*T) that ref_logits holds: None (all) for LOGITS "all", else each prompt's last real one."""
    return None if meta["logits"] == "all" else forward.last_real_rows(attention_mask)


@dataclass
class Inputs:
    """What both of step 4's modes read before any work: folders, meta_model.json, the batch, the vocabulary."""
    args: argparse.Namespace
    acts_dir: Path
    weights_dir: Path
    out_dir: Path
    meta: dict
    mask: np.ndarray  # (B, T), 1 = real token
    position_ids: np.ndarray  # (B, T)
    real_rows: np.ndarray  # (B*T,) bool: rows of real tokens
    real_probs: np.ndarray  # (B*H*T,) bool: rows of a probs file whose query is real
    last: np.ndarray  # (B,) each prompt's last real row
    prompts: list[str]
    vocab: list[str] | None
    settings: dict
    t0: float
    pow_lanes: int | None = None  # RoPE's pow as torch's on the capture machine (qkv.rope_check)
    steps: list = field(default_factory=list)  # common.check.decode.Step: step 2's decode steps ([] without)
    read_weight: Callable = read_csv  # (path, shape) -> array; a quantized capture's: common/files/quant_weights.py
    quantities: tuple[str, ...] = CHECKED  # the report's quantities (a quantized capture adds xscale)
    head_weight: Callable | None = None  # --quant-head: () -> the head's QuantWeight

    def read_head(self) -> tuple[np.ndarray, Iterator]:
        """The final norm's weight and the head's blocks: read_head_weights, or the quantized head whole."""
        norm_w, blocks = read_head_weights(self.weights_dir, self.meta)
        return (norm_w, blocks) if self.head_weight is None else (norm_w, iter([self.head_weight()]))

    @property
    def n_rows(self) -> int:
        return self.meta["batch_size"] * self.meta["seq_len"]

    def logit_checked_rows(self) -> np.ndarray:
        """Which rows of ref_logits are real: every real token ("all"), or all B rows ("last")."""
        return self.real_rows if self.meta["logits"] == "all" else np.ones(len(self.last), bool)

    def at_last(self, logits: np.ndarray) -> np.ndarray:
        """The rows of each prompt's last real token: (B, V)."""
        return logits[self.last] if self.meta["logits"] == "all" else logits
