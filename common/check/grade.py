"""Step 6: grade another implementation's outputs (any format 5_golden.py writes, or CSV/npy) against
step 2's references, node by node in forward order.

A candidate folder holds files named as steps 3/4 write them (q_layerN, attn_layerN, out_layerN,
logits, ...; a ref_ prefix is allowed). With golden_manifest.json the manifest says which files, their
format, encoding and shapes (and every sha256 must match); without one, *.csv and float *.npy are read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.check import golden, golden_int
from common.check.report import _json_safe, _pyplot, _save
from common.check.verify import DEFINITION as VERIFY_DEFINITION
from common.check.verify import compare
from common.cli import InputError
from common.files import layout, nodes
from common.files.atomic import write_json, write_text
from common.files.csv_io import read_csv

NAMES = ("q_layerN, k_layerN, v_layerN, probs_layerN, attn_layerN, xnorm/h/hnorm/act/mlp/out_layerN, "
         "x_layerN, norm, logits")
NEEDS_MANIFEST = ("bin", "hex", "mem", "npz")
DEFINITION = """Here a is the candidate's value and r step 2's (the model's own), node by node, as in step 3:

""" + VERIFY_DEFINITION + """
Also over the real rows, in float64:

    cosine  = sum(a*r) / (|a| |r|)                   (1 = same direction)
    NMSE_dB = 10 log10( sum((a-r)^2) / sum(r^2) )    (-inf = identical; -20 dB: an error of 10% RMS)

A fixed-point candidate (2^-FRAC_BITS per step) gets its quantisation step added to ATOL; a bfloat16 or
float16 one its relative rounding (2^-8, 2^-11) added to RTOL: the encoding's own rounding is allowed.
The first failing node in forward order (layer by layer: x, xnorm, q, k, v, probs, attn, h, hnorm, act,
mlp, out; then norm, logits) is where to look first: later nodes inherit its error.
"""
# What an encoding's own rounding may add: (to ATOL, to RTOL).
ENCODING_SLACK = {"float32": (0.0, 0.0), "bfloat16": (0.0, 2.0 ** -8), "float16": (2.0 ** -25, 2.0 ** -11)}


@dataclass
class Candidate:
    tensor: str  # the file stem / manifest tensor name, e.g. attn_layer2
    layer: int | None
    node: str
    path: Path
    fmt: str  # csv | npy | bin | hex | mem | npz
    enc: golden.Encoding
    shape: tuple[int, ...] | None = None  # from the manifest
    key: str | None = None  # npz member

    @property
    def label(self) -> str:
        return nodes.label(self.layer, self.node)


def _parse_name(tensor: str, path: Path) -> tuple[int | None, str] | None:
    """(layer, node) of a candidate's name; None for a model input (skipped); unknown names are an InputError."""
    if tensor in nodes.INPUTS:
        return None
    parsed = nodes.parse(tensor)
    if parsed is None:
        raise InputError(f"{path}: unknown name {tensor!r}: name the files as steps 3/4 do ({NAMES})")
    return parsed[0], parsed[1]


def find_candidates(folder: Path) -> tuple[list[Candidate], list[str]]:
    """The candidate files in forward order, and the names skipped (model inputs)."""
    if not folder.is_dir():
        raise InputError(f"candidate folder {folder} does not exist: pass --candidate-dir")
    found, skipped = [], []
    if golden_int.is_integer_manifest(folder):
        raise InputError(f"{folder} holds integer words (5_golden.py --integer): grade it against a folder with the "
                         "same integer tensors (the quantized run's step 3/4 folder) as --reference-dir")
    if (folder / golden.MANIFEST).is_file():
        manifest, enc = golden.load_manifest(folder)
        for e in manifest["files"]:
            where = folder / e["file"]
            parsed = _parse_name(e["tensor"], where)
            if parsed is None:
                skipped.append(e["tensor"])
                continue
            found.append(Candidate(e["tensor"], *parsed, where, manifest["format"], enc, tuple(e["shape"]),
                                   e.get("key")))
    else:
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            ext = path.suffix[1:]
            if ext in NEEDS_MANIFEST:
                raise InputError(f"{path}: a .{ext} file needs {folder / golden.MANIFEST} to say its encoding and "
                                 "shape: write the folder with 5_golden.py")
            if ext not in ("csv", "npy"):
                continue  # reports, plots, notes
            parsed = _parse_name(path.stem, path)
            if parsed is None:
                skipped.append(path.stem)
                continue
            found.append(Candidate(path.stem, *parsed, path, ext, golden.make_encoding("float32")))
    seen: dict[tuple, Candidate] = {}
    for c in found:
        if (c.layer, c.node) in seen:
            raise InputError(f"{c.path} and {seen[c.layer, c.node].path} are both {c.label}: keep one")
        seen[c.layer, c.node] = c
    if not found:
        raise InputError(f"no candidate files in {folder}: put files named {NAMES} there (CSV, npy, or 5_golden.py's)")
    return sorted(found, key=lambda c: nodes.forward_key(c.layer, c.node)), skipped


def load(c: Candidate) -> np.ndarray:
    """A candidate's values: float32 (float64 for fixed point, exact)."""
    if c.fmt == "csv":
        return read_csv(c.path)
    if c.shape is None:  # a bare npy: float values as they are
        try:
            a = np.load(c.path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{c.path}: not a readable npy file ({e})") from None
        if a.dtype.kind != "f":
            raise InputError(f"{c.path} holds {a.dtype}: integer words need {golden.MANIFEST} to give their "
                             "scale: write the folder with 5_golden.py")
        return a.astype(np.float32) if a.dtype.itemsize < 4 else a
    return golden.decode(golden.read_tensor(c.path, c.fmt, c.enc, c.shape, c.key), c.enc)


def reference_path(ref_dir: Path, c: Candidate) -> Path:
    """Step 2's file for a node: ref_<name>.csv (x and xnorm: also the unprefixed capture)."""
    path = ref_dir / nodes.csv_name(c.node, c.layer, ref=True)
    plain = ref_dir / nodes.csv_name(c.node, c.layer)
    if not path.is_file() and c.node in nodes.UNPREFIXED_REFS and plain.is_file():
        return plain
    if not path.is_file():
        raise InputError(f"{path} is missing, the reference for {c.path.name}: run 2_get_x.py on that model "
                         f"(with its references for {c.label}), or leave {c.path.name} out")
    return path


def real_rows(node: str, rows: int, mask: np.ndarray, path: Path) -> np.ndarray:
    """Which rows of a node's file are real tokens: rows b*T + t; probs (b*H + h)*T + t; logits of the
    last token only: one row per prompt (all real)."""
    B, T = mask.shape
    real = mask > 0  # (B, T)
    if rows == B * T:
        return real.reshape(-1)
    if node == "logits" and rows == B:
        return np.ones(B, bool)
    if node == "probs" and rows % (B * T) == 0:
        H = rows // (B * T)
        return np.broadcast_to(real[:, None, :], (B, H, T)).reshape(-1)  # (B, H, T) -> ((b*H + h)*T + t,)
    raise InputError(f"{path} has {rows} rows, but attention_mask.csv says {B} prompts x {T} positions "
                     f"({B * T} rows): the reference folder and this file do not belong together")


def tolerances(enc: golden.Encoding, atol: float, rtol: float) -> tuple[float, float, str | None]:
    """ATOL, RTOL for a candidate in `enc`, and a note saying what was added (None: nothing)."""
    if enc.name == "fixed":
        return atol + enc.step, rtol, f"ATOL + one quantisation step 2^-{enc.frac_bits} = {enc.step:.3g}"
    da, dr = ENCODING_SLACK[enc.name]
    if not (da or dr):
        return atol, rtol, None
    return atol + da, rtol + dr, f"RTOL + {dr:.3g} (the relative rounding of {enc.name})"


def grade(a: np.ndarray, r: np.ndarray, real: np.ndarray, atol: float, rtol: float) -> dict:
    """common.check.verify.compare's max_abs, max_rel, PASS, plus cosine similarity and NMSE in dB."""
    m = compare(a, r, real, atol, rtol)
    x, y = a[real].astype(np.float64).ravel(), r[real].astype(np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return {**m, "cosine": math.nan, "nmse_db": math.nan}
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    cosine = float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0)
    err, energy = float(np.sum((x - y) ** 2)), float(np.sum(y * y))
    nmse_db = -math.inf if err == 0 else (10 * math.log10(err / energy) if energy > 0 else math.inf)
    return {**m, "cosine": cosine, "nmse_db": nmse_db}


# --- the report ----------------------------------------------------------------------------------


def first_failing(results: list[dict]) -> dict | None:
    """The first FAIL in forward order (results are in forward order)."""
    return next((r for r in results if not r["pass"]), None)


def describe(r: dict) -> str:
    return (f"{r['label']} ({r['file']}): max_abs {r['max_abs']:.2e}, max_rel {r['max_rel']:.2e}, "
            f"cosine {r['cosine']:.6f}, NMSE {r['nmse_db']:.1f} dB")


def summary_line(results: list[dict], atol: float, rtol: float) -> str:
    fail = [r for r in results if not r["pass"]]
    worst = max(results, key=lambda r: math.inf if math.isnan(r["max_rel"]) else r["max_rel"])
    head = "PASS" if not fail else f"FAIL ({len(fail)} of {len(results)} nodes)"
    return (f"{head}: {len(results)} nodes graded; worst max_rel {worst['max_rel']:.2e} ({worst['label']}); "
            f"PASS when max_abs <= ATOL {atol:g} + RTOL {rtol:g} * max|ref|")


def first_failing_line(results: list[dict]) -> str:
    r = first_failing(results)
    return "first failing node: none" if r is None else \
        f"first failing node in forward order: {describe(r)}: look there first"


def _columns(results: list[dict]) -> list[str]:
    present = {r["node"] for r in results}
    return [n for n in nodes.LAYER_NODES + nodes.FINAL_NODES if n in present]


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per layer (and one "final" row): max_rel of each node present, and the row's verdict."""
    cols = _columns(results)
    by_row: dict = {}
    for r in results:
        by_row.setdefault(r["layer"], {})[r["node"]] = r
    rows = []
    for layer in sorted(by_row, key=lambda n: math.inf if n is None else n):
        per = by_row[layer]
        cells = [("-" if n not in per else f"{per[n]['max_rel']:.1e}" + ("" if per[n]["pass"] else " FAIL"))
                 for n in cols]
        rows.append(["final" if layer is None else str(layer), *cells,
                     "PASS" if all(r["pass"] for r in per.values()) else "FAIL"])
    return ["layer", *(f"{n} max_rel" for n in cols), "result"], rows


def console_table(results: list[dict], atol: float, rtol: float) -> str:
    header, rows = table_rows(results)
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [first_failing_line(results), summary_line(results, atol, rtol)])


def markdown(results: list[dict], settings: dict, plots: list[str], atol: float, rtol: float) -> str:
    header, rows = table_rows(results)
    lines = ["# Step 6: a candidate implementation vs the model", "", f"**{summary_line(results, atol, rtol)}**",
             "", f"**{first_failing_line(results)}**", "", "## Per layer (max_rel per node)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Every node, in forward order", "",
              "| node | file | max_abs | max_rel | cosine | NMSE dB | tol | result |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['file']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['cosine']:.6f} | "
              f"{r['nmse_db']:.1f} | {r['tol']:.2e} | {'PASS' if r['pass'] else 'FAIL'} |" for r in results]
    lines += ["", "## Error definition", "", DEFINITION.strip(), "", "## Settings", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in settings.items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_reports(out_dir: Path, results: list[dict], settings: dict, plots: list[str], atol: float,
                  rtol: float) -> None:
    first = first_failing(results)
    write_json(out_dir / layout.REPORT_JSON, _json_safe({
        "pass": first is None, "first_failing": first, "atol": atol, "rtol": rtol,
        "definition": DEFINITION.strip(), "nodes": results, "settings": settings, "plots": plots,
    }))
    write_text(out_dir / layout.REPORT_MD, markdown(results, settings, plots, atol, rtol))


def plot_errors(path: Path, results: list[dict]) -> None:
    """Per layer, one line per node kind: max_rel (left) and max_abs / tolerance (right, FAIL above 1).
    The final nodes (norm, logits) sit one step right of the last layer."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    layers = sorted({r["layer"] for r in results if r["layer"] is not None})
    final_x = (layers[-1] + 1) if layers else 0
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    markers = "osD^v<>phx*+"
    for i, node in enumerate(_columns(results)):
        rs = [r for r in results if r["node"] == node]
        xs = [final_x if r["layer"] is None else r["layer"] for r in rs]
        for ax, ys in zip(axes, ([r["max_rel"] for r in rs], [r["max_abs"] / r["tol"] for r in rs])):
            ys = [max(y, 1e-12) if math.isfinite(y) else np.nan for y in ys]  # log scale: zeros at the floor
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=node, linewidth=1, markersize=4)
    axes[1].axhline(1.0, color="red", linestyle="--", linewidth=1, label="tolerance")
    axes[0].set_ylabel("max |a - ref| / max |ref|")
    axes[1].set_ylabel("max |a - ref| / (ATOL + RTOL max |ref|)")
    axes[0].set_title("Candidate vs the model, real tokens only")
    axes[1].set_title("Share of the tolerance used (FAIL above 1)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("layer" + (f" ({final_x}: after the last layer)" if any(r["layer"] is None for r in results) else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(ncol=7, fontsize=8, loc="best")
    _save(fig, path)
    plt.close(fig)
