"""Step 3: recompute the input norm, Q, K, V and the attention from CSV files alone, and verify them.

Reads only ACTS_DIR (step 2: x_layerN.csv, meta_layerN.json, attention_mask.csv, position_ids.csv,
tokens.json, and the model's own xnorm_layerN.csv, ref_{q,k,v,probs,attn}_layerN.csv) and
WEIGHTS_DIR (step 1: input_layernorm and q/k/v/o_proj CSVs of the chosen layers). No transformers,
no model: the math is common/llama/norm.py, common/llama/rope.py and common/llama/attention.py, float32 numpy, RoPE in
the rotate-half layout of HF checkpoints. The proof starts at the layer input x: the RMSNorm is
recomputed too (and checked), never trusted.

Writes to OUT_DIR: q_layerN.csv, k_layerN.csv, v_layerN.csv (after RoPE, the ref_ files' shapes and
head-major column order, K/V before the GQA repeat), probs_layerN.csv (softmax probabilities,
(B*H*T, T)), attn_layerN.csv (after o_proj), report.json, report.md, errors.png and
attention_layerL_headH.png. Prints the verification table.
Decode steps (step 2's --generate N, ACTS_DIR/decode/step_S/): every layer's step S is recomputed
from its captured x, its one query attending over a KV cache of this step's own recomputed K and V
(the prefill's, then each earlier step's row), at the position generate() gives it; the files go to
OUT_DIR/decode/step_S/ and the rows "step S: N" join the table (common/check/decode.py).
Before any of it, every file it will read is checked against its folder's manifest.json (sha256,
common/files/manifest.py): an edit below RTOL (a digit of a weight, rope_theta, a padding row) is named,
exit 2. --no-verify-hashes skips that, and the report says so.
Exit code: 0 all PASS, 1 any FAIL, 2 bad input (one line naming the file and what to do).

    python 3_offline_qkv.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1
    python 3_offline_qkv.py --acts-dir A --weights-dir W --out-dir O --layers 0,5 --rtol 1e-5
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import paths
from common.check import decode, meta_check, offline, report
from common.check.verify import DEFINITION, QUANTITIES, low_precision_note
from common.cli import InputError, parse_layers, path_arg, print_settings, run, tolerance
from common.files import layout, manifest
from common.files.atomic import output_folder
from common.llama import kv_cache
from common.llama.spec import LayerSpec

# --- constants (each has a flag of the same name: ACTS_DIR -> --acts-dir) -----------------------
MODEL_DIR = paths.MODEL_DIR  # only used to derive the three folders below when they are None
ACTS_DIR = None  # step 2's folder; None -> outputs/<model folder>/x_all_layers
WEIGHTS_DIR = None  # step 1's folder; None -> outputs/<model folder>/weights
OUT_DIR = None  # None -> outputs/<model folder>/qkv
LAYERS = None  # None = every layer with a meta_layerN.json in ACTS_DIR; else e.g. "0,5-7" or [0, 5]
ATOL = 1e-7  # PASS when max_abs <= ATOL + RTOL * max|ref| (common/check/verify.py); a floor for refs near 0
RTOL = 1e-5  # fp32 recomputation lands near 1e-7; real mistakes near 1e-2 and above
PLOT_LAYER = None  # layer of the attention-pattern plot; None = the first verified layer
PLOT_HEAD = 0  # query head of that plot
PLOT_PROMPT = 0  # which prompt of the batch that plot shows
VERIFY_HASHES = True  # check every input file's sha256 against the manifest.json of steps 1 and 2 first
# -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=MODEL_DIR, type=path_arg, help="derives the default folders")
    p.add_argument("--acts-dir", default=ACTS_DIR, type=path_arg, help="step 2's output folder")
    p.add_argument("--weights-dir", default=WEIGHTS_DIR, type=path_arg, help="step 1's output folder")
    p.add_argument("--out-dir", default=OUT_DIR, type=path_arg)
    p.add_argument("--layers", default=LAYERS, type=parse_layers, help="e.g. 0,5-7 (default: all)")
    p.add_argument("--atol", default=ATOL, type=tolerance)
    p.add_argument("--rtol", default=RTOL, type=tolerance)
    p.add_argument("--plot-layer", default=PLOT_LAYER, type=int)
    p.add_argument("--plot-head", default=PLOT_HEAD, type=int)
    p.add_argument("--plot-prompt", default=PLOT_PROMPT, type=int)
    p.add_argument("--verify-hashes", default=VERIFY_HASHES, action=argparse.BooleanOptionalAction,
                   help="check input files against the manifests of steps 1 and 2 (default: on)")
    return p.parse_args(argv)


def choose_layers(args, acts_dir: Path) -> list[int]:
    have = layout.step2_layers(acts_dir, args.model_dir)
    missing = [n for n in args.layers or [] if n not in have]
    if missing:
        raise InputError(f"{acts_dir / layout.meta_file(missing[0])} is missing (layers there: {have[0]}..{have[-1]}): "
                         f"choose --layers among them or {layout.rerun_step2(args.model_dir)}")
    return args.layers or have


def check_plot_choice(args, layers: list[int], metas: dict[int, dict]) -> int:
    """The attention plot's layer, checked together with its head and prompt before any work."""
    layer = layers[0] if args.plot_layer is None else args.plot_layer
    if layer not in layers:
        raise InputError(f"--plot-layer {layer} is not among the verified layers {layers}")
    if not 0 <= args.plot_head < metas[layer]["num_heads"]:
        raise InputError(f"--plot-head {args.plot_head} is out of range: layer {layer} has "
                         f"{metas[layer]['num_heads']} heads")
    if not 0 <= args.plot_prompt < metas[layer]["batch_size"]:
        raise InputError(f"--plot-prompt {args.plot_prompt} is out of range: the batch has "
                         f"{metas[layer]['batch_size']} prompts")
    return layer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    acts_dir = args.acts_dir or layout.default_dir(args.model_dir, layout.ACTS)
    weights_dir = args.weights_dir or layout.default_dir(args.model_dir, layout.WEIGHTS)
    out_dir = args.out_dir or layout.default_dir(args.model_dir, layout.QKV)
    settings = {"MODEL_DIR": args.model_dir, "ACTS_DIR": acts_dir, "WEIGHTS_DIR": weights_dir, "OUT_DIR": out_dir,
                "LAYERS": "all" if args.layers is None else args.layers, "ATOL": args.atol, "RTOL": args.rtol,
                "VERIFY_HASHES": args.verify_hashes}
    print("3_offline_qkv.py: recompute Q/K/V/attention from CSV (float32, no model) and verify")
    print_settings(settings)

    t0 = time.perf_counter()
    layers = choose_layers(args, acts_dir)
    hashes = manifest.HashCheck(args.verify_hashes)  # before a file is read: an edit below RTOL shows here only
    hashes.folder(acts_dir, decode.with_steps(acts_dir, offline.qkv_inputs(layers)), "step 2",
                  layout.rerun_step2(args.model_dir))
    metas = meta_check.read_metas(acts_dir, layers)
    B, T = metas[layers[0]]["batch_size"], metas[layers[0]]["seq_len"]
    dtype = metas[layers[0]]["dtype"]
    if note := low_precision_note(dtype, args.rtol):
        print(note)
    plot_layer = check_plot_choice(args, layers, metas)
    pow_lanes, rope_note = offline.rope_check(metas[layers[0]])  # the same RoPE in every layer
    print(rope_note if rope_note.startswith("warning") else f"note: {rope_note}")
    layout.check_attention_weights(weights_dir, metas)
    hashes.folder(weights_dir, [p.name for n in layers for p in
                                layout.qkv_weight_files(weights_dir, n, metas[n]["attention_bias"]).values()],
                  "step 1", layout.rerun_step1(metas[layers[0]]["model_dir"], weights_dir))
    print(f"input files: {hashes.line()}")
    output_folder(out_dir, inputs=[acts_dir, weights_dir], create=False)  # never into (or around) what is read
    mask, position_ids, tokens = offline.read_batch(acts_dir, B, T)
    real_rows = mask.reshape(B * T) > 0  # (B, T) -> (B*T,) batch-major, like the CSV rows
    real_probs = offline.real_prob_rows(mask, metas[layers[0]]["num_heads"])  # (B*H*T,)
    steps = decode.read_steps(acts_dir, layers, B, T, mask)  # step 2's --generate: [] without
    if steps:
        print(f"decode steps: {len(steps)}, each verified over a KV cache of its own recomputed K and V")

    results: dict[int, dict[str, dict]] = {}
    missing_refs: list[Path] = []
    for n in tqdm(layers, desc="layers", unit="layer", disable=len(layers) < 4, file=sys.stdout):
        meta = metas[n]
        x, w = offline.read_layer_input(acts_dir, n, meta), offline.read_attention_weights(weights_dir, n, meta)
        norm_w = offline.read_input_norm(weights_dir, n, meta)  # (d,): the prefill's and every decode step's
        layer = LayerSpec.from_meta(meta, pow_lanes)
        # Attention runs in blocks of query rows (common/llama/attention.py). Every head's probabilities are
        # kept (to write and check them) up to PROBS_MAX_SEQ_LEN tokens; past that only the plotted head's.
        keep = offline.probs_to_keep(T, (args.plot_prompt, args.plot_head) if n == plot_layer else None)
        out = offline.norm_and_attention(x, norm_w, w, layer, position_ids, mask, keep)  # xnorm, q, k, v, ...
        if n == plot_layer:
            plot_probs = (out["probs"][args.plot_prompt, args.plot_head].copy() if keep == "all"
                          else out["probs"])  # (T, T)
        rows = offline.as_rows(out, B * T, with_probs=keep == "all")
        del x, out  # before the references are read: a long prompt's peak memory is here
        offline.write_outputs(out_dir, n, rows)
        checked, missing = offline.verify(acts_dir, n, rows, real_rows, real_probs, args.atol, args.rtol)
        if checked:
            results[n] = checked
        missing_refs += missing
        if steps:  # the decode steps of this layer, over a cache of the K and V just recomputed
            cache = kv_cache.grow(None, rows["k"], rows["v"], B, meta["head_dim"])
            compute = functools.partial(offline.attention_step, norm_w, w, layer)
            checked, missing = decode.verify_steps(steps, n, cache, compute, offline.write_outputs, out_dir, QUANTITIES,
                                                   args.atol, args.rtol)
            results.update(checked)
            missing_refs += missing
        del w

    print(f"wrote {len(layers) * len(layout.QKV_STEMS)} CSV files ({', '.join(layout.QKV_STEMS)} of {len(layers)} "
          f"layers) to {out_dir}" + (f", and as many for each of {len(steps)} decode steps in "
                                     f"{out_dir / layout.DECODE}" if steps else ""))
    if not results:
        print(f"no ref_ files in {acts_dir} (2_get_x.py run with SAVE_REFERENCE off?): nothing verified")
        return 0
    if missing_refs:
        print(f"warning: {len(missing_refs)} ref_ files missing, e.g. {missing_refs[0]}: those were not verified")

    plots = [out_dir / layout.ERRORS_PLOT, out_dir / layout.attention_plot(plot_layer, args.plot_head)]
    report.plot_errors(plots[0], results, args.rtol)
    real = np.flatnonzero(mask[args.plot_prompt] > 0)  # this prompt's real token indices
    report.plot_attention(plots[1], plot_probs[np.ix_(real, real)], report.token_labels(tokens, args.plot_prompt, real),
                          plot_layer, args.plot_head, args.plot_prompt)
    settings.update({"PLOT_LAYER": plot_layer, "PLOT_HEAD": args.plot_head, "PLOT_PROMPT": args.plot_prompt,
                     "batch": f"{B} prompts x {T} positions, {int(real_rows.sum())} real tokens",
                     "reference dtype": dtype, "RoPE inv_freq": rope_note, "input hashes": hashes.line()})
    report.write_reports(out_dir, results, {k: str(v) for k, v in settings.items()}, DEFINITION,
                         [p.name for p in plots], args.atol, args.rtol)
    print(f"wrote {out_dir / layout.REPORT_JSON}, {layout.REPORT_MD}, {plots[0].name}, {plots[1].name} "
          f"in {time.perf_counter() - t0:.2f} s")
    print(report.console_table(results, args.atol, args.rtol))  # last: what `make demo` ends with
    return 0 if report.all_pass(results) else 1


if __name__ == "__main__":
    run(main)
