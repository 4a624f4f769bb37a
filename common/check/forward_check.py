"""Step 4's two checks of the forward pass, each from an opened run (common/check/offline_run.py) to
its report: layer mode (every node of each layer from its captured input, then the head from the
captured last layer output) and chain mode (x_layer0 through every layer on our own outputs, judged by
the logits, and decode steps generated offline).
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.check import decode, meta_check, offline, offline_run, quant_check, report
from common.check.verify import compare
from common.cli import InputError, parse_layers
from common.files import layout, quant_weights
from common.files.csv_io import read_csv, write_csv
from common.llama import forward, kv_cache
from common.llama.spec import LayerSpec

TITLE = "Step 4: the forward pass offline vs the model"


@dataclass(frozen=True)
class Checks:
    """What step 4's flags decide about its checks."""
    atol: float
    rtol: float
    chain_rtol: float
    top_k: int
    plots: bool


@dataclass
class Inputs:
    """What both of step 4's modes read before any work: folders, meta_model.json, the batch, the vocabulary."""
    f: offline_run.Folders
    meta: dict
    batch: offline_run.Batch
    checks: Checks
    prompts: list[str]
    vocab: list[str] | None
    settings: dict
    t0: float
    quant: quant_check.QuantRun = quant_check.FLOAT  # a quantized capture's scheme (common/check/quant_check.py)

    def read_head(self):
        """The final norm's weight and the head's blocks; with --quant-head the quantized head whole."""
        norm_w, blocks = offline.read_head_weights(self.f.weights, self.meta)
        return (norm_w, blocks) if self.quant.head_weight is None else (norm_w, iter([self.quant.head_weight()]))

    @property
    def n_rows(self) -> int:
        return self.meta["batch_size"] * self.meta["seq_len"]

    @property
    def last(self) -> np.ndarray:
        """(B,) each prompt's last real row."""
        return forward.last_real_rows(self.batch.mask)

    def logit_checked_rows(self) -> np.ndarray:
        """Which rows of ref_logits are real: every real token ("all"), or all B rows ("last")."""
        return self.batch.real_rows if self.meta["logits"] == "all" else np.ones(len(self.last), bool)

    def at_last(self, logits: np.ndarray) -> np.ndarray:
        """The rows of each prompt's last real token: (B, V)."""
        return logits[self.last] if self.meta["logits"] == "all" else logits


def choose_layers(mode: str, layers: str | None, acts_dir: Path, meta: dict, model_dir: Path) -> list[int]:
    """Layer mode: the chosen layers (--layers), each with its meta in ACTS_DIR. Chain mode: every layer."""
    if mode == "chain":
        if parse_layers(layers, meta["num_layers"]) is not None:
            raise InputError("--layers: chain mode runs every layer from x_layer0; drop --layers, or use --mode layer")
        return list(range(meta["num_layers"]))
    return offline_run.choose_layers(layers, acts_dir, model_dir)


def check_inputs(mode: str, top_k: int, acts_dir: Path, meta: dict, layers: list[int], model_dir: Path) -> bool:
    """Everything the run needs, checked before any work; returns whether the head is checked."""
    if top_k < 1:
        raise InputError(f"--top-k {top_k}: give at least 1")
    if mode == "layer":
        metas = meta_check.read_metas(acts_dir, layers)
        first = metas[layers[0]]
        if (first["batch_size"], first["seq_len"]) != (meta["batch_size"], meta["seq_len"]):
            raise InputError(f"{acts_dir / layout.META_MODEL} and {layout.meta_file(layers[0])} disagree on the "
                             f"batch: {layout.rerun_step2(model_dir)}")
    has_logits = meta["logits"] != "none" and (acts_dir / layout.REF_LOGITS).is_file()
    if mode == "chain" and not has_logits:
        raise InputError(f"{acts_dir / layout.REF_LOGITS} is missing (step 2 ran with --logits none?): chain mode "
                         f"checks the logits; {layout.rerun_step2(model_dir)} --logits last")
    return has_logits and meta["num_layers"] - 1 in layers

