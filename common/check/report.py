"""Steps 3 and 4's verification report: the console table, report.json, report.md and the PNG plots.

`results` everywhere is {layer: {quantity: common.check.verify.compare(...) dict}}; `quantities` the
columns, in forward order (step 3's QUANTITIES unless told otherwise). A decode step's layer is the
key (step, layer): its row in the tables follows the prefill's, labelled "step S: N" (report.json
keeps them apart, under "decode"), and the plots show the prefill's layers only.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.check.verify import QUANTITIES
from common.files import layout
from common.files.atomic import atomic_file, write_json, write_text

PLOT_LABELLED_TOKENS = 160  # the attention plot labels every token up to this prompt length
PLOT_MAX_CELLS = 512  # a longer prompt's attention is drawn max-pooled to this many cells a side


def max_pool(probs: np.ndarray, cells: int) -> tuple[np.ndarray, int]:
    """(n, n) -> (m, m) with m <= cells, each cell the max of an f x f tile (a lone strong link
    stays visible); returns the pooled array and f."""
    n = probs.shape[0]
    f = -(-n // cells)
    m = -(-n // f)
    padded = np.zeros((m * f, m * f), probs.dtype)
    padded[:n, :n] = probs
    return padded.reshape(m, f, m, f).max(axis=(1, 3)), f


def worst(results: dict[int, dict[str, dict]]) -> tuple[int, str, dict]:
    """(layer, quantity, metrics) with the largest max_rel (NaN counts as the worst)."""
    def key(item):
        rel = item[2]["max_rel"]
        return math.inf if math.isnan(rel) else rel
    return max(((layer, qn, m) for layer, per in results.items() for qn, m in per.items()), key=key)


def all_pass(results: dict[int, dict[str, dict]]) -> bool:
    return all(m["pass"] for per in results.values() for m in per.values())


def row_key(key) -> tuple[int, int]:
    """Table order: the prefill's layers (step 0), then each decode step's."""
    return key if isinstance(key, tuple) else (0, key)


def row_label(key) -> str:
    """3 -> "3"; (2, 3) -> "step 2: 3" (decode step 2, layer 3)."""
    return f"step {key[0]}: {key[1]}" if isinstance(key, tuple) else str(key)


def prefill_only(results: dict) -> dict[int, dict[str, dict]]:
    return {k: v for k, v in results.items() if not isinstance(k, tuple)}


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{m['max_rel']:.1e}" + ("" if m["pass"] else " FAIL")


def table_rows(results: dict[int, dict[str, dict]], quantities: tuple[str, ...] = QUANTITIES) -> list[list[str]]:
    """One row per layer: layer, max_rel of each quantity, the layer's max_abs, PASS/FAIL."""
    rows = []
    for layer in sorted(results, key=row_key):
        per = results[layer]
        max_abs = max((m["max_abs"] for m in per.values()), key=lambda e: math.inf if math.isnan(e) else e)
        rows.append([row_label(layer), *(_cell(per.get(qn)) for qn in quantities), f"{max_abs:.1e}",
                     "PASS" if all(m["pass"] for m in per.values()) else "FAIL"])
    return rows


def header(quantities: tuple[str, ...] = QUANTITIES) -> list[str]:
    """Step 3's few columns say "max_rel" in each; step 4's many say it once, in the title above."""
    names = [f"{qn} max_rel" for qn in quantities] if len(quantities) <= len(QUANTITIES) else list(quantities)
    return ["layer", *names, "max_abs", "result"]


HEADER = header()


def summary_line(results: dict[int, dict[str, dict]], atol: float, rtol: float,
                 quantities: tuple[str, ...] = QUANTITIES) -> str:
    layer, qn, m = worst(results)
    n_fail = sum(not m["pass"] for per in results.values() for m in per.values())
    n = sum(len(per) for per in results.values())
    verdict = "PASS" if n_fail == 0 else f"FAIL ({n_fail} of {n} checks)"
    decode = len(results) - len(prefill_only(results))
    rows = f"{len(results) - decode} layers" + (f" + {decode} decode-step layers" if decode else "")
    return (f"{verdict}: {rows} x {len(quantities)} quantities; worst max_rel {m['max_rel']:.2e} "
            f"(layer {row_label(layer)} {qn}, max_abs {m['max_abs']:.2e}); "
            f"PASS when max_abs <= ATOL {atol:g} + RTOL {rtol:g} * max|ref|")


def text_table(rows: list[list[str]]) -> str:
    """Rows of cells (the first one the header) as right-aligned columns under a rule."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells (the first one the header) as markdown table lines."""
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def console_table(results: dict[int, dict[str, dict]], atol: float, rtol: float,
                  quantities: tuple[str, ...] = QUANTITIES) -> str:
    table = text_table([header(quantities), *table_rows(results, quantities)])
    return table + "\n" + summary_line(results, atol, rtol, quantities)


