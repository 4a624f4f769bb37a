"""Step 4: recompute every node of every layer, the final norm and the logits from CSV files alone, and verify.

Reads only ACTS_DIR (step 2: meta_model.json, meta_layerN.json, x_layerN.csv, the ref_ files,
attention_mask.csv, position_ids.csv, tokens.json, vocab.json) and WEIGHTS_DIR (step 1: every
tensor of the layers it checks; model.norm and the head, lm_head or the tied embedding, for the
logits). No transformers, no torch, no model: the math is common/llama/forward.py (common/llama/norm.py,
common/llama/attention.py with common/llama/rope.py, common/llama/mlp.py), float32 numpy.

Two modes:
  layer  (default) each layer starts from its own captured x_layerN.csv, so an error is pinned to the
         layer that made it; every node is checked against the model's (PASS when
         max_abs <= ATOL + RTOL * max|ref|); after the last layer the final norm and the logits,
         from the captured last layer output.
  chain  starts from x_layer0.csv only and feeds its own outputs through every layer, the final
         norm and the head: the whole forward pass offline. PASS when the top-1 token agrees at every
         real position and the logits' max_rel <= CHAIN_RTOL. One layer's weights in memory at a time.

Writes to OUT_DIR: xnorm/h/hnorm/act/mlp/out_layerN.csv (the shapes of step 2's ref_ files),
norm.csv, logits.csv, report.json, report.md, errors.png (layer) or chain_errors.png (chain), and
top_tokens.png: the top next tokens, model vs offline, for each prompt.
Decode steps (step 2's --generate N): layer mode checks every node of each step over a KV cache of
its own K and V (as step 3), and each step's head and greedy token; chain mode generates offline:
its own greedy token, looked up in the embedding, through every layer over its own caches and the
head, PASS only when every token is the model's (common/check/decode.py). Files in OUT_DIR/decode/step_S/.
Before any of it, every file it will read is checked against its folder's manifest.json (sha256,
common/files/manifest.py), as in step 3; --no-verify-hashes skips that, and the report says so.
--integer-only runs the integer-only forward instead (common/check/integer_run.py, docs/integer.md): from
step 1's --quant w8a8 folder, calibrated on step 2's capture, every node an integer CSV in forward_int/.
Exit code: 0 PASS, 1 any FAIL, 2 bad input (one line naming the file and what to do).

    python 4_offline_forward.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1
    python 4_offline_forward.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1 --mode chain
    python 4_offline_forward.py --acts-dir A --weights-dir W --out-dir O --layers 0,5 --rtol 1e-5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import paths
from common.check import decode, forward_io, forward_report, integer_run, qkv, report
from common.check.verify import compare, low_precision_note
from common.cli import InputError, parse_layers, path_arg, print_settings, run, tolerance
from common.files import int_layout, layout, manifest
from common.files.atomic import output_folder
from common.files.csv_io import read_csv, write_csv
from common.llama import forward

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
INTEGER_ONLY = False  # the integer-only forward (docs/integer.md): WEIGHTS_DIR from step 1 --quant w8a8
REQUANT = "single"  # --integer-only: single | double (common/quant/requant.py)
CALIBRATION = None  # --integer-only: a previous run's folder whose calibration.json and tables to reuse
ZK = False  # --integer-only: the ZK preset instead (every tensor int64 at 2^16, zkLLM's convention)
# -------------------------------------------------------------------------------------------------

MODES = ("layer", "chain")
TITLE = "Step 4: the forward pass offline vs the model"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=MODEL_DIR, type=path_arg, help="derives the default folders")
    p.add_argument("--acts-dir", default=ACTS_DIR, type=path_arg, help="step 2's output folder")
    p.add_argument("--weights-dir", default=WEIGHTS_DIR, type=path_arg, help="step 1's output folder")
    p.add_argument("--out-dir", default=OUT_DIR, type=path_arg)
    p.add_argument("--layers", default=LAYERS, type=parse_layers, help="layer mode: e.g. 0,5-7 (default: all)")
    p.add_argument("--mode", default=MODE, choices=MODES)
    p.add_argument("--atol", default=ATOL, type=tolerance)
    p.add_argument("--rtol", default=RTOL, type=tolerance)
    p.add_argument("--chain-rtol", default=CHAIN_RTOL, type=tolerance)
    p.add_argument("--top-k", default=TOP_K, type=int)
    p.add_argument("--plots", default=PLOTS, action=argparse.BooleanOptionalAction)
    p.add_argument("--verify-hashes", default=VERIFY_HASHES, action=argparse.BooleanOptionalAction,
                   help="check input files against the manifests of steps 1 and 2 (default: on)")
    p.add_argument("--integer-only", default=INTEGER_ONLY, action="store_true",
                   help="integer-only forward: int8 linears, requantization, fixed-point nonlinear ops (docs/integer.md)")
    p.add_argument("--requant", default=REQUANT, choices=("single", "double"), help="--integer-only's rounding rule")
    p.add_argument("--calibration", default=CALIBRATION, type=path_arg,
                   help="--integer-only: reuse this folder's calibration.json and tables")
    p.add_argument("--zk", default=ZK, action="store_true", help="--integer-only: the ZK preset (int64 at 2^16)")
    return p.parse_args(argv)


def choose_layers(args, acts_dir: Path, meta: dict) -> list[int]:
    """Layer mode: the chosen layers, each with its meta in ACTS_DIR. Chain mode: every layer."""
    if args.mode == "chain":
        if args.layers is not None:
            raise InputError("--layers: chain mode runs every layer from x_layer0; drop --layers, or use --mode layer")
        return list(range(meta["num_layers"]))
    have = layout.step2_layers(acts_dir, args.model_dir)
    missing = [n for n in args.layers or [] if n not in have]
    if missing:
        raise InputError(f"{acts_dir / layout.meta_file(missing[0])} is missing (layers there: {have[0]}..{have[-1]}): "
                         f"choose --layers among them or {layout.rerun_step2(args.model_dir)}")
    return args.layers or have


def check_inputs(args, acts_dir: Path, meta: dict, layers: list[int]) -> bool:
    """Everything the run needs, checked before any work; returns whether the head is checked."""
    if args.top_k < 1:
        raise InputError(f"--top-k {args.top_k}: give at least 1")
    if args.mode == "layer":
        metas = layout.read_metas(acts_dir, layers)
        first = metas[layers[0]]
        if (first["batch_size"], first["seq_len"]) != (meta["batch_size"], meta["seq_len"]):
            raise InputError(f"{acts_dir / layout.META_MODEL} and {layout.meta_file(layers[0])} disagree on the "
                             f"batch: {layout.rerun_step2(args.model_dir)}")
    has_logits = meta["logits"] != "none" and (acts_dir / layout.REF_LOGITS).is_file()
    if args.mode == "chain" and not has_logits:
        raise InputError(f"{acts_dir / layout.REF_LOGITS} is missing (step 2 ran with --logits none?): chain mode "
                         f"checks the logits; {layout.rerun_step2(args.model_dir)} --logits last")
    return has_logits and meta["num_layers"] - 1 in layers


def run_head(r: forward_io.Inputs, x: np.ndarray) -> tuple[dict, np.ndarray]:
    """Final norm and logits from the last layer's output x; writes norm.csv, logits.csv.

    Returns (our nodes, the model's logits: ref_logits.csv)."""
    norm_w, head_blocks = forward_io.read_head_weights(r.weights_dir, r.meta)
    out = forward.head(x, norm_w, head_blocks, r.meta["rms_norm_eps"], forward_io.logit_rows(r.meta, r.mask))
    write_csv(r.out_dir / layout.NORM, out["norm"])
    write_csv(r.out_dir / layout.LOGITS, out["logits"])
    return out, forward_io.read_ref_logits(r.acts_dir, r.meta, out["logits"].shape[0])


def step_layer(w: forward.LayerWeights, spec: forward.LayerSpec) -> decode.Compute:
    """One decode step of one layer: every node, the attention over the layer's cache."""
    return lambda x, step, cache: forward.decoder_layer(x, w, step.positions, step.mask, spec, "all", past_kv=cache)


def layer_mode(r: forward_io.Inputs, layers: list[int], with_head: bool) -> int:
    """Every node of every chosen layer from its captured input, then the head from the captured last output."""
    args, meta, spec = r.args, r.meta, forward_io.layer_spec(r.meta, r.pow_lanes)
    results, missing = {}, []
    for n in tqdm(layers, desc="layers", unit="layer", disable=len(layers) < 4, file=sys.stdout):
        x = qkv.read_layer_input(r.acts_dir, n, meta)
        w = forward_io.read_layer_weights(r.weights_dir, n, meta)
        keep = qkv.probs_to_keep(meta["seq_len"], None)  # every head's, up to PROBS_MAX_SEQ_LEN tokens
        rows = qkv.as_rows(forward.decoder_layer(x, w, r.position_ids, r.mask, spec, keep), r.n_rows)
        forward_io.write_layer_nodes(r.out_dir, n, rows)
        checked, miss = qkv.verify(r.acts_dir, n, rows, r.real_rows, r.real_probs, args.atol, args.rtol,
                                   forward_io.CHECKED)
        if checked:
            results[n] = checked
        missing += miss
        if r.steps:  # every decode step of this layer from its captured x, over a cache of our own K and V
            cache = decode.grow(None, rows["k"], rows["v"], meta["batch_size"], meta["head_dim"])
            checked, miss = decode.verify_steps(r.steps, n, cache, step_layer(w, spec), forward_io.write_layer_nodes,
                                                r.out_dir, forward_io.CHECKED, args.atol, args.rtol)
            results.update(checked)
            missing += miss
    head, tops = {}, []
    if with_head:  # from the captured input of the final norm, so a head error is the head's own
        ref_out = r.acts_dir / layout.ref_file("out", layers[-1])
        x = read_csv(ref_out if ref_out.is_file() else r.out_dir / layout.layer_file("out", layers[-1]),
                     (r.n_rows, meta["d_model"]))
        ours, ref = run_head(r, x)
        head = {"norm": compare(ours["norm"], read_csv(r.acts_dir / layout.REF_NORM, (r.n_rows, meta["d_model"])),
                                r.real_rows, args.atol, args.rtol),
                "logits": compare(ours["logits"], ref, r.logit_checked_rows(), args.atol, args.rtol)}
        tops = forward_report.top_tokens(r.at_last(ref), r.at_last(ours["logits"]), r.vocab, r.prompts, args.top_k)
    decoded = {}
    if with_head and r.steps:  # each step's head from the step's captured last layer output
        norm_w, head_blocks = forward_io.read_head_weights(r.weights_dir, meta)
        last = layers[-1]

        def last_out(st: decode.Step) -> np.ndarray:
            ref_out = st.folder / layout.ref_file("out", last)
            mine = decode.step_dir(r.out_dir, st.step) / layout.layer_file("out", last)
            return read_csv(ref_out if ref_out.is_file() else mine, (meta["batch_size"], meta["d_model"]))
        decoded = decode.head_steps(r.steps, last_out, norm_w, list(head_blocks), meta, r.out_dir, args.atol, args.rtol)
    print(f"wrote {len(layers) * len(layout.FORWARD_STEMS)} layer CSV files"
          + (f", {layout.NORM}, {layout.LOGITS}" if head else "") + f" to {r.out_dir}")
    if not results:
        print(f"no reference files in {r.acts_dir} (2_get_x.py run without them?): nothing verified")
        return 0
    if missing:
        print(f"warning: {len(missing)} reference files missing, e.g. {missing[0]}: those were not verified")

    plots = []
    if args.plots:
        plots = [r.out_dir / layout.ERRORS_PLOT] + ([r.out_dir / layout.TOP_TOKENS_PLOT] if tops else [])
        report.plot_errors(plots[0], results, args.rtol, forward_io.CHECKED, "Step 4, layer mode: every node vs the model")
        if tops:
            forward_report.plot_top_tokens(plots[1], tops)
    passed = (report.all_pass(results) and all(m["pass"] for m in head.values())
              and all(map(forward_report.decode_passed, decoded.values())))
    head_md = ["", f"**{forward_report.head_line(head)}**"] if head else []
    decode_table = forward_report.decode_rows(decoded, r.vocab) if decoded else []
    if decoded:
        head_md += ["", "## Decode steps: the head from each step's captured last layer output", ""]
        head_md += report.markdown_table(decode_table)
    report.write_reports(r.out_dir, results, {k: str(v) for k, v in r.settings.items()}, forward_report.DEFINITION,
                         [p.name for p in plots], args.atol, args.rtol, forward_io.CHECKED, f"{TITLE} (layer mode)",
                         {"mode": "layer", "head": head, "top_tokens": tops,
                          **({"decode_head": {f"step_{s}": c for s, c in decoded.items()}} if decoded else {})},
                         head_md + forward_report.top_tokens_markdown(tops), passed)
    print(f"wrote {r.out_dir / layout.REPORT_JSON}, {layout.REPORT_MD}" + "".join(f", {p.name}" for p in plots)
          + f" in {time.perf_counter() - r.t0:.2f} s")
    if tops:
        print(forward_report.top_tokens_text(tops))
    print(report.console_table(results, args.atol, args.rtol, forward_io.CHECKED))  # the table ends the run
    if head:
        print(forward_report.head_line(head))
    if decoded:
        print(report.text_table(decode_table))
    return 0 if passed else 1


def chain_mode(r: forward_io.Inputs) -> int:
    """x_layer0 through every layer on our own outputs, the final norm and the head; judged by the logits."""
    args, meta, spec = r.args, r.meta, forward_io.layer_spec(r.meta, r.pow_lanes)
    layers = range(meta["num_layers"])
    # Decode steps run every layer again for each new token: then the layers' weights are kept after
    # their first read (the whole model in memory), and each layer's K and V start its cache.
    kept: dict[int, forward.LayerWeights] = {}
    caches: dict[int, decode.Cache] = {}

    def load(n: int) -> forward.LayerWeights:
        w = kept.get(n) or forward_io.read_layer_weights(r.weights_dir, n, meta)
        if r.steps:
            kept[n] = w
        return w
    chained = forward.chain(qkv.read_layer_input(r.acts_dir, 0, meta), layers, load, r.position_ids, r.mask,
                            lambda n: spec)
    growth = {}
    for n, nodes in tqdm(chained, total=len(layers), desc="layers", unit="layer", disable=len(layers) < 4,
                         file=sys.stdout):
        rows = qkv.as_rows(nodes, r.n_rows)
        if r.steps:
            caches[n] = decode.grow(None, rows["k"], rows["v"], meta["batch_size"], meta["head_dim"])
        forward_io.write_layer_nodes(r.out_dir, n, rows)
        ref_path = r.acts_dir / layout.ref_file("out", n)
        if ref_path.is_file():
            growth[n] = compare(rows["out"], read_csv(ref_path, rows["out"].shape), r.real_rows, 0.0, args.chain_rtol)
        x = rows["out"]
    ours, ref = run_head(r, x)
    checked = r.logit_checked_rows()
    logits = compare(ours["logits"], ref, checked, 0.0, args.chain_rtol)
    agree = forward.top_k(ours["logits"][checked], 1) == forward.top_k(ref[checked], 1)
    top1 = {"agree": int(agree.sum()), "total": int(checked.sum())}
    tops = forward_report.top_tokens(r.at_last(ref), r.at_last(ours["logits"]), r.vocab, r.prompts, args.top_k)
    top5 = {"agree": sum(t["topk_same_set"] for t in tops), "total": len(tops)}
    passed, verdict = forward_report.chain_verdict(logits, top1, top5, args.chain_rtol)
    print(f"wrote {len(layers) * len(layout.FORWARD_STEMS)} layer CSV files, {layout.NORM}, {layout.LOGITS} "
          f"to {r.out_dir}")
    decoded = {}
    if r.steps:  # generate offline: our own greedy tokens, their embeddings, our own caches
        first = r.at_last(ours["logits"]).argmax(axis=1)  # (B,): our greedy token after the prefill
        embed = decode.embedding_rows(r.weights_dir, meta, {int(t) for st in r.steps for t in st.fed})
        norm_w, head_blocks = forward_io.read_head_weights(r.weights_dir, meta)
        decoded = decode.chain_steps(r.steps, first, caches, load, spec, embed, norm_w, list(head_blocks), meta,
                                     r.out_dir, args.chain_rtol)
        ok = decode.chain_passed(decoded, r.steps)
        passed = passed and ok
        verdict += (f"; {'PASS' if ok else 'FAIL'}: {len(r.steps)} decode steps generated offline "
                    + ("give the model's greedy tokens" if ok else "differ from the model's"))

    plots = []
    if args.plots:
        plots = [r.out_dir / layout.CHAIN_PLOT, r.out_dir / layout.TOP_TOKENS_PLOT]
        forward_report.plot_chain(plots[0], growth, logits, args.chain_rtol)
        forward_report.plot_top_tokens(plots[1], tops)
    forward_report.write_chain_report(r.out_dir, passed, verdict, growth, logits, top1, top5, tops,
                                      {k: str(v) for k, v in r.settings.items()}, [p.name for p in plots], decoded,
                                      r.vocab)
    print(f"wrote {r.out_dir / layout.REPORT_JSON}, {layout.REPORT_MD}" + "".join(f", {p.name}" for p in plots)
          + f" in {time.perf_counter() - r.t0:.2f} s")
    print(forward_report.top_tokens_text(tops))
    print(report.text_table(forward_report.chain_rows(growth)))  # the table ends the run
    if decoded:
        print(report.text_table(forward_report.decode_rows(decoded, r.vocab)))
    print(verdict)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.integer_only and (args.zk or args.calibration or args.requant != REQUANT):
        raise InputError("--zk, --calibration and --requant go with --integer-only: add it, or drop them")
    if args.integer_only:  # common/check/integer_run.py: its own calibration, files and report
        if args.layers is not None:
            raise InputError("--layers: --integer-only runs every layer; drop --layers")
        out_dir = args.out_dir or int_layout.default_out(args.model_dir, args.mode, args.zk)
        return integer_run.run(args.acts_dir or layout.default_dir(args.model_dir, layout.ACTS),
                               args.weights_dir or layout.default_dir(args.model_dir, layout.WEIGHTS), out_dir,
                               args.model_dir, args.mode, args.requant, args.calibration, args.zk, args.verify_hashes)
    acts_dir = args.acts_dir or layout.default_dir(args.model_dir, layout.ACTS)
    weights_dir = args.weights_dir or layout.default_dir(args.model_dir, layout.WEIGHTS)
    out_dir = args.out_dir or layout.default_dir(args.model_dir,
                                                 layout.FORWARD if args.mode == "layer" else layout.FORWARD_CHAIN)
    settings = {"MODEL_DIR": args.model_dir, "ACTS_DIR": acts_dir, "WEIGHTS_DIR": weights_dir, "OUT_DIR": out_dir,
                "MODE": args.mode, "LAYERS": "all" if args.layers is None else args.layers, "ATOL": args.atol,
                "RTOL": args.rtol, "CHAIN_RTOL": args.chain_rtol, "TOP_K": args.top_k, "PLOTS": args.plots,
                "VERIFY_HASHES": args.verify_hashes}
    print("4_offline_forward.py: recompute every node and the logits from CSV (float32, no model) and verify")
    print_settings(settings)

    t0 = time.perf_counter()
    if not acts_dir.is_dir():
        raise InputError(f"activations folder {acts_dir} does not exist: {layout.rerun_step2(args.model_dir)}")
    hashes = manifest.HashCheck(args.verify_hashes)  # before a file is read: an edit below RTOL shows here only
    rerun2 = layout.rerun_step2(args.model_dir)
    hashes.folder(acts_dir, [layout.META_MODEL], "step 2", rerun2)  # it says which layers there are
    meta = forward_io.read_model_meta(acts_dir, args.model_dir)
    layers = choose_layers(args, acts_dir, meta)
    # Decode steps (step 2's --generate): in chain mode each step reads the captured layers' meta, and the
    # embedding to look its token up.
    chain_decode = args.mode == "chain" and bool(layout.decode_steps(acts_dir))
    step_metas = [layout.meta_file(n) for n in layout.step2_layers(acts_dir)] if chain_decode else []
    hashes.folder(acts_dir, decode.with_steps(acts_dir, forward_io.step2_inputs(args.mode, layers) + step_metas),
                  "step 2", rerun2)
    with_head = check_inputs(args, acts_dir, meta, layers)
    forward_io.check_weights(weights_dir, meta, layers, with_head, args.model_dir)
    embedding = weights_dir / layout.weight_file(layout.EMBEDDING)
    if chain_decode and not embedding.is_file():
        raise InputError(f"{embedding} is missing: chain mode looks up each decode step's token in it; run "
                         f"python 1_model_weights.py --model-dir {meta['model_dir']} --out-dir {weights_dir} "
                         r"--filter '^model\.embed_tokens\.'")
    pow_lanes, rope_note = qkv.rope_check(meta)  # the same RoPE in every layer
    print(rope_note if rope_note.startswith("warning") else f"note: {rope_note}")
    hashes.folder(weights_dir, [p.name for p in forward_io.weight_files(weights_dir, meta, layers, with_head)]
                  + ([embedding.name] if chain_decode else []), "step 1",
                  layout.rerun_step1(meta["model_dir"], weights_dir))
    print(f"input files: {hashes.line()}")
    output_folder(out_dir, inputs=[acts_dir, weights_dir], create=False)  # never into (or around) what is read
    B, T = meta["batch_size"], meta["seq_len"]
    if note := low_precision_note(meta["dtype"], args.rtol):
        print(note)
    mask, position_ids, tokens = qkv.read_batch(acts_dir, B, T)
    real_rows = mask.reshape(B * T) > 0  # (B, T) -> (B*T,) batch-major, like the CSV rows
    # Step 2's --generate N: every decode step of the checked layers (chain mode: of those captured).
    steps = decode.read_steps(acts_dir, layers if args.mode == "layer" else layout.step2_layers(acts_dir), B, T, mask)
    settings.update({"batch": f"{B} prompts x {T} positions, {int(real_rows.sum())} real tokens",
                     "reference dtype": meta["dtype"], "logits captured": meta["logits"], "decode steps": len(steps),
                     "input hashes": hashes.line()})
    r = forward_io.Inputs(args, acts_dir, weights_dir, out_dir, meta, mask, position_ids, real_rows,
               qkv.real_prob_rows(mask, meta["num_heads"]), forward.last_real_rows(mask), tokens.get("prompts", []),
               forward_io.read_vocab(acts_dir, meta["vocab_size"]), settings, t0, pow_lanes, steps)
    return layer_mode(r, layers, with_head) if args.mode == "layer" else chain_mode(r)


if __name__ == "__main__":
    run(main)
