"""Step 2's files as steps 3 and 4 read them: the checks at their door, one function per file kind
(meta files, the batch, tokens.json).

A value that parses but cannot be right (a mask of 0.5 or NaN, a position of -1 or 2.5, zero
heads, rope_theta NaN) would otherwise flow into the recomputation and give NaN or a wrong PASS/FAIL;
each is an InputError naming the file. Shapes are checked where the CSVs are read (read_csv with
the shape meta implies), so meta that disagrees with a CSV is caught there, naming both.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.cli import InputError
from common.files import layout
from common.files.atomic import read_json
from common.llama.attention import check_heads
from common.llama.rope import check_scaling

RERUN = "run 2_get_x.py again"
META_COUNTS = ("batch_size", "seq_len", "d_model", "num_heads", "num_kv_heads", "head_dim")


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def check_meta_values(meta: dict, path: Path) -> None:
    """Types and ranges of meta_layerN.json's fields (their presence is checked by the caller)."""
    for key in META_COUNTS:
        if key in meta and not _positive_int(meta[key]):
            raise InputError(f"{path}: {key} is {meta[key]!r}, not a positive integer: {RERUN}")
    if "head_dim" in meta and meta["head_dim"] % 2:
        raise InputError(f"{path}: head_dim {meta['head_dim']} is odd: RoPE rotates pairs: {RERUN}")
    theta = meta.get("rope_theta")
    if "rope_theta" in meta and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                 or not math.isfinite(theta) or theta <= 0):
        raise InputError(f"{path}: rope_theta is {theta!r}, not a finite number > 0: {RERUN}")
    scaling = meta.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise InputError(f"{path}: rope_scaling is a {type(scaling).__name__}, not a mapping: {RERUN}")
        for k, v in scaling.items():
            if k not in ("rope_type", "type") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                   or not math.isfinite(v) or v <= 0):
                raise InputError(f"{path}: rope_scaling {k} is {v!r}, not a finite number > 0: {RERUN}")
    if "attention_bias" in meta and not isinstance(meta["attention_bias"], bool):
        raise InputError(f"{path}: attention_bias is {meta['attention_bias']!r}, not true or false: {RERUN}")
    if "dtype" in meta and not isinstance(meta["dtype"], str):
        raise InputError(f"{path}: dtype is {meta['dtype']!r}, not a name: {RERUN}")
    if "torch_cpu_capability" in meta and not isinstance(meta["torch_cpu_capability"], str):
        raise InputError(f"{path}: torch_cpu_capability is {meta['torch_cpu_capability']!r}, not a name: {RERUN}")
    freqs = meta.get("rope_inv_freq")
    if "rope_inv_freq" in meta and not (isinstance(freqs, list) and freqs and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0 for f in freqs)):
        raise InputError(f"{path}: rope_inv_freq is not a list of finite numbers > 0: {RERUN}")


def check_batch(mask: np.ndarray, positions: np.ndarray, mask_path: Path, positions_path: Path) -> None:
    """attention_mask only 0/1 with a real token in every row; positions whole numbers >= 0."""
    if not np.isin(mask, (0.0, 1.0)).all():
        bad = mask[~np.isin(mask, (0.0, 1.0))].flat[0]
        raise InputError(f"{mask_path}: holds {bad!r}; a mask is only 0 (padding) and 1 (real token): {RERUN}")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise InputError(f"{mask_path}: prompt {empty[0]} has no real token (a row of zeros): {RERUN}")
    bad = ~np.isfinite(positions) | (positions < 0) | (positions != np.round(positions))
    if bad.any():
        raise InputError(f"{positions_path}: holds {positions[bad].flat[0]!r}; positions are whole numbers "
                         f">= 0: {RERUN}")


def check_tokens(tokens, path: Path, B: int, T: int) -> None:
    """tokens.json: an object whose input_ids/tokens, where present, are B rows of T entries."""
    if not isinstance(tokens, dict):
        raise InputError(f"{path} holds a {type(tokens).__name__}, not an object: {RERUN}")
    for key in ("input_ids", "tokens"):
        rows = tokens.get(key)
        if rows is not None and not (isinstance(rows, list) and len(rows) == B
                                     and all(isinstance(r, list) and len(r) == T for r in rows)):
            raise InputError(f"{path}: {key} is not {B} rows of {T} entries (meta_layerN.json's batch): {RERUN}")


def check_meta(meta: dict, path: Path) -> None:
    """The keys a later step needs, a supported RoPE and whole GQA groups."""
    missing = [k for k in layout.META_KEYS if k not in meta]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: run 2_get_x.py again")
    check_meta_values(meta, path)  # types and ranges: positive sizes, finite rope_theta, a mapping for rope_scaling
    try:
        rope_type = check_scaling(meta["rope_scaling"])
        check_heads(meta["num_heads"], meta["num_kv_heads"])
    except ValueError as e:
        raise InputError(f"{path}: {e}; refusing to guess") from None
    if meta["rope_type"] != rope_type:
        raise InputError(f"{path}: rope_type {meta['rope_type']!r} disagrees with rope_scaling "
                         f"{meta['rope_scaling']}: run 2_get_x.py again")


def read_metas(acts_dir: Path, layers: list[int]) -> dict[int, dict]:
    """layer -> checked meta_layerN.json; all of one batch (the same batch size and sequence length)."""
    metas = {}
    for n in layers:
        path = acts_dir / layout.meta_file(n)
        metas[n] = read_json(path, "run 2_get_x.py again")
        check_meta(metas[n], path)
        first = metas[layers[0]]
        if (metas[n]["batch_size"], metas[n]["seq_len"]) != (first["batch_size"], first["seq_len"]):
            raise InputError(f"{path} disagrees with {layout.meta_file(layers[0])} on batch size or sequence "
                             "length: run 2_get_x.py again")
    return metas
