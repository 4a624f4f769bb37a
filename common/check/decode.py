"""Decode steps offline: step 2's decode/step_S/ folders read and checked, and the KV cache that steps
3 and 4 build from their own recomputed K and V.

A decode step feeds one new token per prompt. Its query is that one row; its keys and values are
the cache (every earlier token's K and V: the prefill's rows, then each earlier step's row) and
its own. The cache here is never read back from the references: it is the recomputed K and V of
the prefill and of the earlier steps, in order, so an error anywhere in it shows in the later steps.
Its positions are computed as generate() computes them, cumsum(attention mask) - 1 + the capture's
position offset at the new token (each prompt's last position + 1), never read from the capture:
a capture that fed other positions FAILs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.check import meta_check, offline
from common.check.meta_check import RERUN, check_batch, check_tokens
from common.check.verify import compare
from common.cli import InputError
from common.files import layout
from common.files.atomic import read_json
from common.files.csv_io import read_csv, read_csv_blocks, write_csv
from common.llama import forward
from common.llama.kv_cache import Cache, grow, step_positions


@dataclass
class Step:
    """Decode step `step` (1-based) of a step-2 folder: what it fed the model."""
    step: int
    folder: Path  # step 2's decode/step_S/
    metas: dict[int, dict]  # layer -> meta_layerN.json (seq_len 1)
    mask: np.ndarray  # (B, T + S): the cache's tokens (1 real, 0 padding), then the new one
    positions: np.ndarray  # (B, 1): computed from the mask (step_positions), not read
    tokens: dict  # tokens.json: input_ids (B, 1) fed, next_ids (B,) the model's greedy choice

    @property
    def fed(self) -> np.ndarray:
        """(B,) the token ids this step fed."""
        return np.array([row[0] for row in self.tokens["input_ids"]], np.int64)

    @property
    def next_ids(self) -> np.ndarray:
        """(B,) the model's greedy token after this step."""
        return np.array(self.tokens["next_ids"], np.int64)


def read_steps(acts_dir: Path, layers: list[int], B: int, T: int, prefill_mask: np.ndarray) -> list[Step]:
    """Every decode step of a step-2 folder (decode/step_1 .. step_N), checked; [] when there are none."""
    numbers = layout.decode_steps(acts_dir)
    if numbers != list(range(1, len(numbers) + 1)):
        raise InputError(f"{acts_dir / layout.DECODE} holds steps {numbers}, not 1..{len(numbers)}: {RERUN}")
    steps = []
    for s in numbers:
        folder = layout.decode_dir(acts_dir, s)
        metas = meta_check.read_metas(folder, layers)
        for n, meta in metas.items():
            if (meta["batch_size"], meta["seq_len"], meta.get("cache_len")) != (B, 1, T + s - 1):
                raise InputError(f"{folder / layout.meta_file(n)}: not decode step {s} of this batch (batch "
                                 f"{B}, one new row, a cache of {T + s - 1}): {RERUN}")
        mask = read_csv(folder / layout.ATTENTION_MASK, (B, T + s))
        captured = read_csv(folder / layout.POSITION_IDS, (B, 1))
        tokens = read_json(folder / layout.TOKENS, RERUN, kind=None)
        check_batch(mask, captured, folder / layout.ATTENTION_MASK, folder / layout.POSITION_IDS)
        check_tokens(tokens, folder / layout.TOKENS, B, 1)
        if not np.array_equal(mask[:, :T], prefill_mask) or not (mask[:, T:] == 1).all():
            raise InputError(f"{folder / layout.ATTENTION_MASK}: not the prefill's mask followed by {s} real "
                             f"tokens: {RERUN}")
        ids, fed = tokens.get("next_ids"), tokens.get("input_ids")
        if not (isinstance(ids, list) and len(ids) == B and isinstance(fed, list)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in ids + [r[0] for r in fed])):
            raise InputError(f"{folder / layout.TOKENS}: input_ids/next_ids are not {B} token ids: {RERUN}")
        offset = metas[layers[0]].get("position_offset", 0)
        steps.append(Step(s, folder, metas, mask, step_positions(mask, offset), tokens))
    for a, b in zip(steps, steps[1:]):
        if not np.array_equal(a.next_ids, b.fed):
            raise InputError(f"{b.folder / layout.TOKENS}: feeds {b.fed.tolist()}, but step {a.step} chose "
                             f"{a.next_ids.tolist()}: {RERUN}")
    return steps


