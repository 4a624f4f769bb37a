"""Step 6: grade another implementation's outputs against the model's references, node by node.

Reads CANDIDATE_DIR: files named as steps 3/4 write them (q_layerN, k_layerN, v_layerN, probs_layerN,
attn_layerN, xnorm/h/hnorm/act/mlp/out_layerN, norm, logits) as CSV or float npy, or in any format
and encoding 5_golden.py writes (its golden_manifest.json beside them says which; every sha256 must
match). Reads REFERENCE_DIR (step 2: the ref_ files and attention_mask.csv), each checked first against step 2's
manifest.json (sha256; --no-verify-hashes skips that, and the report says so).
For every candidate file, over real tokens only: max_abs, max_rel (as step 3), cosine similarity and
NMSE in dB, PASS/FAIL against ATOL/RTOL; names the first failing node in forward order.
Writes to OUT_DIR: report.json, report.md, errors.png. Prints the table, the first failing node last.
Exit code: 0 all PASS, 1 any FAIL, 2 bad input (unknown name, wrong shape, manifest that does not match).

The quantized path: integer tensors on both sides (xq_/acc_/xzero_, .q.csv; CSV or 5_golden.py --integer)
are graded exactly (common/check/int_grade.py: exit 1 on any mismatch); a quantized capture against the
float capture of the same prompts (automatic when only the candidate's meta names a scheme, or
--quant-error) gives SQNR/NMSE/cosine/max_abs per node, KL/top-1/top-5 at the logits and
quant_errors.png (common/check/quant_error.py).

    python 6_grade.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1     # grades step 3's own outputs
    python 6_grade.py --candidate-dir my_accelerator_out --reference-dir outputs/M/x_all_layers --out-dir R
    python 6_grade.py --candidate-dir outputs/M/x_all_layers-w8a8 --reference-dir outputs/M/x_all_layers --out-dir R
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from common import cli, paths
from common.check import grade, int_grade, quant_error
from common.cli import InputError, path_arg, print_settings, run
from common.files import layout, manifest
from common.files.atomic import output_folder
from common.files.csv_io import read_csv

# --- constants (each has a flag of the same name: CANDIDATE_DIR -> --candidate-dir) -------------
MODEL_DIR = paths.MODEL_DIR  # only used to derive the three folders below when they are None
CANDIDATE_DIR = None  # the outputs to grade; None -> outputs/<model folder>/qkv (step 3's own)
REFERENCE_DIR = None  # step 2's folder; None -> outputs/<model folder>/x_all_layers
OUT_DIR = None  # None -> outputs/<model folder>/grade
ATOL = 1e-7  # as step 3: PASS when max_abs <= ATOL + RTOL * max|ref| (common/check/verify.py)
RTOL = 1e-5  # fixed-point candidates get one quantisation step added to ATOL (common/check/grade.py)
VERIFY_HASHES = True  # check every reference file's sha256 against step 2's manifest.json first
# Force the quantization-error report (automatic when the candidate's meta names a scheme and the
# reference's does not: common/check/quant_error.py).
QUANT_ERROR = False
# -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = cli.Parser(globals())
    p.shared("--model-dir")
    p.flag("--candidate-dir", type=path_arg)
    p.flag("--reference-dir", type=path_arg)
    p.shared("--out-dir", "--atol", "--rtol", "--verify-hashes")
    p.flag("--quant-error", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cand_dir = args.candidate_dir or layout.default_dir(args.model_dir, layout.QKV)
    ref_dir = args.reference_dir or layout.default_dir(args.model_dir, layout.ACTS)
    out_dir = args.out_dir or layout.default_dir(args.model_dir, layout.GRADE)
    settings = cli.settings(args, CANDIDATE_DIR=cand_dir, REFERENCE_DIR=ref_dir, OUT_DIR=out_dir)
    print("6_grade.py: grade a candidate implementation's outputs against the model")
    print_settings(settings)
    output_folder(out_dir, inputs=[cand_dir, ref_dir], create=False)  # never into (or around) what is read
    if not ref_dir.is_dir():
        raise InputError(f"reference folder {ref_dir} does not exist: run 2_get_x.py, or pass --reference-dir")
    if int_grade.applies(cand_dir, ref_dir):  # integer tensors on both sides: exact, no tolerance
        return int_grade.run(cand_dir, ref_dir, out_dir, settings)
    if args.quant_error or quant_error.applies(cand_dir, ref_dir):
        return quant_error.run(cand_dir, ref_dir, out_dir, settings, manifest.HashCheck(args.verify_hashes))

    t0 = time.perf_counter()
    candidates, skipped = grade.find_candidates(cand_dir)
    refs = [grade.reference_path(ref_dir, c) for c in candidates]  # all there, before any reading
    hashes = manifest.HashCheck(args.verify_hashes)
    hashes.folder(ref_dir, [layout.ATTENTION_MASK, *(p.name for p in refs)], "step 2",
                  layout.rerun_step2(args.model_dir))
    print(f"reference files: {hashes.line()}")
    mask_path = ref_dir / layout.ATTENTION_MASK
    if not mask_path.is_file():
        raise InputError(f"{mask_path} is missing: it says which rows are real tokens; "
                         "run 2_get_x.py with its masks saved (the default)")
    mask = read_csv(mask_path)  # (B, T)
    enc = candidates[0].enc
    atol, rtol, note = grade.tolerances(enc, args.atol, args.rtol)
    print(f"{len(candidates)} candidate files in {enc.describe()}" +
          (f" (skipped the model inputs {', '.join(skipped)})" if skipped else ""))
    if note:
        print(f"note: the candidate is {enc.describe()}: tolerance {note}")

    results = []
    for c, ref_path in tqdm(list(zip(candidates, refs)), desc="nodes", unit="node", disable=len(candidates) < 40,
                            file=sys.stdout):
        ref, a = read_csv(ref_path), grade.load(c)
        if a.shape != ref.shape:
            raise InputError(f"{c.path} has shape {a.shape}, its reference {ref_path} {ref.shape}: "
                             "write the candidate in the reference's shape and row order")
        real = grade.real_rows(c.node, ref.shape[0], mask, ref_path)
        results.append({"label": c.label, "layer": c.layer, "node": c.node, "file": c.path.name,
                        "reference": ref_path.name, **grade.grade(a, ref, real, atol, rtol)})
    t_grade = time.perf_counter() - t0

    plot = out_dir / layout.ERRORS_PLOT
    grade.plot_errors(plot, results)
    settings.update({"encoding": enc.describe(), "effective ATOL": atol, "effective RTOL": rtol,
                     "tolerance note": note or "none", "skipped": ", ".join(skipped) or "none",
                     "reference hashes": hashes.line()})
    grade.write_reports(out_dir, results, {k: str(v) for k, v in settings.items()}, [plot.name], atol, rtol)
    print(f"wrote {out_dir / layout.REPORT_JSON}, {layout.REPORT_MD}, {plot.name}; graded in {t_grade:.2f} s, "
          f"{time.perf_counter() - t0:.2f} s in all")
    print(grade.console_table(results, atol, rtol))
    return 0 if grade.first_failing(results) is None else 1


if __name__ == "__main__":
    run(main)
