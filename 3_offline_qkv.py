"""Step 3: recompute Q, K, V and the attention output from CSV files alone, and verify them.

Reads only ACTS_DIR (step 2: xnorm_layerN.csv, meta_layerN.json, attention_mask.csv,
position_ids.csv, tokens.json, ref_{q,k,v,attn}_layerN.csv) and WEIGHTS_DIR (step 1: the
q/k/v/o_proj CSVs of the chosen layers). No transformers, no model: the math is common/rope.py and
common/attention.py, float32 numpy, RoPE in the rotate-half layout of HF checkpoints.

Writes to OUT_DIR: q_layerN.csv, k_layerN.csv, v_layerN.csv (after RoPE, the ref_ files' shapes and
head-major column order, K/V before the GQA repeat), attn_layerN.csv (after o_proj), report.json,
report.md, errors.png and attention_layerL_headH.png. Prints the verification table.
Exit code: 0 all PASS, 1 any FAIL, 2 bad input (one line naming the file and what to do).

    python 3_offline_qkv.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1
    python 3_offline_qkv.py --acts-dir A --weights-dir W --out-dir O --layers 0,5 --rtol 1e-5
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import attention, paths, report
from common.atomic import read_json
from common.cli import InputError, parse_layers, print_settings, run
from common.csv_io import read_csv, write_csv
from common.paths import output_dir
from common.rope import check_scaling
from common.verify import DEFINITION, QUANTITIES, compare

# --- constants (each has a flag of the same name: ACTS_DIR -> --acts-dir) -----------------------
MODEL_DIR = paths.MODEL_DIR  # only used to derive the three folders below when they are None
ACTS_DIR = None  # step 2's folder; None -> outputs/<model folder>/x_all_layers
WEIGHTS_DIR = None  # step 1's folder; None -> outputs/<model folder>/weights
OUT_DIR = None  # None -> outputs/<model folder>/qkv
LAYERS = None  # None = every layer with a meta_layerN.json in ACTS_DIR; else e.g. "0,5-7" or [0, 5]
ATOL = 1e-7  # PASS when max_abs <= ATOL + RTOL * max|ref| (common/verify.py); a floor for refs near 0
RTOL = 1e-5  # fp32 recomputation lands near 1e-7; real mistakes near 1e-2 and above
PLOT_LAYER = None  # layer of the attention-pattern plot; None = the first verified layer
PLOT_HEAD = 0  # query head of that plot
PLOT_PROMPT = 0  # which prompt of the batch that plot shows
# -------------------------------------------------------------------------------------------------

ATTN_FILTER = r"\.self_attn\.(q|k|v|o)_proj\."
LOW_PRECISION_ERROR = {"bfloat16": 1e-2, "float16": 1e-3}  # roughly what a capture in that dtype is off by
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
RERUN_STEP_2 = "run 2_get_x.py again"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=MODEL_DIR, type=Path, help="derives the default folders")
    p.add_argument("--acts-dir", default=ACTS_DIR, type=Path, help="step 2's output folder")
    p.add_argument("--weights-dir", default=WEIGHTS_DIR, type=Path, help="step 1's output folder")
    p.add_argument("--out-dir", default=OUT_DIR, type=Path)
    p.add_argument("--layers", default=LAYERS, type=parse_layers, help="e.g. 0,5-7 (default: all)")
    p.add_argument("--atol", default=ATOL, type=float)
    p.add_argument("--rtol", default=RTOL, type=float)
    p.add_argument("--plot-layer", default=PLOT_LAYER, type=int)
    p.add_argument("--plot-head", default=PLOT_HEAD, type=int)
    p.add_argument("--plot-prompt", default=PLOT_PROMPT, type=int)
    return p.parse_args(argv)


def find_layers(acts_dir: Path, wanted: list[int] | None, model_dir: Path) -> list[int]:
    redo = f"run: python 2_get_x.py --model-dir {shlex.quote(str(model_dir))}"
    if not acts_dir.is_dir():
        raise InputError(f"activations folder {acts_dir} does not exist: {redo}")
    have = sorted(int(m.group(1)) for p in acts_dir.glob("meta_layer*.json")
                  if (m := re.fullmatch(r"meta_layer(\d+)\.json", p.name)))
    if not have:
        raise InputError(f"no meta_layerN.json in {acts_dir}: {redo}")
    if wanted is None:
        return have
    missing = [n for n in wanted if n not in have]
    if missing:
        raise InputError(f"{acts_dir / f'meta_layer{missing[0]}.json'} is missing (layers there: "
                         f"{have[0]}..{have[-1]}): choose --layers among them or {redo}")
    return wanted


def check_meta(meta: dict, path: Path) -> None:
    need = ("batch_size", "seq_len", "d_model", "num_heads", "num_kv_heads", "head_dim", "rope_theta")
    missing = [k for k in need if k not in meta]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: run 2_get_x.py again")
    try:
        rope_type = check_scaling(meta.get("rope_scaling"))
    except ValueError as e:
        raise InputError(f"{path}: {e}; refusing to guess") from None
    if meta.get("rope_type", rope_type) != rope_type:
        raise InputError(f"{path}: rope_type {meta['rope_type']!r} disagrees with rope_scaling "
                         f"{meta['rope_scaling']}: run 2_get_x.py again")
    if meta["num_heads"] % meta["num_kv_heads"]:
        raise InputError(f"{path}: num_heads {meta['num_heads']} is not a multiple of num_kv_heads "
                         f"{meta['num_kv_heads']}")


def weight_files(weights_dir: Path, layer: int, bias: bool) -> dict[str, Path]:
    """Tensor name -> CSV path of one layer's attention projections (step 1 names files after tensors)."""
    kinds = ("weight", "bias") if bias else ("weight",)
    names = [f"model.layers.{layer}.self_attn.{p}.{kind}" for p in PROJ for kind in kinds]
    return {n: weights_dir / f"{n}.csv" for n in names}


