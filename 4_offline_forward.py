"""Step 4: recompute every node of every layer, the final norm and the logits from CSV files alone, and verify.

Reads only ACTS_DIR (step 2's files) and WEIGHTS_DIR (step 1: every tensor of the checked layers, the
final norm and the head). No transformers, no torch, no model: the math is common/llama/, float32
numpy. Two modes:
  layer  (default) each layer from its own captured x_layerN.csv, every node checked against the
         model's (PASS when max_abs <= ATOL + RTOL * max|ref|), then the head from the captured last
         layer output;
  chain  x_layer0.csv only, through every layer on its own outputs, the final norm and the head: PASS
         when the top-1 token agrees at every real position and the logits' max_rel <= CHAIN_RTOL.
Writes to OUT_DIR xnorm/h/hnorm/act/mlp/out_layerN.csv, norm.csv, logits.csv, report.json/md and
plots; decode steps (step 2's --generate) in OUT_DIR/decode/step_S/ (chain mode generates them
offline). Inputs are checked against the manifests first. A quantized capture (--quant S) runs every
linear as torchao does, with its integer files and exact checks (docs/quantized.md);
--integer-only runs the integer-only forward (docs/integer.md). Files: docs/step4_forward.md.
Exit code: 0 PASS, 1 any FAIL, 2 bad input (one line naming the file and what to do).

    python 4_offline_forward.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1
    python 4_offline_forward.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1 --mode chain
    python 4_offline_forward.py --acts-dir A --weights-dir W --out-dir O --layers 0,5 --rtol 1e-5
"""
from __future__ import annotations

import argparse
import time

from common import cli, paths
from common.check import decode, forward_check, integer_run, offline, offline_run
from common.cli import InputError, print_settings, run
from common.files import int_layout, layout, manifest
from common.quant.schemes import scheme_arg

# --- constants (each has a flag of the same name: ACTS_DIR -> --acts-dir) -----------------------
MODEL_DIR = paths.MODEL_DIR  # only used to derive the three folders below when they are None
ACTS_DIR = None  # step 2's folder; None -> outputs/<model folder>/x_all_layers
WEIGHTS_DIR = None  # step 1's folder; None -> outputs/<model folder>/weights
OUT_DIR = None  # None -> outputs/<model folder>/forward (chain mode: forward_chain, so both reports stay)
LAYERS = None  # layer mode: None = every layer with a meta_layerN.json in ACTS_DIR; else "0,5-7" or [0, 5]
MODE = "layer"  # "layer": each layer from its captured input; "chain": x_layer0 through the whole model
ATOL = 1e-7  # layer mode: PASS when max_abs <= ATOL + RTOL * max|ref| (common/check/verify.py), as in step 3
RTOL = 1e-5  # fp32 recomputation lands near 1e-7..1e-6; real mistakes near 1e-2 and above
CHAIN_RTOL = 1e-4  # chain mode: the logits' max_rel after every layer (README: measured 2e-6..2e-5)
TOP_K = 5  # the top next tokens shown (and the set compared in chain mode) per prompt
PLOTS = True  # errors.png / chain_errors.png and top_tokens.png
VERIFY_HASHES = True  # check every input file's sha256 against the manifest.json of steps 1 and 2 first
QUANT = None  # a quantized capture's scheme (w8a8, ...): only derives the default folders (forward-w8a8, ...)
# quantized captures, layer mode: an activation one LSB off (an ulp upstream at a rounding boundary) moves a
# node by up to 4.6e-2 of its range (demo, layer 14's MLP; docs/quantized.md); xscale and linear are exact
QUANT_RTOL = 1e-1
QUANT_CHAIN_RTOL = 0.25  # quantized captures, chain mode: such flips compound through the layers (demo: 0.12)
INTEGER_ONLY = False  # the integer-only forward (docs/integer.md): WEIGHTS_DIR from step 1 --quant w8a8
REQUANT = "single"  # --integer-only: single | double (common/quant/requant.py)
CALIBRATION = None  # --integer-only: a previous run's folder whose calibration.json and tables to reuse
ZK = False  # --integer-only: the ZK preset instead (every tensor int64 at 2^16, zkLLM's convention)
# -------------------------------------------------------------------------------------------------

MODES = ("layer", "chain")


def parse_args(argv: list[str] | None):
    p = cli.Parser(globals())
    p.shared("--model-dir", "--acts-dir", "--weights-dir", "--out-dir")
    p.flag("--mode", choices=MODES)
    p.shared("--layers", "--atol", "--rtol")
    p.flag("--chain-rtol", type=cli.tolerance)
    p.flag("--quant", type=scheme_arg, metavar="SCHEME")
    p.flag("--top-k", type=int)
    p.flag("--plots", action=argparse.BooleanOptionalAction)
    p.shared("--verify-hashes")
    p.flag("--integer-only", action="store_true")
    p.flag("--requant", choices=("single", "double"))
    p.flag("--calibration", type=cli.path_arg)
    p.flag("--zk", action="store_true")
    return p.parse_args(argv)