def step4_weights(f, meta: dict, layers: list[int], with_head: bool, quant, model_dir: Path) -> tuple[list[str], "quant_check.QuantRun"]:
    """Step 4's weight files (names, for the hash check), float or of the capture's scheme (step 1
    --quant, the head as it is read), checked against the capture; and the run's QuantRun."""
    scheme, quant_head = quant_weights.scheme_of(meta, f.acts / layout.META_MODEL, quant)
    paths1 = quant_weights.head_as_read(offline.weight_files(f.weights, meta, layers, with_head), meta, quant_head)
    quant_weights.check(f.weights, paths1, scheme, quant_head, meta["model_dir"], f.acts)
    if scheme is None:
        offline.check_weights(f.weights, meta, layers, with_head, model_dir)
    run = quant_check.QuantRun(scheme, quant_head,
                               quant_weights.head_reader(f.weights, meta, scheme) if quant_head else None)
    return [p.name for p in quant_weights.files(paths1, scheme, quant_head)], run



def run_head(r: Inputs, x: np.ndarray) -> tuple[dict, np.ndarray]:
    """Final norm and logits from the last layer's output x; writes norm.csv, logits.csv.

    Returns (our nodes, the model's logits: ref_logits.csv)."""
    norm_w, head_blocks = r.read_head()
    out = forward.head(x, norm_w, head_blocks, r.meta["rms_norm_eps"], offline.logit_rows(r.meta, r.batch.mask))
    write_csv(r.f.out / layout.NORM, out["norm"])
    write_csv(r.f.out / layout.LOGITS, out["logits"])
    return out, offline.read_ref_logits(r.f.acts, r.meta, out["logits"].shape[0])


