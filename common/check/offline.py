"""An offline run's files (steps 3 and 4): a layer's weights and inputs read from steps 1 and 2, its
recomputed nodes written and checked against the model's.

The math is common/llama/ (attention for step 3, the whole layer and the head for step 4); this
module only moves arrays between it and the CSV files named by common/files/layout.py, every shape
taken from the meta files, and refuses what the math does not implement (another activation,
another norm) instead of computing something else.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterator

import numpy as np

from common.check import meta_check
from common.check.meta_check import check_batch, check_tokens
from common.check.verify import QUANTITIES, compare
from common.cli import InputError
from common.files import layout
from common.files.atomic import read_json
from common.files.csv_io import read_csv, read_csv_blocks, write_csv
from common.llama import attention, forward, kv_cache, mlp, norm, rope, torch_pow
from common.llama.attention import AttentionWeights
from common.llama.mlp import MLPWeights
from common.llama.spec import LayerSpec


def read_batch(acts_dir: Path, B: int, T: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """attention_mask (B, T), position_ids (B, T) and tokens.json of a step-2 folder, checked (meta_check)."""
    mask = read_csv(acts_dir / layout.ATTENTION_MASK, (B, T))
    position_ids = read_csv(acts_dir / layout.POSITION_IDS, (B, T))
    tokens = read_json(acts_dir / layout.TOKENS, "run 2_get_x.py again", kind=None)
    check_batch(mask, position_ids, acts_dir / layout.ATTENTION_MASK, acts_dir / layout.POSITION_IDS)
    check_tokens(tokens, acts_dir / layout.TOKENS, B, T)
    return mask, position_ids, tokens


def rope_check(meta: dict) -> tuple[int, str]:
    """(lanes, note): the SIMD width for the offline RoPE's pow, and a line on its frequencies.

    The lanes come from the capture's torch_cpu_capability (common/llama/rope.py, point 4); meta files
    written before it was recorded get this machine's. The note compares the offline inv_freq with
    the model's own (rope_inv_freq) and starts with "warning:" when any differ: an ulp of a frequency
    is visible at long positions, where Q and K would then FAIL.
    """
    capability = meta.get("torch_cpu_capability")
    lanes = torch_pow.lanes_of(capability)
    which = capability or f"{torch_pow.local_capability()} (this machine's; not in the meta)"
    ours = rope.rope_inv_freq(meta["head_dim"], meta["rope_theta"], meta["rope_scaling"], lanes)
    if "rope_inv_freq" not in meta:
        return lanes, f"RoPE pow as torch's under {which}; no rope_inv_freq in the meta to compare with"
    theirs = np.asarray(meta["rope_inv_freq"], np.float32)
    if theirs.shape != ours.shape:  # a meta edited by hand; its CSVs' shapes are checked where they are read
        return lanes, (f"warning: the model's rope_inv_freq has {theirs.size} frequencies, head_dim "
                       f"{meta['head_dim']} gives {ours.size}: not compared")
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32))  # both > 0: ordered as ints
    differ = int((ulps > 0).sum())
    if not differ:
        return lanes, f"RoPE inv_freq equals the model's bit for bit ({ours.size} frequencies, {which})"
    return lanes, (f"warning: {differ} of {ours.size} RoPE frequencies differ from the model's by up to "
                   f"{int(ulps.max())} ulp (computed as torch's pow under {which}): Q and K may FAIL at long "
                   "positions for that reason alone (common/llama/rope.py, point 4)")


def read_attention_weights(weights_dir: Path, n: int, meta: dict, read=read_csv) -> AttentionWeights:
    """Layer n's q/k/v/o_proj (and biases) from step 1's CSV, each checked against meta's sizes.
    read(path, shape): read_csv, or a quantized capture's reader (common/check/quant_check.QuantRun)."""
    d, H, Hkv, Dh = meta["d_model"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]
    out_dims = {"q_proj": H * Dh, "k_proj": Hkv * Dh, "v_proj": Hkv * Dh, "o_proj": d}
    in_dims = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": H * Dh}
    arrays = {}
    for name, path in layout.attention_weight_files(weights_dir, n, meta["attention_bias"]).items():
        proj, kind = name.split(".")[-2:]
        shape = (out_dims[proj], in_dims[proj]) if kind == "weight" else (out_dims[proj],)
        arrays[("w" if kind == "weight" else "b") + proj[0]] = read(path, shape)
    return AttentionWeights(**arrays)