def integer_only(args) -> int:
    """--integer-only: common/check/integer_run.py, with its own calibration, files and report."""
    if args.layers is not None:
        raise InputError("--layers: --integer-only runs every layer; drop --layers")
    out_dir = args.out_dir or int_layout.default_out(args.model_dir, args.mode, args.zk)
    return integer_run.run(args.acts_dir or layout.default_dir(args.model_dir, layout.ACTS),
                           args.weights_dir or layout.default_dir(args.model_dir, layout.WEIGHTS), out_dir,
                           args.model_dir, args.mode, args.requant, args.calibration, args.zk, args.verify_hashes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.integer_only and (args.zk or args.calibration or args.requant != REQUANT):
        raise InputError("--zk, --calibration and --requant go with --integer-only: add it, or drop them")
    if args.integer_only:
        return integer_only(args)
    f = offline_run.folders(args.model_dir, args.acts_dir, args.weights_dir, args.out_dir,
                            layout.FORWARD if args.mode == "layer" else layout.FORWARD_CHAIN,
                            args.quant and args.quant.name)
    settings = cli.settings(args, ACTS_DIR=f.acts, WEIGHTS_DIR=f.weights, OUT_DIR=f.out, QUANT=args.quant and args.quant.name)
    print("4_offline_forward.py: recompute every node and the logits from CSV (float32, no model) and verify")
    print_settings(settings)

    t0 = time.perf_counter()
    rerun2 = layout.rerun_step2(layout.capture_source(f.acts, args.model_dir))
    if not f.acts.is_dir():
        raise InputError(f"activations folder {f.acts} does not exist: {rerun2}")
    hashes = manifest.HashCheck(args.verify_hashes)  # before a file is read: an edit below RTOL shows here only
    hashes.folder(f.acts, [layout.META_MODEL], "step 2", rerun2)  # it says which layers there are
    meta = offline.read_model_meta(f.acts, args.model_dir)
    layers = forward_check.choose_layers(args.mode, args.layers, f.acts, meta, args.model_dir)
    # Decode steps (step 2's --generate): in chain mode each step reads the captured layers' meta, and the
    # embedding to look its token up.
    chain_decode = args.mode == "chain" and bool(layout.decode_steps(f.acts))
    step_metas = [layout.meta_file(n) for n in layout.step2_layers(f.acts)] if chain_decode else []
    hashes.folder(f.acts, decode.with_steps(f.acts, offline.forward_inputs(args.mode, layers) + step_metas),
                  "step 2", rerun2)
    with_head = forward_check.check_inputs(args.mode, args.top_k, f.acts, meta, layers, args.model_dir)
    step1, quant = forward_check.step4_weights(f, meta, layers, with_head, args.quant, args.model_dir)
    if quant.scheme and args.rtol == RTOL:  # the float defaults: a quantized capture's are QUANT_RTOL, QUANT_CHAIN_RTOL
        args.rtol = settings["RTOL"] = QUANT_RTOL
    if quant.scheme and args.chain_rtol == CHAIN_RTOL:
        args.chain_rtol = settings["CHAIN_RTOL"] = QUANT_CHAIN_RTOL
    embedding = f.weights / layout.weight_file(layout.EMBEDDING)
    if chain_decode and not embedding.is_file():
        raise InputError(f"{embedding} is missing: chain mode looks up each decode step's token in it; run "
                         f"python 1_model_weights.py --model-dir {meta['model_dir']} --out-dir {f.weights} "
                         r"--filter '^model\.embed_tokens\.'")
    # Step 2's --generate N: every decode step of the checked layers (chain mode: of those captured).
    batch = offline_run.open_batch(f, hashes, meta, step1 + ([embedding.name] if chain_decode else []),
                                   layers if args.mode == "layer" else layout.step2_layers(f.acts), args.rtol)
    settings.update({"batch": batch.describe(), "reference dtype": meta["dtype"], "logits captured": meta["logits"],
                     "decode steps": len(batch.steps), "input hashes": hashes.line()})
    checks = forward_check.Checks(args.atol, args.rtol, args.chain_rtol, args.top_k, args.plots)
    r = forward_check.Inputs(f, meta, batch, checks, batch.tokens.get("prompts", []),
                             offline.read_vocab(f.acts, meta["vocab_size"]), settings, t0, quant)
    return forward_check.layer_mode(r, layers, with_head) if args.mode == "layer" else forward_check.chain_mode(r)


if __name__ == "__main__":
    run(main)
