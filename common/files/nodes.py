"""The nodes of a Llama forward pass that the steps write, in forward order, and how their rows and
columns are laid out. Steps 3/4 write `<node>_layerN.csv` / `<node>.csv`, step 2 the `ref_` twins."""
from __future__ import annotations

import re
from pathlib import Path

from common.files import layout

# Per decoder layer, in the order the forward pass computes them (x: the layer's input).
LAYER_NODES = ("x", "xnorm", "q", "k", "v", "probs", "attn", "h", "hnorm", "act", "mlp", "out")
FINAL_NODES = ("norm", "logits")  # after the last layer
INPUTS = (Path(layout.ATTENTION_MASK).stem, Path(layout.POSITION_IDS).stem)  # what the model was fed
# Step 2 writes these captured from the model without a ref_ prefix.
UNPREFIXED_REFS = ("x", "xnorm")

ROW_MAJOR = "row-major (C): value (i, j) is word i*columns + j"
_FINAL_RE = re.compile(r"(ref_)?(" + "|".join(FINAL_NODES) + ")")


def csv_name(node: str, layer: int | None = None, ref: bool = False) -> str:
    """The CSV a step writes for a node: ("q", 3) -> q_layer3.csv, ref -> ref_q_layer3.csv, ("logits",) -> logits.csv."""
    if layer is None:
        return ("ref_" if ref else "") + node + ".csv"
    return layout.ref_file(node, layer) if ref else layout.layer_file(node, layer)


def stem(node: str, layer: int | None = None, ref: bool = False) -> str:
    """csv_name without its extension: the tensor's name."""
    return Path(csv_name(node, layer, ref)).stem


def parse(name: str) -> tuple[int | None, str, bool] | None:
    """A file stem -> (layer or None, node, is_ref); None when it names no known node."""
    if parsed := layout.parse_layer_file(name + ".csv"):
        node, layer = parsed
        ref = node.startswith("ref_")
        node = node[len("ref_"):] if ref else node
        return (layer, node, ref) if node in LAYER_NODES else None
    if m := _FINAL_RE.fullmatch(name):
        return None, m.group(2), bool(m.group(1))
    return None


def forward_key(layer: int | None, node: str) -> tuple[int, int]:
    """Sort key: layer by layer in LAYER_NODES order, then the final nodes."""
    if layer is None:
        return (1 << 30, FINAL_NODES.index(node))
    return (layer, LAYER_NODES.index(node))


def label(layer: int | None, node: str) -> str:
    return node if layer is None else f"layer {layer} {node}"


def describe_layout(node: str, meta: dict | None) -> dict:
    """Row and column order of a node's 2-D file (row-major); with meta (a meta_layerN.json) the sizes too."""
    m = meta or {}
    B, T, H, Hkv, Dh = (m.get(k) for k in ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_dim"))
    out = {"order": ROW_MAJOR, "rows": "b*T + t (batch-major, padding included)"}
    if node in ("q", "k", "v"):
        heads = "H" if node == "q" else "Hkv"
        out["columns"] = f"h*Dh + d (head-major: {heads} heads of Dh), after RoPE" if node != "v" else \
            "h*Dh + d (head-major: Hkv heads of Dh)"
    elif node == "probs":
        out["rows"] = "(b*H + h)*T + t_query"
        out["columns"] = "t_key"
    elif node == "act":
        out["columns"] = "intermediate feature"
    elif node == "logits":
        out["rows"] = "b*T + t, or b when one row per prompt (its last token)"
        out["columns"] = "vocabulary id"
    elif node in INPUTS:
        out["rows"], out["columns"] = "b", "t"
    else:
        out["columns"] = "d_model feature"
    sizes = {"B": B, "T": T, "H": H, "Hkv": Hkv, "Dh": Dh}
    out.update({k: v for k, v in sizes.items() if v is not None})
    return out