def read_xnorm(acts_dir: Path, n: int, meta: dict) -> np.ndarray:
    """What q/k/v_proj of layer n saw, as captured: (B*T, d), batch-major rows."""
    return read_csv(acts_dir / layout.layer_file("xnorm", n), (meta["batch_size"] * meta["seq_len"], meta["d_model"]))


def read_layer_input(acts_dir: Path, n: int, meta: dict) -> np.ndarray:
    """x entering layer n, as captured: (B*T, d), batch-major rows."""
    return read_csv(acts_dir / layout.layer_file("x", n), (meta["batch_size"] * meta["seq_len"], meta["d_model"]))


def read_input_norm(weights_dir: Path, n: int, meta: dict) -> np.ndarray:
    """Layer n's input_layernorm weight (d,)."""
    name = layout.norm_weight_name(n, "input_layernorm")
    return read_csv(weights_dir / layout.weight_file(name), (meta["d_model"],))


def norm_and_attention(x: np.ndarray, norm_w: np.ndarray, w: AttentionWeights, layer: LayerSpec,
                       positions: np.ndarray, mask: np.ndarray, keep_probs: str | tuple[int, int] | None = None,
                       past_kv: kv_cache.Cache | None = None) -> dict[str, np.ndarray]:
    """Step 3's recomputation of one layer: the input norm, then attention (xnorm, q, k, v, probs, attn)."""
    xnorm = norm.rms_norm(x, norm_w, layer.rms_norm_eps)
    return {"xnorm": xnorm, **attention.attention_block(xnorm, w, layer, positions, mask, keep_probs, past_kv)}


def attention_step(norm_w: np.ndarray, w: AttentionWeights, layer: LayerSpec, x: np.ndarray, step,
                   cache: kv_cache.Cache) -> dict[str, np.ndarray]:
    """One decode step of one layer as step 3 checks it (a decode.Compute once norm_w, w, layer are bound)."""
    return norm_and_attention(x, norm_w, w, layer, step.positions, step.mask, "all", cache)


def layer_step(w: forward.LayerWeights, layer: LayerSpec, x: np.ndarray, step, cache: kv_cache.Cache
               ) -> dict[str, np.ndarray]:
    """One decode step of one layer as step 4 checks it: every node, attention over the layer's cache."""
    return forward.decoder_layer(x, w, layer, step.positions, step.mask, "all", past_kv=cache)


def probs_to_keep(seq_len: int, plot: tuple[int, int] | None) -> str | tuple[int, int] | None:
    """What attention_block keeps of the probabilities: every head's ("all", to write and check them)
    up to attention.PROBS_MAX_SEQ_LEN tokens; past that the plotted (prompt, head)'s only, or none."""
    return "all" if seq_len <= attention.PROBS_MAX_SEQ_LEN else plot


def as_rows(out: dict[str, np.ndarray], n_rows: int, with_probs: bool = True) -> dict[str, np.ndarray]:
    """Every quantity as its file holds it: (B*T, C), and probs (B, H, T, T) -> (B*H*T, T) (when kept)."""
    rows = {k: v.reshape(n_rows, -1) for k, v in out.items() if k != "probs"}
    if with_probs and out.get("probs") is not None:
        rows["probs"] = out["probs"].reshape(-1, out["probs"].shape[-1])
    return rows


def real_prob_rows(attention_mask: np.ndarray, num_heads: int) -> np.ndarray:
    """Which rows (b*H + h)*T + t of a probs file are real queries: (B, T) -> (B*H*T,) bool."""
    B, T = attention_mask.shape
    return np.broadcast_to(attention_mask[:, None, :] > 0, (B, num_heads, T)).reshape(-1)


