"""Step 3: recompute the input norm, Q, K, V and the attention from CSV files alone, and verify them.

Reads only ACTS_DIR (step 2's x, xnorm, ref_ files, metas, masks, positions, tokens) and WEIGHTS_DIR
(step 1's input_layernorm and q/k/v/o_proj CSVs). No transformers, no model: the math is
common/llama/, float32 numpy, RoPE in the rotate-half layout. The proof starts at the layer input x:
the RMSNorm is recomputed and checked too. Writes to OUT_DIR q/k/v/probs/attn_layerN.csv (the ref_
files' shapes and column order), report.json, report.md and plots; decode steps (step 2's --generate)
each over a KV cache of their own recomputed K and V, in OUT_DIR/decode/step_S/. Every input is first
checked against its folder's manifest.json (--no-verify-hashes skips it). A quantized capture (step 2
--quant S) is read with step 1 --quant S's weights, each linear computed as torchao computes it, its
xq_/xscale_/acc_ files written and checked exactly (docs/quantized.md). Files: docs/step3_qkv.md.
Exit code: 0 all PASS, 1 any FAIL, 2 bad input (one line naming the file and what to do).

    python 3_offline_qkv.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1
    python 3_offline_qkv.py --acts-dir A --weights-dir W --out-dir O --layers 0,5 --rtol 1e-5
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import cli, paths
from common.check import decode, meta_check, offline, offline_run, report
from common.check.verify import DEFINITION, QUANTITIES
from common.cli import InputError, print_settings, run
from common.files import layout, manifest
from common.quant.schemes import scheme_arg

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
QUANT = None  # a quantized capture's scheme (w8a8, ...): only derives the default folders (x_all_layers-w8a8, ...)
# quantized captures: an activation one LSB off (an ulp upstream at a rounding boundary) moves a node by up
# to 4.6e-2 of its range (demo, layer 14's MLP; docs/quantized.md); xscale and linear are the exact checks
QUANT_RTOL = 1e-1
# -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    p = cli.Parser(globals())
    p.shared("--model-dir", "--acts-dir", "--weights-dir", "--out-dir", "--layers", "--atol", "--rtol",
             "--verify-hashes")
    p.flag("--quant", type=scheme_arg, metavar="SCHEME")
    p.flag("--plot-layer", type=int)
    p.flag("--plot-head", type=int)
    p.flag("--plot-prompt", type=int)
    return p.parse_args(argv)


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
    f = offline_run.folders(args.model_dir, args.acts_dir, args.weights_dir, args.out_dir, layout.QKV,
                            args.quant and args.quant.name)
    settings = cli.settings(args, ACTS_DIR=f.acts, WEIGHTS_DIR=f.weights, OUT_DIR=f.out, QUANT=args.quant and args.quant.name)
    print("3_offline_qkv.py: recompute Q/K/V/attention from CSV (float32, no model) and verify")
    print_settings(settings)

    t0 = time.perf_counter()
    layers = offline_run.choose_layers(args.layers, f.acts, args.model_dir)
    hashes = manifest.HashCheck(args.verify_hashes)  # before a file is read: an edit below RTOL shows here only
    hashes.folder(f.acts, decode.with_steps(f.acts, offline.qkv_inputs(layers)), "step 2",
                  layout.rerun_step2(layout.capture_source(f.acts, args.model_dir)))
    metas = meta_check.read_metas(f.acts, layers)
    plot_layer = check_plot_choice(args, layers, metas)
    step1, quant = offline_run.attention_weights(f, metas, layers, args.quant)
    if quant.scheme and args.rtol == RTOL:  # the float default: a quantized capture's is QUANT_RTOL
        args.rtol = settings["RTOL"] = QUANT_RTOL
    batch = offline_run.open_batch(f, hashes, metas[layers[0]], step1, layers, args.rtol)
    if batch.steps:
        print(f"decode steps: {len(batch.steps)}, each verified over a KV cache of its own recomputed K and V")

    results: dict[int, dict[str, dict]] = {}
    missing_refs: list[Path] = []
    plot_probs = None
    for n in tqdm(layers, desc="layers", unit="layer", disable=len(layers) < 4, file=sys.stdout):
        # Attention runs in blocks of query rows (common/llama/attention.py). Every head's probabilities are
        # kept (to write and check them) up to PROBS_MAX_SEQ_LEN tokens; past that only the plotted head's.
        plot = (args.plot_prompt, args.plot_head) if n == plot_layer else None
        checked, missing, probs = offline_run.attention_layer(f, n, metas[n], batch, plot, args.atol, args.rtol, quant)
        results.update(checked)
        missing_refs += missing
        plot_probs = plot_probs if probs is None else probs
    steps = batch.steps
    print(f"wrote {len(layers) * len(layout.QKV_STEMS)} CSV files ({', '.join(layout.QKV_STEMS)} of {len(layers)} "
          f"layers) to {f.out}" + (f", and as many for each of {len(steps)} decode steps in "
                                   f"{f.out / layout.DECODE}" if steps else ""))
    if not results:
        print(f"no ref_ files in {f.acts} (2_get_x.py run with SAVE_REFERENCE off?): nothing verified")
        return 0
    if missing_refs:
        print(f"warning: {len(missing_refs)} ref_ files missing, e.g. {missing_refs[0]}: those were not verified")

    plots = [f.out / layout.ERRORS_PLOT, f.out / layout.attention_plot(plot_layer, args.plot_head)]
    report.plot_errors(plots[0], results, args.rtol, quant.quantities(QUANTITIES))
    real = np.flatnonzero(batch.mask[args.plot_prompt] > 0)  # this prompt's real token indices
    report.plot_attention(plots[1], plot_probs[np.ix_(real, real)],
                          report.token_labels(batch.tokens, args.plot_prompt, real), plot_layer, args.plot_head,
                          args.plot_prompt)
    settings.update({"PLOT_LAYER": plot_layer, "batch": batch.describe(), "reference dtype": metas[layers[0]]["dtype"],
                     "RoPE inv_freq": batch.rope_note, "input hashes": hashes.line()})
    report.write_reports(f.out, results, {k: str(v) for k, v in settings.items()}, DEFINITION,
                         [p.name for p in plots], args.atol, args.rtol, quant.quantities(QUANTITIES))
    print(f"wrote {f.out / layout.REPORT_JSON}, {layout.REPORT_MD}, {plots[0].name}, {plots[1].name} "
          f"in {time.perf_counter() - t0:.2f} s")
    print(report.console_table(results, args.atol, args.rtol, quant.quantities(QUANTITIES)))  # last: what `make demo` ends with
    return 0 if report.all_pass(results) else 1


if __name__ == "__main__":
    run(main)