def with_steps(acts_dir: Path, names: list[str]) -> list[str]:
    """A step-2 folder's file names, and the same names in each of its decode steps (paths inside acts_dir,
    as its manifest lists them): what a step reads, for manifest.HashCheck."""
    last = max(layout.decode_steps(acts_dir), default=0)  # a step missing in between is listed, and gone
    return names + [layout.decode_path(s, name) for s in range(1, last + 1) for name in names]


def step_dir(out_dir: Path, step: int) -> Path:
    """Where a verifying step writes decode step `step`'s files: OUT_DIR/decode/step_S/."""
    return layout.decode_dir(out_dir, step)


Compute = Callable[[np.ndarray, Step, "Cache | None"], dict]  # (x (B, d), step, cache) -> nodes, k and v among them
Write = Callable[[Path, int, dict], list]  # (folder, layer, rows) -> names written


def verify_steps(steps: list[Step], n: int, cache: Cache, compute: Compute, write: Write, out_dir: Path,
                 quantities: tuple[str, ...], atol: float, rtol: float) -> tuple[dict, list[Path]]:
    """Layer n through every decode step, each from its captured x and the cache grown by the step before.

    cache: the prefill's recomputed K and V of layer n. compute gives a step's nodes (as common/check/offline.as_rows
    takes them), which write puts in OUT_DIR/decode/step_S/ and offline.verify compares with step 2's
    decode/step_S/ references. Returns ({(step, n): metrics}, references missing).
    """
    results, missing = {}, []
    for st in steps:
        meta = st.metas[n]
        B = meta["batch_size"]
        nodes = compute(offline.read_layer_input(st.folder, n, meta), st, cache)
        cache = grow(cache, nodes["k"], nodes["v"], B, meta["head_dim"])
        rows = offline.as_rows(nodes, B)  # probs (B, H, 1, P + 1) -> (B*H, P + 1)
        write(step_dir(out_dir, st.step), n, rows)
        every = np.ones(B, bool), np.ones(B * meta["num_heads"], bool)  # one real row per prompt (and head)
        checked, miss = offline.verify(st.folder, n, rows, *every, atol, rtol, quantities)
        if checked:
            results[(st.step, n)] = checked
        missing += miss
    return results, missing


def head_steps(steps: list[Step], x_of: Callable[[Step], np.ndarray], norm_w: np.ndarray, head_w: list[np.ndarray],
               meta: dict, out_dir: Path, atol: float, rtol: float) -> dict[int, dict]:
    """The final norm and the logits of every decode step from x_of(step) (B, d), written to
    OUT_DIR/decode/step_S/ and compared with the step's ref_norm/ref_logits; the greedy token
    (argmax) with the model's next_ids. Returns {step: {"norm": metrics, "logits": metrics,
    "greedy": {"pass", "offline", "model"}}} (norm or logits absent when step 2 did not save them)."""
    out = {}
    for st in steps:
        B, d = st.mask.shape[0], meta["d_model"]
        h = forward.head(x_of(st), norm_w, head_w, meta["rms_norm_eps"])
        folder = step_dir(out_dir, st.step)
        write_csv(folder / layout.NORM, h["norm"])
        write_csv(folder / layout.LOGITS, h["logits"])
        checks, every = {}, np.ones(B, bool)
        for name, ref, ours, cols in (("norm", layout.REF_NORM, h["norm"], d),
                                      ("logits", layout.REF_LOGITS, h["logits"], meta["vocab_size"])):
            if (st.folder / ref).is_file():
                checks[name] = compare(ours, read_csv(st.folder / ref, (B, cols)), every, atol, rtol)
        greedy = h["logits"].argmax(axis=1)
        checks["greedy"] = {"pass": bool(np.array_equal(greedy, st.next_ids)), "offline": greedy.tolist(),
                            "model": st.next_ids.tolist()}
        out[st.step] = checks
    return out