def uses_bias(meta: dict, weights_dir: Path, layer: int) -> bool:
    """attention_bias from meta; an older meta without it: whether step 1 exported bias files."""
    if "attention_bias" in meta:
        return bool(meta["attention_bias"])
    return (weights_dir / f"model.layers.{layer}.self_attn.q_proj.bias.csv").is_file()


def check_weights_present(weights_dir: Path, layers: list[int], metas: dict[int, dict], model_dir: Path) -> None:
    """All weight files of all chosen layers exist, or one line naming the step-1 command that makes them."""
    missing = [p for n in layers for p in weight_files(weights_dir, n, uses_bias(metas[n], weights_dir, n)).values()
               if not p.is_file()]
    if not missing:
        return
    src = shlex.quote(str(metas[layers[0]].get("model_dir") or model_dir))
    select = (f"--layer model.layers.{layers[0]}.self_attn" if len(layers) == 1
              else f"--filter {shlex.quote(ATTN_FILTER)}")
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise InputError(f"{missing[0]} is missing{more}: run python 1_model_weights.py --model-dir {src} "
                     f"--out-dir {shlex.quote(str(weights_dir))} {select}")


def load_weights(weights_dir: Path, layer: int, meta: dict) -> attention.AttentionWeights:
    d, H, Hkv, Dh = meta["d_model"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]
    files = weight_files(weights_dir, layer, uses_bias(meta, weights_dir, layer))
    out_dims = {"q_proj": H * Dh, "k_proj": Hkv * Dh, "v_proj": Hkv * Dh, "o_proj": d}
    in_dims = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": H * Dh}
    arrays = {}
    for name, path in files.items():
        proj, kind = name.split(".")[-2:]
        shape = (out_dims[proj], in_dims[proj]) if kind == "weight" else (out_dims[proj],)
        arrays[("w" if kind == "weight" else "b") + proj[0]] = read_csv(path, shape)
    return attention.AttentionWeights(**arrays)


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


def token_labels(tokens: dict, prompt: int, real: np.ndarray) -> list[str]:
    """The token strings of one prompt's real positions (ids if tokens.json has no strings)."""
    rows = tokens.get("tokens") or tokens.get("input_ids")
    if not rows or prompt >= len(rows):
        return [str(i) for i in real]
    return [str(rows[prompt][i]) for i in real]