def layer_mode(r: Inputs, layers: list[int], with_head: bool) -> int:
    """Every node of every chosen layer from its captured input, then the head from the captured last output."""
    c, meta, spec = r.checks, r.meta, LayerSpec.from_meta(r.meta, r.batch.pow_lanes)
    results, missing = {}, []
    real_probs = offline.real_prob_rows(r.batch.mask, meta["num_heads"])  # (B*H*T,)
    for n in tqdm(layers, desc="layers", unit="layer", disable=len(layers) < 4, file=sys.stdout):
        x = offline.read_layer_input(r.f.acts, n, meta)
        w = offline.read_layer_weights(r.f.weights, n, meta, r.quant.read)
        write = quant_check.writing_tapes(offline.write_layer_nodes, quant_check.linears(w))  # + xq/xscale/acc
        keep = offline.probs_to_keep(meta["seq_len"], None)  # every head's, up to PROBS_MAX_SEQ_LEN tokens
        rows = offline.as_rows(forward.decoder_layer(x, w, spec, r.batch.position_ids, r.batch.mask, keep), r.n_rows)
        write(r.f.out, n, rows)
        checked, miss = offline.verify(r.f.acts, n, rows, r.batch.real_rows, real_probs, c.atol, c.rtol,
                                       offline.CHECKED)
        checked.update(quant_check.check_layer(r.f.acts, n, w, r.batch.real_rows))  # {} for float weights
        if checked:
            results[n] = checked
        missing += miss
        if r.batch.steps:  # every decode step of this layer from its captured x, over a cache of our own K and V
            cache = kv_cache.grow(None, rows["k"], rows["v"], meta["batch_size"], meta["head_dim"])
            scales: dict = {}
            compute = quant_check.checking(functools.partial(offline.layer_step, w, spec), w, n, scales)
            checked, miss = decode.verify_steps(r.batch.steps, n, cache, compute, write, r.f.out, offline.CHECKED,
                                                c.atol, c.rtol)
            results.update({key: {**m, **scales.get(key, {})} for key, m in checked.items()})
            missing += miss
    head, tops = {}, []
    if with_head:  # from the captured input of the final norm, so a head error is the head's own
        ref_out = r.f.acts / layout.ref_file("out", layers[-1])
        x = read_csv(ref_out if ref_out.is_file() else r.f.out / layout.layer_file("out", layers[-1]),
                     (r.n_rows, meta["d_model"]))
        ours, ref = run_head(r, x)
        head = {"norm": compare(ours["norm"], read_csv(r.f.acts / layout.REF_NORM, (r.n_rows, meta["d_model"])),
                                r.batch.real_rows, c.atol, c.rtol),
                "logits": compare(ours["logits"], ref, r.logit_checked_rows(), c.atol, c.rtol)}
        tops = report.top_tokens(r.at_last(ref), r.at_last(ours["logits"]), r.vocab, r.prompts, c.top_k)
    decoded = {}
    if with_head and r.batch.steps:  # each step's head from the step's captured last layer output
        norm_w, head_blocks = r.read_head()
        last = layers[-1]

        def last_out(st: decode.Step) -> np.ndarray:
            ref_out = st.folder / layout.ref_file("out", last)
            mine = decode.step_dir(r.f.out, st.step) / layout.layer_file("out", last)
            return read_csv(ref_out if ref_out.is_file() else mine, (meta["batch_size"], meta["d_model"]))
        decoded = decode.head_steps(r.batch.steps, last_out, norm_w, list(head_blocks), meta, r.f.out, c.atol, c.rtol)
    print(f"wrote {len(layers) * len(layout.FORWARD_STEMS)} layer CSV files"
          + (f", {layout.NORM}, {layout.LOGITS}" if head else "") + f" to {r.f.out}")
    if not results:
        print(f"no reference files in {r.f.acts} (2_get_x.py run without them?): nothing verified")
        return 0
    if missing:
        print(f"warning: {len(missing)} reference files missing, e.g. {missing[0]}: those were not verified")

    plots = []
    if c.plots:
        plots = [r.f.out / layout.ERRORS_PLOT] + ([r.f.out / layout.TOP_TOKENS_PLOT] if tops else [])
        report.plot_errors(plots[0], results, c.rtol, r.quant.quantities(offline.CHECKED), "Step 4, layer mode: every node vs the model")
        if tops:
            report.plot_top_tokens(plots[1], tops)
    passed = (report.all_pass(results) and all(m["pass"] for m in head.values())
              and all(map(report.decode_passed, decoded.values())))
    head_md = ["", f"**{report.head_line(head)}**"] if head else []
    decode_table = report.decode_rows(decoded, r.vocab) if decoded else []
    if decoded:
        head_md += ["", "## Decode steps: the head from each step's captured last layer output", ""]
        head_md += report.markdown_table(decode_table)
    report.write_reports(r.f.out, results, {k: str(v) for k, v in r.settings.items()}, report.FORWARD_DEFINITION,
                         [p.name for p in plots], c.atol, c.rtol, r.quant.quantities(offline.CHECKED),
                         f"{TITLE} (layer mode)",
                         {"mode": "layer", "head": head, "top_tokens": tops,
                          **({"decode_head": {f"step_{s}": c for s, c in decoded.items()}} if decoded else {})},
                         head_md + report.top_tokens_markdown(tops), passed)
    print(f"wrote {r.f.out / layout.REPORT_JSON}, {layout.REPORT_MD}" + "".join(f", {p.name}" for p in plots)
          + f" in {time.perf_counter() - r.t0:.2f} s")
    if tops:
        print(report.top_tokens_text(tops))
    print(report.console_table(results, c.atol, c.rtol, r.quant.quantities(offline.CHECKED)))  # the table ends the run
    if head:
        print(report.head_line(head))
    if decoded:
        print(report.text_table(decode_table))
    return 0 if passed else 1