def embedding_rows(weights_dir: Path, meta: dict, ids: set[int]) -> dict[int, np.ndarray]:
    """model.embed_tokens.weight's rows of `ids` (token id -> (d,)), read in blocks: the table is never
    whole in memory."""
    path = weights_dir / layout.weight_file(layout.EMBEDDING)
    V, d = meta["vocab_size"], meta["d_model"]
    block = max(1, offline.HEAD_BLOCK_VALUES // d)
    rows = {}
    for i, rows_block in enumerate(read_csv_blocks(path, (V, d), block)):
        for t in ids:
            if i * block <= t < i * block + len(rows_block):
                rows[t] = rows_block[t - i * block].copy()
    return rows


def chain_steps(steps: list[Step], first: np.ndarray, caches: dict[int, Cache], weights: Callable,
                spec: forward.LayerSpec, embed: dict[int, np.ndarray], norm_w: np.ndarray, head_w: list[np.ndarray],
                meta: dict, out_dir: Path, chain_rtol: float) -> dict[int, dict]:
    """Generate offline: from our own greedy token after the prefill (first, (B,)), each step looks up its
    embedding, runs every layer over the layer's cache (grown in place from caches: the prefill's own
    recomputed K and V), the final norm and the head, and takes the argmax as the next step's token.

    A step is judged by its token (ours must be what the model fed at that step), its logits
    (max_rel <= chain_rtol vs ref_logits) and its greedy choice (== the model's next_ids); the first
    step whose token differs ends the run (later steps would decode another text). Returns
    {step: {"fed": {...}, "x0": metrics or None, "logits": metrics or None, "greedy": {...}}}.
    """
    out, ours = {}, np.asarray(first)
    for st in steps:
        fed = {"pass": bool(np.array_equal(ours, st.fed)), "offline": ours.tolist(), "model": st.fed.tolist()}
        out[st.step] = {"fed": fed}
        if not fed["pass"]:
            break
        B, every = len(ours), np.ones(len(ours), bool)
        x = np.stack([embed[int(t)] for t in ours])  # (B, d): layer 0's input is the fed token's embedding
        x0 = st.folder / layout.layer_file("x", 0)
        out[st.step]["x0"] = (compare(x, read_csv(x0, x.shape), every, 0.0, 0.0) if x0.is_file() else None)
        for n in range(meta["num_layers"]):
            nodes = forward.decoder_layer(x, weights(n), spec, st.positions, st.mask, past_kv=caches[n])
            caches[n] = grow(caches[n], nodes["k"], nodes["v"], B, spec.head_dim)
            x = nodes["out"]
        h = forward.head(x, norm_w, head_w, meta["rms_norm_eps"])
        folder = step_dir(out_dir, st.step)
        write_csv(folder / layout.NORM, h["norm"])
        write_csv(folder / layout.LOGITS, h["logits"])
        ref = st.folder / layout.REF_LOGITS
        out[st.step]["logits"] = (compare(h["logits"], read_csv(ref, h["logits"].shape), every, 0.0, chain_rtol)
                                  if ref.is_file() else None)
        ours = h["logits"].argmax(axis=1)
        out[st.step]["greedy"] = {"pass": bool(np.array_equal(ours, st.next_ids)), "offline": ours.tolist(),
                                  "model": st.next_ids.tolist()}
    return out


def chain_passed(result: dict[int, dict], steps: list[Step]) -> bool:
    """Every step reached, its token, logits and greedy choice the model's."""
    return len(result) == len(steps) and all(
        c["fed"]["pass"] and c["greedy"]["pass"] and (c["logits"] is None or c["logits"]["pass"])
        for c in result.values())
