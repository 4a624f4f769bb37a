"""Step 6 on a quantized capture: what did quantization do, node by node?

The reference is a float capture, the candidate a quantized capture of the same prompts (step 2
folders, or step 4 folders: the same node names in both). For every node both hold, over the real
tokens only (attention_mask.csv), in float64, with r the float value and a the quantized one:

    SQNR_dB = 10 log10( sum(r^2) / sum((a - r)^2) )     (inf: identical; 20 dB: an error of 10% RMS)
    NMSE    = sum((a - r)^2) / sum(r^2)                  (= 10^(-SQNR_dB / 10))
    cosine  = sum(a r) / (|a| |r|)
    max_abs = max |a - r|

and at the logits, per real row, P = softmax(r) (the float model's next-token distribution), Q = softmax(a):

    KL(P || Q) = sum_v P_v (log P_v - log Q_v)          nats, the mean over rows (0: identical)
    top-1 agreement = share of rows where argmax a = argmax r
    top-5 overlap   = mean over rows of |top5(a) & top5(r)| / 5

Error grows through the layers: the plot draws SQNR per node against the layer, one line per node
(the attention probabilities and the MLP's act are where activation outliers show).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.check import grade
from common.check.report import _json_safe, _pyplot, _save
from common.cli import InputError
from common.files import layout, nodes
from common.files.atomic import read_json, write_json, write_text
from common.files.csv_io import read_csv
from common.files.manifest import HashCheck

QUANT_PLOT = "quant_errors.png"
TOP_K = 5


def quant_record(folder: Path) -> dict | None:
    """The scheme a capture's meta files record (None: a float capture)."""
    for meta in [folder / layout.META_MODEL, *sorted(folder.glob(layout.meta_file("*")))]:
        if meta.is_file():
            q = read_json(meta, layout.rerun_step2()).get("quant")
            return q if isinstance(q, dict) else None
    return None


def applies(cand_dir: Path, ref_dir: Path) -> bool:
    """The candidate is a quantized capture and the reference a float one."""
    return quant_record(cand_dir) is not None and quant_record(ref_dir) is None


def node_files(folder: Path) -> dict[tuple, Path]:
    """(layer, node) -> the folder's file of that node (step 2's ref_ twin preferred over a plain name)."""
    found: dict[tuple, Path] = {}
    for p in sorted(folder.glob("*.csv")):
        parsed = nodes.parse(p.stem)
        if parsed is not None and ((parsed[0], parsed[1]) not in found or parsed[2]):
            found[parsed[0], parsed[1]] = p
    return found


def batch_mask(ref_dir: Path, cand_dir: Path) -> np.ndarray:
    """attention_mask.csv of the reference (or of the step-2 folder its report names); the candidate's,
    when it has one, must be the same, and so must the token ids: the same prompts."""
    def find(folder: Path) -> Path | None:
        if (folder / layout.ATTENTION_MASK).is_file():
            return folder
        if (folder / layout.REPORT_JSON).is_file():
            acts = read_json(folder / layout.REPORT_JSON, "rerun that step").get("settings", {}).get("ACTS_DIR")
            if isinstance(acts, str) and (Path(acts) / layout.ATTENTION_MASK).is_file():
                return Path(acts)
        return None
    ref_batch, cand_batch = find(ref_dir), find(cand_dir)
    if ref_batch is None:
        raise InputError(f"{ref_dir / layout.ATTENTION_MASK} is missing: it says which rows are real tokens; "
                         "grade step 2 folders (run 2_get_x.py with its masks saved, the default)")
    mask = read_csv(ref_batch / layout.ATTENTION_MASK)
    if cand_batch is not None:
        for name in (layout.ATTENTION_MASK, layout.TOKENS):
            a, b = ref_batch / name, cand_batch / name
            same = (np.array_equal(read_csv(a), read_csv(b)) if name.endswith(".csv") else
                    read_json(a, "").get("input_ids") == read_json(b, "").get("input_ids")) if b.is_file() else True
            if a.is_file() and not same:
                raise InputError(f"{b} differs from {a}: the two captures are not of the same prompts; "
                                 "capture both with the same --prompt/--prompts-file")
    return mask