def chain_mode(r: Inputs) -> int:
    """x_layer0 through every layer on our own outputs, the final norm and the head; judged by the logits."""
    c, meta, spec = r.checks, r.meta, LayerSpec.from_meta(r.meta, r.batch.pow_lanes)
    layers = range(meta["num_layers"])
    # Decode steps run every layer again for each new token: then the layers' weights are kept after
    # their first read (the whole model in memory), and each layer's K and V start its cache.
    kept: dict[int, forward.LayerWeights] = {}
    caches: dict[int, kv_cache.Cache] = {}
    loaded: dict[int, forward.LayerWeights] = {}  # the layer just run: its quantized linears' integer tensors

    def load(n: int) -> forward.LayerWeights:
        w = kept.get(n) or offline.read_layer_weights(r.f.weights, n, meta, r.quant.read)
        loaded.clear()
        loaded[n] = w
        if r.batch.steps:
            kept[n] = w
        return w
    chained = forward.chain(offline.read_layer_input(r.f.acts, 0, meta), layers, load, r.batch.position_ids,
                            r.batch.mask,
                            lambda n: spec)
    growth = {}
    for n, nodes in tqdm(chained, total=len(layers), desc="layers", unit="layer", disable=len(layers) < 4,
                         file=sys.stdout):
        rows = offline.as_rows(nodes, r.n_rows)
        if r.batch.steps:
            caches[n] = kv_cache.grow(None, rows["k"], rows["v"], meta["batch_size"], meta["head_dim"])
        quant_check.writing_tapes(offline.write_layer_nodes, quant_check.linears(loaded[n]))(r.f.out, n, rows)
        ref_path = r.f.acts / layout.ref_file("out", n)
        if ref_path.is_file():
            growth[n] = compare(rows["out"], read_csv(ref_path, rows["out"].shape), r.batch.real_rows, 0.0,
                                c.chain_rtol)
        x = rows["out"]
    ours, ref = run_head(r, x)
    checked = r.logit_checked_rows()
    logits = compare(ours["logits"], ref, checked, 0.0, c.chain_rtol)
    agree = forward.top_k(ours["logits"][checked], 1) == forward.top_k(ref[checked], 1)
    if r.quant.scheme is not None:  # quantized: a near-tie of the model's may go either way
        agree |= quant_check.within_margin(ours["logits"][checked], ref[checked], logits["max_abs"])[:, None]
    top1 = {"agree": int(agree.sum()), "total": int(checked.sum())}
    tops = report.top_tokens(r.at_last(ref), r.at_last(ours["logits"]), r.vocab, r.prompts, c.top_k)
    top5 = {"agree": sum(t["topk_same_set"] for t in tops), "total": len(tops)}
    passed, verdict = report.chain_verdict(logits, top1, top5, c.chain_rtol)
    print(f"wrote {len(layers) * len(layout.FORWARD_STEMS)} layer CSV files, {layout.NORM}, {layout.LOGITS} "
          f"to {r.f.out}")
    decoded = {}
    if r.batch.steps:  # generate offline: our own greedy tokens, their embeddings, our own caches
        first = r.at_last(ours["logits"]).argmax(axis=1)  # (B,): our greedy token after the prefill
        embed = decode.embedding_rows(r.f.weights, meta, {int(t) for st in r.batch.steps for t in st.fed})
        norm_w, head_blocks = r.read_head()
        decoded = decode.chain_steps(r.batch.steps, first, caches, load, spec, embed, norm_w, list(head_blocks), meta,
                                     r.f.out, c.chain_rtol)
        ok = decode.chain_passed(decoded, r.batch.steps)
        passed = passed and ok
        verdict += (f"; {'PASS' if ok else 'FAIL'}: {len(r.batch.steps)} decode steps generated offline "
                    + ("give the model's greedy tokens" if ok else "differ from the model's"))

    plots = []
    if c.plots:
        plots = [r.f.out / layout.CHAIN_PLOT, r.f.out / layout.TOP_TOKENS_PLOT]
        report.plot_chain(plots[0], growth, logits, c.chain_rtol)
        report.plot_top_tokens(plots[1], tops)
    report.write_chain_report(r.f.out, passed, verdict, growth, logits, top1, top5, tops,
                                      {k: str(v) for k, v in r.settings.items()}, [p.name for p in plots], decoded,
                                      r.vocab)
    print(f"wrote {r.f.out / layout.REPORT_JSON}, {layout.REPORT_MD}" + "".join(f", {p.name}" for p in plots)
          + f" in {time.perf_counter() - r.t0:.2f} s")
    print(report.top_tokens_text(tops))
    print(report.text_table(report.chain_rows(growth)))  # the table ends the run
    if decoded:
        print(report.text_table(report.decode_rows(decoded, r.vocab)))
    print(verdict)
    return 0 if passed else 1