def markdown(results: dict[int, dict[str, dict]], settings: dict, definition: str, plots: list[str],
             atol: float, rtol: float, quantities: tuple[str, ...] = QUANTITIES,
             title: str = "Step 3: offline recomputation vs the model", extra: list[str] = ()) -> str:
    """report.md; `extra` is markdown placed after the per-layer table."""
    lines = [f"# {title}", "",
             f"**{summary_line(results, atol, rtol, quantities)}**", "", "## Error definition", "",
             definition.strip(), "", "## Per layer (max_rel per quantity)", ""]
    lines += markdown_table([header(quantities), *table_rows(results, quantities)])
    lines += list(extra)
    lines += ["", "## Settings", ""] + [f"- `{k}`: `{v}`" for k, v in settings.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _json_safe(x):
    """NaN/inf are not JSON: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_reports(out_dir: Path, results: dict[int, dict[str, dict]], settings: dict, definition: str,
                  plots: list[str], atol: float, rtol: float, quantities: tuple[str, ...] = QUANTITIES,
                  title: str | None = None, extra_json: dict | None = None, extra_md: list[str] = (),
                  passed: bool | None = None) -> None:
    """report.json and report.md; `passed` overrides all_pass(results) (step 4's chain mode decides otherwise)."""
    layer, qn, m = worst(results)
    write_json(out_dir / layout.REPORT_JSON, _json_safe({
        "pass": all_pass(results) if passed is None else passed,
        **(extra_json or {}),
        "atol": atol, "rtol": rtol,
        "definition": definition.strip(),
        "worst": {"layer": layer if isinstance(layer, int) else row_label(layer), "quantity": qn, **m},
        "layers": {str(k): v for k, v in sorted(prefill_only(results).items())},
        **({"decode": decode_json(results)} if len(prefill_only(results)) < len(results) else {}),
        "settings": settings,
        "plots": plots,
    }))
    write_text(out_dir / layout.REPORT_MD, markdown(results, settings, definition, plots, atol, rtol, quantities,
                                                    **({"title": title} if title else {}), extra=extra_md))


def decode_json(results: dict) -> dict[str, dict[str, dict]]:
    """report.json's "decode": {"step_S": {"N": metrics}} for the (step, layer) keys of results."""
    out: dict[str, dict[str, dict]] = {}
    for (step, n), per in sorted((k, v) for k, v in results.items() if isinstance(k, tuple)):
        out.setdefault(f"step_{step}", {})[str(n)] = per
    return out


def token_labels(tokens: dict, prompt: int, real: np.ndarray) -> list[str]:
    """The token strings of one prompt's real positions."""
    return [str(tokens["tokens"][prompt][i]) for i in real]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_errors(path: Path, results: dict[int, dict[str, dict]], rtol: float,
                quantities: tuple[str, ...] = QUANTITIES, title: str = "Offline recomputation vs the model") -> None:
    """max_rel per layer, one line per quantity, log scale, with the RTOL line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    results = prefill_only(results)
    layers = sorted(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    for qn, marker in zip(quantities, "os^Dv<>phX*P"):
        rel = [results[layer][qn]["max_rel"] if qn in results[layer] else np.nan for layer in layers]
        rel = [max(r, 1e-12) if math.isfinite(r) else np.nan for r in rel]  # log scale: exact zeros at the floor
        ax.plot(layers, rel, marker=marker, label=qn, linewidth=1, markersize=4)
    ax.axhline(rtol, color="red", linestyle="--", linewidth=1, label=f"RTOL {rtol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |a - ref| / max |ref|")
    ax.set_title(f"{title}, real tokens only")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(ncol=6, fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def _label(token: str) -> str:
    """A token string as a readable axis label: byte-level BPE marks shown plainly, no mathtext."""
    return token.replace("Ġ", "␣").replace("Ċ", "\\n").replace("\n", "\\n").replace("$", r"\$")


def plot_attention(path: Path, probs: np.ndarray, tokens: list[str], layer: int, head: int, prompt: int) -> None:
    """One head's attention pattern over one prompt's real tokens: probs (T, T), query rows x key columns."""
    plt = _pyplot()
    n = len(tokens)
    labels = [_label(t) for t in tokens]
    size = min(4 + 0.22 * n, 40) if n <= PLOT_LABELLED_TOKENS else 12
    fig, ax = plt.subplots(figsize=(size, size))
    pooled, f = max_pool(probs, PLOT_MAX_CELLS) if n > PLOT_MAX_CELLS else (probs, 1)
    # Drawn from at most PLOT_MAX_CELLS^2 cells: a 4096-token prompt's 16M would take GBs to render.
    im = ax.imshow(pooled, cmap="viridis", vmin=0, vmax=max(float(probs.max()), 1e-12),
                   extent=(-0.5, pooled.shape[1] * f - 0.5, pooled.shape[0] * f - 0.5, -0.5))
    if n <= PLOT_LABELLED_TOKENS:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
    # else: thousands of labels would take minutes to draw and be unreadable; the axes show indices
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    pooling = f", max over {f}x{f} tiles" if f > 1 else ""
    ax.set_title(f"Attention, layer {layer} head {head}, prompt {prompt} (recomputed offline{pooling})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path)
    plt.close(fig)