def node_metrics(a: np.ndarray, r: np.ndarray, real: np.ndarray) -> dict:
    x, y = a[real].astype(np.float64).ravel(), r[real].astype(np.float64).ravel()
    err, energy = float(np.sum((x - y) ** 2)), float(np.sum(y * y))
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    return {"sqnr_db": math.inf if err == 0 else (10 * math.log10(energy / err) if energy > 0 else -math.inf),
            "nmse": err / energy if energy > 0 else (0.0 if err == 0 else math.inf),
            "cosine": float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0),
            "max_abs": float(np.abs(x - y).max()) if x.size else 0.0}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logits_metrics(a: np.ndarray, r: np.ndarray, real: np.ndarray) -> dict:
    """KL(P || Q) with P the float model's distribution, top-1 agreement, top-5 overlap, over real rows."""
    la, lr = log_softmax(a[real]), log_softmax(r[real])
    kl = np.sum(np.exp(lr) * (lr - la), axis=-1)  # per row, nats
    k = min(TOP_K, a.shape[1])
    top_a, top_r = np.argsort(-a[real], axis=-1, kind="stable")[:, :k], np.argsort(-r[real], axis=-1, kind="stable")[:, :k]
    overlap = [len(set(x) & set(y)) / k for x, y in zip(top_a.tolist(), top_r.tolist())]
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "rows": int(real.sum()),
            "top1_agreement": float(np.mean(top_a[:, 0] == top_r[:, 0])), "top5_overlap": float(np.mean(overlap))}


def grade_folders(cand_dir: Path, ref_dir: Path, hashes: HashCheck | None = None) -> tuple[list[dict], dict | None]:
    """Per node both folders hold (forward order): SQNR, NMSE, cosine, max_abs; and the logits' metrics.
    With `hashes`, every file is first checked against its folder's manifest.json (step 2's)."""
    ref, cand = node_files(ref_dir), node_files(cand_dir)
    common = sorted(set(ref) & set(cand), key=lambda k: nodes.forward_key(*k))
    if not common:
        raise InputError(f"{cand_dir} and {ref_dir} share no node files (x_layerN, ref_q_layerN, ..., ref_logits): "
                         "give two step 2 folders (or two step 4 folders) of the same prompts")
    if hashes is not None:
        for folder, files in ((ref_dir, ref), (cand_dir, cand)):
            batch = [n for n in (layout.ATTENTION_MASK, layout.TOKENS) if (folder / n).is_file()]
            hashes.folder(folder, batch + [files[k].name for k in common], "step 2", layout.rerun_step2())
    mask = batch_mask(ref_dir, cand_dir)
    results, logits = [], None
    for layer, node in common:
        a, r = read_csv(cand[layer, node]), read_csv(ref[layer, node])
        if a.shape != r.shape:
            raise InputError(f"{cand[layer, node]} has shape {a.shape}, {ref[layer, node]} {r.shape}: "
                             "the captures are not of the same prompts and layers")
        real = grade.real_rows(node, r.shape[0], mask, ref[layer, node])
        results.append({"label": nodes.label(layer, node), "layer": layer, "node": node,
                        "file": cand[layer, node].name, **node_metrics(a, r, real)})
        if node == "logits":
            logits = logits_metrics(a, r, real)
    return results, logits


def logits_line(m: dict | None) -> str:
    if m is None:
        return "logits: not in both folders (capture them with step 2's --logits all or last)"
    return (f"logits ({m['rows']} real rows): top-1 agreement {m['top1_agreement']:.4f}, top-5 overlap "
            f"{m['top5_overlap']:.4f}, KL(float || quantized) {m['kl']:.3g} nats (max {m['kl_max']:.3g})")


def _columns(results: list[dict]) -> list[str]:
    present = {r["node"] for r in results}
    return [n for n in nodes.LAYER_NODES + nodes.FINAL_NODES if n in present]


def sqnr_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols, by_row = _columns(results), {}
    for r in results:
        by_row.setdefault(r["layer"], {})[r["node"]] = r
    rows = [["final" if layer is None else str(layer),
             *(f"{by_row[layer][n]['sqnr_db']:.1f}" if n in by_row[layer] else "-" for n in cols)]
            for layer in sorted(by_row, key=lambda n: math.inf if n is None else n)]
    return ["layer", *cols], rows


