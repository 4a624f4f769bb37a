"""An offline run (steps 3 and 4). Its opening: the folders, the layers, and once the step's own files
are checked, the shared rest: the RoPE check, step 1's hashes, the output folder, the batch and the
decode steps. Then one layer recomputed from its captured input, written and checked, with its
decode steps. A step reads as its recipe.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.check import decode, offline, quant_check
from common.check.verify import QUANTITIES, low_precision_note
from common.cli import InputError, parse_layers
from common.files import layout, manifest, quant_weights
from common.files.atomic import output_folder
from common.llama import kv_cache
from common.llama.spec import LayerSpec


@dataclass(frozen=True)
class Folders:
    """Where a run reads (step 2's acts, step 1's weights) and writes; defaults under outputs/<model folder>/."""
    model_dir: Path
    acts: Path
    weights: Path
    out: Path


def folders(model_dir: Path, acts_dir: Path | None, weights_dir: Path | None, out_dir: Path | None,
            out_folder: str, quant: str | None = None) -> Folders:
    """quant: a scheme's name (--quant): the default folders of its run, x_all_layers-<scheme>, ..."""
    default = lambda folder: layout.default_dir(model_dir, layout.quant_folder(folder, quant))
    return Folders(model_dir, acts_dir or default(layout.ACTS), weights_dir or default(layout.WEIGHTS),
                   out_dir or default(out_folder))


def choose_layers(spec: str | None, acts_dir: Path, model_dir: Path) -> list[int]:
    """--layers (None: every layer) checked against the capture, which may hold fewer layers than the
    model; each chosen layer with its meta file in the step-2 folder."""
    have = layout.step2_layers(acts_dir, model_dir)
    layers = parse_layers(spec, have[-1] + 1, f"the capture in {acts_dir}")
    missing = [n for n in layers or [] if n not in have]
    if missing:
        raise InputError(f"{acts_dir / layout.meta_file(missing[0])} is missing (layers there: {have[0]}..{have[-1]}): "
                         f"choose --layers among them or {layout.rerun_step2(layout.capture_source(acts_dir, model_dir))}")
    return layers or have


@dataclass(frozen=True)
class Batch:
    """What steps 3 and 4 read once their own files are checked: the batch, RoPE's pow, the decode steps."""
    mask: np.ndarray  # (B, T), 1 = real token
    position_ids: np.ndarray  # (B, T)
    tokens: dict  # tokens.json
    real_rows: np.ndarray  # (B*T,) bool: rows of real tokens, batch-major like the CSV rows
    pow_lanes: int  # RoPE's pow as torch's on the capture machine (offline.rope_check)
    rope_note: str
    steps: list[decode.Step]  # step 2's --generate: [] without

    def describe(self) -> str:
        B, T = self.mask.shape
        return f"{B} prompts x {T} positions, {int(self.real_rows.sum())} real tokens"


def attention_weights(f: Folders, metas: dict[int, dict], layers: list[int], quant) -> tuple[list[str], "quant_check.QuantRun"]:
    """Step 3's weight files (names, for the hash check) of the chosen layers, float or of the capture's
    scheme (step 1 --quant), checked against the capture; and the run's QuantRun (no scheme: float)."""
    first = metas[layers[0]]
    scheme, quant_head = quant_weights.scheme_of(first, f.acts / layout.meta_file(layers[0]), quant)
    paths1 = [p for n in layers for p in layout.qkv_weight_files(f.weights, n, metas[n]["attention_bias"]).values()]
    quant_weights.check(f.weights, paths1, scheme, quant_head, first["model_dir"], f.acts)
    if scheme is None:
        layout.check_attention_weights(f.weights, metas)
    return [p.name for p in quant_weights.files(paths1, scheme, quant_head)], quant_check.QuantRun(scheme, quant_head)


def open_batch(f: Folders, hashes: manifest.HashCheck, meta: dict, step1_files: list[str], step_layers: list[int],
               rtol: float) -> Batch:
    """The rest of an opening once a step has checked its metas and named step 1's files: the RoPE check
    (printed), those files hashed, the input-files line, the output folder (never into or around what is
    read), the low-precision note, the batch and its decode steps (of step_layers)."""
    pow_lanes, rope_note = offline.rope_check(meta)  # the same RoPE in every layer
    print(rope_note if rope_note.startswith("warning") else f"note: {rope_note}")
    hashes.folder(f.weights, step1_files, "step 1", layout.rerun_step1(meta["model_dir"], f.weights))
    print(f"input files: {hashes.line()}")
    output_folder(f.out, inputs=[f.acts, f.weights], create=False)
    if note := low_precision_note(meta["dtype"], rtol):
        print(note)
    B, T = meta["batch_size"], meta["seq_len"]
    mask, position_ids, tokens = offline.read_batch(f.acts, B, T)
    real_rows = mask.reshape(B * T) > 0  # (B, T) -> (B*T,)
    steps = decode.read_steps(f.acts, step_layers, B, T, mask)
    return Batch(mask, position_ids, tokens, real_rows, pow_lanes, rope_note, steps)


def attention_layer(f: Folders, n: int, meta: dict, batch: Batch, plot: tuple[int, int] | None, atol: float,
                    rtol: float, quant: quant_check.QuantRun = quant_check.FLOAT
                    ) -> tuple[dict, list[Path], np.ndarray | None]:
    """Step 3's layer n from its captured x: the input norm, Q, K, V and attention, written and checked;
    then its decode steps over a cache of the K and V just recomputed. plot: (prompt, head) whose
    probabilities come back (T, T). Returns ({layer or (step, layer): metrics}, references missing, probs)."""
    B, T = batch.mask.shape
    x, w = offline.read_layer_input(f.acts, n, meta), offline.read_attention_weights(f.weights, n, meta, quant.read)
    write = quant_check.writing_tapes(offline.write_outputs, quant_check.linears(w))  # + xq/xscale/acc files
    norm_w = offline.read_input_norm(f.weights, n, meta)  # (d,): the prefill's and every decode step's
    layer = LayerSpec.from_meta(meta, batch.pow_lanes)
    keep = offline.probs_to_keep(T, plot)
    out = offline.norm_and_attention(x, norm_w, w, layer, batch.position_ids, batch.mask, keep)  # xnorm, q, k, ...
    probs = None if plot is None else out["probs"][plot].copy() if keep == "all" else out["probs"]  # (T, T)
    rows = offline.as_rows(out, B * T, with_probs=keep == "all")
    del x, out  # before the references are read: a long prompt's peak memory is here
    write(f.out, n, rows)
    real_probs = offline.real_prob_rows(batch.mask, meta["num_heads"])  # (B*H*T,)
    checked, missing = offline.verify(f.acts, n, rows, batch.real_rows, real_probs, atol, rtol)
    checked.update(quant_check.check_layer(f.acts, n, w, batch.real_rows))  # {} for float weights
    results = {n: checked} if checked else {}
    if batch.steps:
        cache = kv_cache.grow(None, rows["k"], rows["v"], B, meta["head_dim"])
        scales: dict = {}
        compute = quant_check.checking(functools.partial(offline.attention_step, norm_w, w, layer), w, n, scales)
        checked, more = decode.verify_steps(batch.steps, n, cache, compute, write, f.out, QUANTITIES, atol, rtol)
        results.update({key: {**c, **scales.get(key, {})} for key, c in checked.items()})
        missing += more
    return results, missing, probs