def main(argv=None) -> int:
    args = parse_args(argv)
    acts_dir = args.acts_dir or output_dir(args.model_dir, "x_all_layers")
    weights_dir = args.weights_dir or output_dir(args.model_dir, "weights")
    out_dir = args.out_dir or output_dir(args.model_dir, "qkv")
    settings = {"MODEL_DIR": args.model_dir, "ACTS_DIR": acts_dir, "WEIGHTS_DIR": weights_dir, "OUT_DIR": out_dir,
                "LAYERS": "all" if args.layers is None else args.layers, "ATOL": args.atol, "RTOL": args.rtol}
    print("3_offline_qkv.py: recompute Q/K/V/attention from CSV (float32, no model) and verify")
    print_settings(settings)

    t_start = time.perf_counter()
    layers = find_layers(acts_dir, args.layers, args.model_dir)
    metas = {}
    for n in layers:
        path = acts_dir / f"meta_layer{n}.json"
        metas[n] = read_json(path, RERUN_STEP_2)
        check_meta(metas[n], path)
        if (metas[n]["batch_size"], metas[n]["seq_len"]) != (metas[layers[0]]["batch_size"], metas[layers[0]]["seq_len"]):
            raise InputError(f"{path} disagrees with meta_layer{layers[0]}.json on batch size or sequence "
                             "length: run 2_get_x.py again")
    B, T = metas[layers[0]]["batch_size"], metas[layers[0]]["seq_len"]
    dtype = metas[layers[0]].get("dtype", "float32")
    if dtype != "float32":
        print(f"note: the references were computed in {dtype}, this recomputation is float32: expect errors "
              f"near {LOW_PRECISION_ERROR.get(dtype, 1e-2):g}, far above RTOL {args.rtol:g} (which is for float32 captures)")
    plot_layer = check_plot_choice(args, layers, metas)
    check_weights_present(weights_dir, layers, metas, args.model_dir)

    t_read = t_compute = t_write = 0.0
    t0 = time.perf_counter()
    mask = read_csv(acts_dir / "attention_mask.csv", (B, T))
    position_ids = read_csv(acts_dir / "position_ids.csv", (B, T))
    tokens = read_json(acts_dir / "tokens.json", RERUN_STEP_2)
    t_read += time.perf_counter() - t0
    real_rows = mask.reshape(B * T) > 0  # (B, T) -> (B*T,) batch-major, like the CSV rows

    results: dict[int, dict[str, dict]] = {}
    plot_probs = None
    missing_refs = []
    for n in tqdm(layers, desc="layers", unit="layer", disable=len(layers) < 4, file=sys.stdout):
        meta = metas[n]
        d, H, Hkv, Dh = meta["d_model"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]
        t0 = time.perf_counter()
        xnorm = read_csv(acts_dir / f"xnorm_layer{n}.csv", (B * T, d))
        w = load_weights(weights_dir, n, meta)
        t_read += time.perf_counter() - t0

        t0 = time.perf_counter()
        out = attention.attention_block(xnorm, w, position_ids, mask, H, Hkv, Dh, meta["rope_theta"],
                                        meta.get("rope_scaling"))
        t_compute += time.perf_counter() - t0
        if n == plot_layer:
            plot_probs = out["probs"][args.plot_prompt, args.plot_head]  # (T, T)

        t0 = time.perf_counter()
        for qn in QUANTITIES:
            write_csv(out_dir / f"{qn}_layer{n}.csv", out[qn])
        t_write += time.perf_counter() - t0

        for qn in QUANTITIES:
            ref_path = acts_dir / f"ref_{qn}_layer{n}.csv"
            if not ref_path.is_file():
                missing_refs.append(ref_path)
                continue
            t0 = time.perf_counter()
            ref = read_csv(ref_path, out[qn].shape)
            t_read += time.perf_counter() - t0
            results.setdefault(n, {})[qn] = compare(out[qn], ref, real_rows, args.atol, args.rtol)

    print(f"wrote {len(layers) * len(QUANTITIES)} CSV files (q, k, v, attn of {len(layers)} layers) to {out_dir}")
    if not results:
        print(f"no ref_ files in {acts_dir} (2_get_x.py run with SAVE_REFERENCE off?): nothing verified")
        return 0
    if missing_refs:
        print(f"warning: {len(missing_refs)} ref_ files missing, e.g. {missing_refs[0]}: those were not verified")

    t0 = time.perf_counter()
    plots = [out_dir / "errors.png", out_dir / f"attention_layer{plot_layer}_head{args.plot_head}.png"]
    report.plot_errors(plots[0], results, args.rtol)
    real = np.flatnonzero(mask[args.plot_prompt] > 0)  # this prompt's real token indices
    report.plot_attention(plots[1], plot_probs[np.ix_(real, real)], token_labels(tokens, args.plot_prompt, real),
                          plot_layer, args.plot_head, args.plot_prompt)
    t_plot = time.perf_counter() - t0

    total = time.perf_counter() - t_start
    timing = {"total": total, "read_csv": t_read, "compute": t_compute, "write_csv": t_write, "plots": t_plot}
    settings.update({"PLOT_LAYER": plot_layer, "PLOT_HEAD": args.plot_head, "PLOT_PROMPT": args.plot_prompt,
                     "batch": f"{B} prompts x {T} positions, {int(real_rows.sum())} real tokens",
                     "reference dtype": dtype})
    report.write_reports(out_dir, results, {k: str(v) for k, v in settings.items()}, DEFINITION,
                         [p.name for p in plots], {k: round(v, 4) for k, v in timing.items()}, args.atol, args.rtol)
    print(f"wrote {out_dir / 'report.json'}, report.md, {plots[0].name}, {plots[1].name}")
    print(f"time {total:.2f} s: reading CSV {t_read:.2f} s ({100 * t_read / total:.0f}%), compute {t_compute:.2f} s, "
          f"writing CSV {t_write:.2f} s, plots {t_plot:.2f} s")
    print(report.console_table(results, args.atol, args.rtol))  # last: what `make demo` ends with
    return 0 if report.all_pass(results) else 1


if __name__ == "__main__":
    run(main)
