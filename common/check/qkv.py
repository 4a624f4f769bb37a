"""Step 3's files: one layer's inputs read from steps 1 and 2, its recomputation written, its check.

The math itself is common/llama/attention.py; this module only moves arrays between it and the CSV
files named by common/files/layout.py, with every shape taken from meta_layerN.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.check.step_files import check_batch, check_tokens
from common.check.verify import QUANTITIES, compare
from common.files import layout
from common.files.atomic import read_json
from common.files.csv_io import read_csv, write_csv
from common.llama import attention, rope, torch_pow
from common.llama.attention import AttentionWeights


def read_batch(acts_dir: Path, B: int, T: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """attention_mask (B, T), position_ids (B, T) and tokens.json of a step-2 folder, checked (step_files)."""
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
    read(path, shape): read_csv, or a quantized capture's reader (common/files/quant_weights.py)."""
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


def step2_inputs(layers: list[int], quantities: tuple[str, ...] = QUANTITIES) -> list[str]:
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