def console_table(results: list[dict]) -> str:
    head, rows = sqnr_table(results)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    return "\n".join(["SQNR (dB) per layer and node (inf: identical)"] +
                     ["  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head, *rows]])


def worst_line(results: list[dict]) -> str:
    finite = [r for r in results if math.isfinite(r["sqnr_db"])]
    if not finite:
        return "every node identical: the candidate is the reference"
    w = min(finite, key=lambda r: r["sqnr_db"])
    return f"lowest SQNR: {w['label']} {w['sqnr_db']:.1f} dB (cosine {w['cosine']:.6f}, max_abs {w['max_abs']:.3g})"


def write_reports(out_dir: Path, results: list[dict], logits: dict | None, scheme: dict | None, settings: dict) -> None:
    write_json(out_dir / layout.REPORT_JSON, _json_safe({
        "mode": "quantization_error", "scheme": scheme, "logits": logits, "nodes": results,
        "definition": __doc__.split("\n\n", 1)[1].strip(), "settings": settings, "plots": [QUANT_PLOT]}))
    head, rows = sqnr_table(results)
    md = ["# Step 6: what quantization did", "", f"**{logits_line(logits)}**", "", f"**{worst_line(results)}**", "",
          f"Scheme: `{(scheme or {}).get('scheme')}`", "", "## SQNR (dB) per layer and node", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## Every node, in forward order", "", "| node | SQNR dB | NMSE | cosine | max_abs |", "|---|---|---|---|---|"]
    md += [f"| {r['label']} | {r['sqnr_db']:.2f} | {r['nmse']:.3e} | {r['cosine']:.6f} | {r['max_abs']:.3e} |"
           for r in results]
    md += ["", "## Definitions", "", __doc__.split("\n\n", 1)[1].strip(), "", "## Settings", ""]
    md += [f"- `{k}`: `{v}`" for k, v in settings.items()]
    md += ["", f"![{QUANT_PLOT}]({QUANT_PLOT})"]
    write_text(out_dir / layout.REPORT_MD, "\n".join(md) + "\n")


def plot_sqnr(path: Path, results: list[dict], scheme: str) -> None:
    """SQNR against the layer, one line per node; the final nodes one step right of the last layer.
    Identical values (infinite SQNR) are left out of the line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    layers = sorted({r["layer"] for r in results if r["layer"] is not None})
    final_x = (layers[-1] + 1) if layers else 0
    fig, ax = plt.subplots(figsize=(10, 4.5))
    markers = "osD^v<>phx*+"
    for i, node in enumerate(_columns(results)):
        rs = [r for r in results if r["node"] == node]
        xs = [final_x if r["layer"] is None else r["layer"] for r in rs]
        ys = [r["sqnr_db"] if math.isfinite(r["sqnr_db"]) else np.nan for r in rs]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=node, linewidth=1, markersize=4)
    ax.set_xlabel("layer" + (f" ({final_x}: norm, logits)" if any(r["layer"] is None for r in results) else ""))
    ax.set_ylabel("SQNR (dB), higher is closer to float")
    ax.set_title(f"Quantized ({scheme}) vs float capture: error growth through the layers, real tokens only")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(ncol=7, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    _save(fig, path)
    plt.close(fig)


def run(cand_dir: Path, ref_dir: Path, out_dir: Path, settings: dict, hashes: HashCheck) -> int:
    """Grade, write report.json/md and the plot, print the SQNR table; top-1 agreement and KL last. Exit 0."""
    results, logits = grade_folders(cand_dir, ref_dir, hashes)
    print(f"input files: {hashes.line()}")
    settings = {**settings, "input hashes": hashes.line()}
    scheme = quant_record(cand_dir)
    plot_sqnr(out_dir / QUANT_PLOT, results, (scheme or {}).get("scheme", "quantized"))
    write_reports(out_dir, results, logits, scheme, {k: str(v) for k, v in settings.items()})
    print(console_table(results))
    print(worst_line(results))
    print(f"wrote {out_dir / layout.REPORT_JSON}, {layout.REPORT_MD}, {QUANT_PLOT}")
    print(logits_line(logits))
    return 0
