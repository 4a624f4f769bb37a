"""Step 4's report pieces beyond step 3's per-layer table (common/check/report.py): the chain's error
growth, the logits check and the top next tokens, model vs offline, as text, markdown and PNG.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.check.report import _json_safe, _pyplot, _save, markdown_table, text_table
from common.files import layout
from common.files.atomic import write_json, write_text
from common.llama import forward

# Written into report.md and report.json, so the numbers there say what they mean.
DEFINITION = """Over the real (non-padding) token rows only, for one layer and one node (xnorm, q, k, v,
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
