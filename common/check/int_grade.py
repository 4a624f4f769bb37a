"""Step 6 on integer tensors: exact, to the last bit.

When both folders hold integer tensors of the quantized path under the same names (xq_/xzero_/acc_
files of steps 3/4, step 1's .q.csv; as CSV or as 5_golden.py --integer words), every common tensor
is compared exactly: 0 LSB, or the number of mismatches, the first one in forward order (layer,
tensor, index) and how many are off by exactly 1, the signature of a different rounding rule (half
up vs half even, single vs double rounding), not of a wrong product. No tolerance: integers agree or not.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from common.check import golden_int
from common.check.report import _json_safe
from common.cli import InputError
from common.files import layout
from common.files.atomic import write_json, write_text
from common.files.csv_io import read_int_csv

KIND_ORDER = ("xq", "xzero", "acc", "q")  # in a linear: its input, its zero point, its accumulator; weights last


def integer_tensors(folder: Path) -> dict[str, Callable[[], np.ndarray]]:
    """tensor name -> a loader of its exact integers (int64), from CSVs or an integer golden folder."""
    if golden_int.is_integer_manifest(folder):
        m = golden_int.load_manifest(folder)
        return {e["tensor"]: (lambda e=e: golden_int.read_entry(folder, m["format"], e))
                for e in m["files"] if e["word"] in golden_int.INT_WORDS}
    if not folder.is_dir():
        return {}
    return {p.stem: (lambda p=p: read_int_csv(p)) for p in sorted(folder.glob("*.csv"))
            if golden_int.is_integer_source(p.stem) and golden_int.word_of(p.stem, None) != "float32"}


def applies(cand_dir: Path, ref_dir: Path) -> bool:
    """Both folders hold integer tensors with a name in common."""
    return bool(set(integer_tensors(cand_dir)) & set(integer_tensors(ref_dir)))


def forward_key(tensor: str) -> tuple:
    if parsed := layout.parse_quant_file(tensor):
        kind, proj, n = parsed
        return (n, layout.QUANT_LINEARS.index(proj), KIND_ORDER.index(kind))
    layer = golden_int.layer_of(tensor)
    proj = next((p for p in layout.QUANT_LINEARS if f".{p}." in tensor), None)
    return (math.inf if layer is None else layer, layout.QUANT_LINEARS.index(proj) if proj else 99, len(KIND_ORDER))


def compare_exact(a: np.ndarray, r: np.ndarray) -> dict:
    """Mismatches, those off by exactly 1, the largest difference in LSB, the first mismatch's index."""
    d = a.astype(np.int64) - r.astype(np.int64)
    wrong = d != 0
    n = int(np.count_nonzero(wrong))
    first = tuple(int(i) for i in np.argwhere(wrong)[0]) if n else None
    return {"values": int(d.size), "mismatches": n, "off_by_one": int(np.count_nonzero(np.abs(d) == 1)),
            "max_lsb": int(np.abs(d).max()) if d.size else 0, "first_index": first,
            "first_values": [int(a[first]), int(r[first])] if n else None}


def grade_folders(cand_dir: Path, ref_dir: Path) -> tuple[list[dict], list[str]]:
    """Every integer tensor the two folders share, in forward order; and the candidate's unmatched names."""
    cand, ref = integer_tensors(cand_dir), integer_tensors(ref_dir)
    common = sorted(set(cand) & set(ref), key=forward_key)
    results = []
    for name in common:
        a, r = cand[name](), ref[name]()
        if a.shape != r.shape:
            raise InputError(f"{cand_dir}: {name} has shape {a.shape}, its reference in {ref_dir} {r.shape}: "
                             "write it in the reference's shape and row order")
        layer = golden_int.layer_of(name)
        results.append({"tensor": name, "layer": layer, **compare_exact(a, r)})
    return results, sorted(set(cand) - set(ref))


def summary(results: list[dict]) -> dict:
    bad = [r for r in results if r["mismatches"]]
    first = bad[0] if bad else None
    return {"exact": not bad, "tensors": len(results), "values": sum(r["values"] for r in results),
            "mismatches": sum(r["mismatches"] for r in results),
            "off_by_one": sum(r["off_by_one"] for r in results),
            "max_lsb": max((r["max_lsb"] for r in results), default=0),
            "first": None if first is None else {"layer": first["layer"], "tensor": first["tensor"],
                                                 "index": first["first_index"], "candidate_reference": first["first_values"]}}


def summary_line(s: dict) -> str:
    if s["exact"]:
        return f"EXACT: {s['tensors']} integer tensors, {s['values']:,} values, 0 LSB"
    f = s["first"]
    return (f"MISMATCH: {s['mismatches']:,} of {s['values']:,} values differ ({s['off_by_one']:,} off by exactly 1, "
            f"largest {s['max_lsb']} LSB); first: layer {f['layer']} {f['tensor']} at {tuple(f['index'])} "
            f"(candidate {f['candidate_reference'][0]}, reference {f['candidate_reference'][1]})")


def table(results: list[dict]) -> list[str]:
    head = ["tensor", "values", "mismatches", "off by 1", "max LSB"]
    rows = [[r["tensor"], f"{r['values']:,}", f"{r['mismatches']:,}", f"{r['off_by_one']:,}", str(r["max_lsb"])]
            for r in results]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head, *rows]]


def write_reports(out_dir: Path, results: list[dict], s: dict, settings: dict, skipped: list[str]) -> None:
    write_json(out_dir / layout.REPORT_JSON, _json_safe({"mode": "integer", **s, "tensors_graded": results,
                                                         "not_in_reference": skipped, "settings": settings}))
    md = ["# Step 6: integer tensors, exact", "", f"**{summary_line(s)}**", "",
          "| tensor | values | mismatches | off by exactly 1 | max LSB | first mismatch |", "|---|---|---|---|---|---|"]
    md += [f"| {r['tensor']} | {r['values']} | {r['mismatches']} | {r['off_by_one']} | {r['max_lsb']} | "
           f"{'' if r['first_index'] is None else tuple(r['first_index'])} |" for r in results]
    md += ["", "Off by exactly 1 is the signature of another rounding rule (half up vs half even, single vs "
           "double rounding); a larger difference is a wrong product or a wrong input.", "", "## Settings", ""]
    md += [f"- `{k}`: `{v}`" for k, v in settings.items()]
    write_text(out_dir / layout.REPORT_MD, "\n".join(md) + "\n")


def run(cand_dir: Path, ref_dir: Path, out_dir: Path, settings: dict) -> int:
    """Grade, write report.json/md, print the table and the verdict last; exit code 0 exact, 1 not."""
    results, skipped = grade_folders(cand_dir, ref_dir)
    s = summary(results)
    write_reports(out_dir, results, s, {k: str(v) for k, v in settings.items()}, skipped)
    print("\n".join(table(results)))
    if skipped:
        print(f"not in the reference (not graded): {', '.join(skipped)}")
    print(f"wrote {out_dir / layout.REPORT_JSON}, {layout.REPORT_MD}")
    print(summary_line(s))
    return 0 if s["exact"] else 1
