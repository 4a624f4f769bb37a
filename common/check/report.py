"""Steps 3 and 4's verification report: the console table, report.json, report.md and the PNG plots;
for step 4 also the chain's error growth, the logits check and the top next tokens, model vs offline.

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
from common.llama import forward

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


# --- step 4: the chain, the head and the top tokens ---------------------------------------------

# Written into report.md and report.json, so the numbers there say what they mean.
FORWARD_DEFINITION = """Over the real (non-padding) token rows only, for one layer and one node (xnorm, q, k, v,
probs, attn, h, hnorm, act, mlp, out; probs rows are the real query rows of every head):

    max_abs = max |a - r|                 (elementwise, a = recomputed, r = the model's file)
    scale   = max |r|
    max_rel = max_abs / scale             (relative to the largest reference value)
    PASS   <=> max_abs <= ATOL + RTOL * scale

The reference of xnorm is step 2's xnorm_layerN.csv, of every other node its ref_ file. In layer
mode each layer starts from its captured input x_layerN.csv, and the final norm and the logits from
the captured output of the last layer, so an error shows where it is made. fp32 recomputation lands
near 1e-7..1e-6; real mistakes (gate and up swapped, another activation, a (1 + w) norm, a missing
residual, the wrong head) near 1e-2..1. NaN or inf anywhere in the compared rows is a FAIL.
"""


def token_text(vocab: list[str] | None, i: int) -> str:
    """A token as a quoted string ("#id" when there is no vocab.json), control characters escaped."""
    if vocab is None:
        return f"#{i}"
    return '"' + "".join(c if c.isprintable() else repr(c)[1:-1] for c in vocab[i]) + '"'


def top_tokens(model_logits: np.ndarray, our_logits: np.ndarray, vocab: list[str] | None, prompts: list[str],
               k: int) -> list[dict]:
    """Per prompt, the top-k next tokens at its last real position: (B, V) logits each -> JSON-able dicts."""
    out = []
    for b, (ref, ours) in enumerate(zip(model_logits, our_logits)):
        ids = {"model": forward.top_k(ref[None], k)[0], "offline": forward.top_k(ours[None], k)[0]}
        logits = {"model": ref, "offline": ours}
        out.append({"prompt": prompts[b] if b < len(prompts) else "",
                    **{who: [{"id": int(i), "text": token_text(vocab, int(i)), "logit": float(logits[who][i])}
                             for i in ids[who]] for who in ids},
                    "top1_same": bool(ids["model"][0] == ids["offline"][0]),
                    "topk_same_set": set(ids["model"].tolist()) == set(ids["offline"].tolist())})
    return out


def _top_rows(entry: dict) -> list[list[str]]:
    rows = [["rank", "model", "logit", "offline", "logit", "same"]]
    for r, (m, o) in enumerate(zip(entry["model"], entry["offline"]), 1):
        rows.append([str(r), m["text"], f"{m['logit']:.4f}", o["text"], f"{o['logit']:.4f}",
                     "yes" if m["id"] == o["id"] else "NO"])
    return rows


def top_tokens_text(tops: list[dict]) -> str:
    parts = []
    for b, entry in enumerate(tops):
        parts.append(f"prompt {b} {entry['prompt']!r}: next token, model vs offline")
        parts.append(text_table(_top_rows(entry)))
    return "\n".join(parts)


def top_tokens_markdown(tops: list[dict]) -> list[str]:
    lines = ["", "## Top next tokens, model vs offline (each prompt's last real position)", ""]
    for b, entry in enumerate(tops):
        lines += [f"Prompt {b}: `{entry['prompt']}`", ""] + markdown_table(_top_rows(entry)) + [""]
    return lines


def chain_rows(growth: dict[int, dict]) -> list[list[str]]:
    """The chain's error per layer: its output against ref_out_layerN."""
    rows = [["layer", "out max_rel", "out max_abs", "max|ref|"]]
    for n in sorted(growth):
        m = growth[n]
        rows.append([str(n), f"{m['max_rel']:.2e}", f"{m['max_abs']:.2e}", f"{m['max_ref']:.3g}"])
    return rows


def chain_verdict(logits: dict, top1: dict, top5: dict, chain_rtol: float) -> tuple[bool, str]:
    """PASS when the top-1 token agrees at every checked position and the logits' max_rel <= CHAIN_RTOL."""
    ok = top1["agree"] == top1["total"] and math.isfinite(logits["max_rel"]) and logits["max_rel"] <= chain_rtol
    line = (f"{'PASS' if ok else 'FAIL'}: chain through every layer, the final norm and the head: logits max_rel "
            f"{logits['max_rel']:.2e} (CHAIN_RTOL {chain_rtol:g}); top-1 agrees at {top1['agree']} of "
            f"{top1['total']} real positions; top-5 set agrees at {top5['agree']} of {top5['total']} prompts")
    return ok, line


def head_line(head: dict[str, dict]) -> str:
    cells = [f"{name} max_rel {m['max_rel']:.2e}{'' if m['pass'] else ' FAIL'}" for name, m in head.items()]
    ok = all(m["pass"] for m in head.values())
    return f"{'PASS' if ok else 'FAIL'}: final norm and head from the captured last layer output: " + ", ".join(cells)


def plot_chain(path: Path, growth: dict[int, dict], logits: dict | None, chain_rtol: float) -> None:
    """How the chain's error grows through the layers (log scale), the logits' error at the end."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    layers = sorted(growth)
    rel = [max(growth[n]["max_rel"], 1e-12) for n in layers]  # log scale: exact zeros at the floor
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, rel, marker="o", markersize=3, linewidth=1, label="layer output vs ref_out")
    if logits is not None:
        ax.plot([len(layers)], [max(logits["max_rel"], 1e-12)], marker="*", markersize=10, linestyle="",
                color="C3", label="logits")
    ax.axhline(chain_rtol, color="red", linestyle="--", linewidth=1, label=f"CHAIN_RTOL {chain_rtol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (the logits after the last)")
    ax.set_ylabel("max |a - ref| / max |ref|")
    ax.set_title("Chain mode: the whole forward pass offline from x_layer0, real tokens only")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_top_tokens(path: Path, tops: list[dict]) -> None:
    """One table per prompt: rank, the model's token and logit, ours, whether they agree."""
    plt = _pyplot()
    k = len(tops[0]["model"])
    fig, axes = plt.subplots(len(tops), 1, figsize=(9, (0.35 * (k + 2) + 0.4) * len(tops)), squeeze=False)
    for ax, (b, entry) in zip(axes[:, 0], enumerate(tops)):
        rows = _top_rows(entry)
        cells = [[c.replace("$", r"\$") for c in r] for r in rows[1:]]
        table = ax.table(cellText=cells, colLabels=rows[0], loc="center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        ax.set_title(f"prompt {b}: {entry['prompt'][:80]!r}", fontsize=9, loc="left")
        ax.axis("off")
    _save(fig, path)
    plt.close(fig)


def decode_passed(checks: dict) -> bool:
    """One decode step's checks (decode.head_steps or decode.chain_steps): every one PASS (None: not checked)."""
    return all(m is None or m["pass"] for m in checks.values())


def decode_rows(decode: dict[int, dict], vocab: list[str] | None) -> list[list[str]]:
    """One row per decode step: the token fed (chain mode: ours vs the model's), the logits' max_rel, the
    greedy next tokens offline and the model's, PASS/FAIL."""
    rows = [["decode step", "fed", "logits max_rel", "greedy next (offline)", "greedy next (model)", "result"]]
    for step, c in sorted(decode.items()):
        fed = c.get("fed")
        logits, greedy = c.get("logits"), c.get("greedy")
        fed_cell = "-" if fed is None else ("same" if fed["pass"] else f"{fed['offline']} != {fed['model']}")
        rows.append([str(step), fed_cell,
                     "-" if logits is None else f"{logits['max_rel']:.2e}" + ("" if logits["pass"] else " FAIL"),
                     "-" if greedy is None else " ".join(token_text(vocab, i) for i in greedy["offline"]),
                     "-" if greedy is None else " ".join(token_text(vocab, i) for i in greedy["model"]),
                     "PASS" if decode_passed(c) else "FAIL"])
    return rows


def write_chain_report(out_dir: Path, passed: bool, verdict: str, growth: dict[int, dict], logits: dict,
                       top1: dict, top5: dict, tops: list[dict], settings: dict, plots: list[str],
                       decode: dict[int, dict] | None = None, vocab: list[str] | None = None) -> None:
    """report.json and report.md of chain mode (with the decode steps, when step 2 captured them)."""
    write_json(out_dir / layout.REPORT_JSON, _json_safe({
        "pass": passed, "mode": "chain", "verdict": verdict,
        "logits": logits, "top1": top1, "top5_set": top5,
        "layers": {str(n): {"out": m} for n, m in sorted(growth.items())},
        **({"decode": {f"step_{s}": c for s, c in sorted(decode.items())}} if decode else {}),
        "top_tokens": tops, "settings": settings, "plots": plots,
    }))
    lines = ["# Step 4: the whole forward pass offline (chain mode)", "", f"**{verdict}**", "",
             "From x_layer0.csv only, every layer is fed the previous one's recomputed output, then the final "
             "norm and the head. PASS when the top-1 token agrees at every real position (each prompt's last "
             "one when step 2 kept only those logits) and the logits' max_rel <= CHAIN_RTOL, with "
             "max_rel = max |a - r| / max |r| over the real rows.", "",
             "## The error of each layer's output as it grows", ""]
    lines += markdown_table(chain_rows(growth)) + top_tokens_markdown(tops)
    if decode:
        lines += ["## Decode steps, generated offline", "",
                  "Each step feeds our own greedy token (its embedding row), runs every layer over a KV cache of "
                  "our own K and V, the final norm and the head; PASS when the token fed is the model's, the "
                  "logits' max_rel <= CHAIN_RTOL and the greedy next token is the model's.", ""]
        lines += markdown_table(decode_rows(decode, vocab)) + [""]
    lines += ["## Settings", ""] + [f"- `{k}`: `{v}`" for k, v in settings.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    write_text(out_dir / layout.REPORT_MD, "\n".join(lines) + "\n")