def write_outputs(out_dir: Path, n: int, rows: dict[str, np.ndarray]) -> list[str]:
    """q/k/v/probs/attn_layerN.csv (probs when kept): the ref_ files' shapes and column order; returns the names."""
    stems = [qn for qn in layout.QKV_STEMS if qn in rows]
    for qn in stems:
        write_csv(out_dir / layout.layer_file(qn, n), rows[qn])
    return [layout.layer_file(qn, n) for qn in stems]


def reference_name(quantity: str, n: int) -> str:
    """The model's value of a quantity: its ref_ file; for xnorm, step 2's xnorm_layerN.csv."""
    return layout.layer_file("xnorm", n) if quantity == "xnorm" else layout.ref_file(quantity, n)


def reference_file(acts_dir: Path, quantity: str, n: int) -> Path:
    return acts_dir / reference_name(quantity, n)


def qkv_inputs(layers: list[int], quantities: tuple[str, ...] = QUANTITIES) -> list[str]:
    """Every step-2 file a check of `quantities` reads: the batch files, each layer's meta, x and references."""
    return [*layout.BATCH_FILES, *(name for n in layers for name in (
        layout.meta_file(n), layout.layer_file("x", n), *(reference_name(qn, n) for qn in quantities)))]


def verify(acts_dir: Path, n: int, rows: dict[str, np.ndarray], real_rows: np.ndarray, real_probs: np.ndarray,
           atol: float, rtol: float, quantities: tuple[str, ...] = QUANTITIES) -> tuple[dict[str, dict], list[Path]]:
    """Compare each recomputed quantity (as_rows) with the model's: ({quantity: metrics}, references missing)."""
    results, missing = {}, []
    for qn in (qn for qn in quantities if qn in rows):  # probs only when kept (a prompt short enough)
        ref_path = reference_file(acts_dir, qn, n)
        if not ref_path.is_file():
            missing.append(ref_path)
            continue
        ref = read_csv(ref_path, rows[qn].shape)
        results[qn] = compare(rows[qn], ref, real_probs if qn == "probs" else real_rows, atol, rtol)
    return results, missing


# --- step 4: every node of a layer, and the head --------------------------------------------------

MODEL_KEYS = ("num_layers", "vocab_size", "intermediate_size", "hidden_act", "mlp_bias", "norm_class",
              "tie_word_embeddings", "logits", *layout.META_KEYS, "rms_norm_eps")
# Nodes step 4 checks per layer, in forward order: its own files plus step 3's quantities
# (verify compares them, xnorm against step 2's xnorm_layerN.csv).
CHECKED = ("xnorm", "q", "k", "v", "probs", "attn", "h", "hnorm", "act", "mlp", "out")


def read_model_meta(acts_dir: Path, model_dir: str | Path) -> dict:
    """meta_model.json, checked: every key, an activation and a norm that common/ implements."""
    path = acts_dir / layout.META_MODEL
    meta = read_json(path, layout.rerun_step2(model_dir))
    missing = [k for k in MODEL_KEYS if k not in meta]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: {layout.rerun_step2(model_dir)}")
    meta_check.check_meta(meta, path)
    if meta["hidden_act"] not in mlp.ACTIVATIONS:
        raise InputError(f"{path}: hidden_act {meta['hidden_act']!r} is not supported (supported: "
                         f"{', '.join(mlp.ACTIVATIONS)}); refusing to compute another activation")
    for key in ("norm_class", "post_norm_class"):
        if meta.get(key, meta["norm_class"]) not in norm.SUPPORTED_NORMS:
            raise InputError(f"{path}: the model's norm is {meta[key]!r}, whose formula is not Llama's RMSNorm "
                             f"(supported: {', '.join(norm.SUPPORTED_NORMS)}); refusing to guess")
    return meta


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


def forward_inputs(mode: str, layers: list[int]) -> list[str]:
    """Every step-2 file step 4 reads. Layer mode: each layer's meta, x and references of CHECKED (ref_out
    included: the head's input); chain mode: x_layer0 and each layer's ref_out. Both: batch and model files."""
    per_layer = (qkv_inputs(layers, CHECKED) if mode == "layer"
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
    """Every tensor of layer n from step 1's CSV, each checked against meta's sizes (read: as above)."""
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
