"""Steps 3 and 4 on a quantized capture: the integer tensors written, the activation scales checked.

Every quantized linear of a layer (a common.quant.linear.QuantWeight in the layer's weights) keeps
the integer tensors of its last call; after each layer (and each decode step of it) they are written
as xq/xscale/xzero/acc_P_layerN.csv (common/files/layout.py). The quantity "xscale" of the report
proves the activation quantization bit for bit: the scales computed here from each linear's captured
input equal the ones torchao's running linears used (step 2's ref_xscale_P_layerN.csv). The nodes
themselves are checked as in a float capture, at QUANT_RTOL (docs/quantized.md: an activation one
LSB off after an ulp upstream moves a node by up to ~5e-3 of its range).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.check.decode import Compute, Write
from common.check.verify import compare
from common.files import layout, quant_weights
from common.files.csv_io import read_csv
from common.quant import quantize
from common.quant.linear import QuantWeight

XSCALE = "xscale"  # the report's quantity: our per-token scales vs the running model's


def linears(w) -> dict[str, QuantWeight]:
    """proj -> QuantWeight of a layer's AttentionWeights or LayerWeights (empty for float weights)."""
    attn = getattr(w, "attn", w)
    found = {"q_proj": attn.wq, "k_proj": attn.wk, "v_proj": attn.wv, "o_proj": attn.wo}
    if hasattr(w, "mlp"):
        found |= {"gate_proj": w.mlp.gate, "up_proj": w.mlp.up, "down_proj": w.mlp.down}
    return {p: m for p, m in found.items() if isinstance(m, QuantWeight)}


# The captured input of each quantized linear (o_proj's, the attention context, is not captured).
CAPTURED_INPUT = {"q_proj": ("xnorm",), "k_proj": ("xnorm",), "v_proj": ("xnorm",), "gate_proj": ("ref", "hnorm"),
                  "up_proj": ("ref", "hnorm"), "down_proj": ("ref", "act")}


def captured_input(acts_folder: Path, proj: str, n: int) -> Path:
    kind = CAPTURED_INPUT[proj]
    return acts_folder / (layout.layer_file(kind[0], n) if len(kind) == 1 else layout.ref_file(kind[1], n))


def activation_scale(x: np.ndarray, w: QuantWeight) -> np.ndarray:
    """float32 (M, K) -> float32 (M, 1): the per-token scale the scheme gives x (common/quant/quantize.py)."""
    if w.scheme.act == "sym":
        return quantize.quantize_activation_per_token(x)[1]
    return quantize.quantize_activation_per_token_asymmetric(x)[1].reshape(-1, 1)


def check_scales(acts_folder: Path, n: int, qw: dict[str, QuantWeight], real_rows: np.ndarray) -> dict[str, dict]:
    """{"xscale": metrics}: the per-token scales of every quantized linear whose input step 2 captured,
    computed here from that input, vs the scales torchao's running linears used (ref_xscale_P_layerN.csv):
    bit for bit (atol = rtol = 0). {} when the scheme has float activations or step 2 wrote no scales."""
    ours, refs = [], []
    for p, w in qw.items():
        ref, x_file = acts_folder / layout.ref_xscale(p, n), p in CAPTURED_INPUT and captured_input(acts_folder, p, n)
        if not w.scheme.act or not x_file or not (ref.is_file() and x_file.is_file()):
            continue
        x = read_csv(x_file, (real_rows.size, w.shape[1]))
        ours.append(activation_scale(x, w))
        refs.append(read_csv(ref, ours[-1].shape))
    if not ours:
        return {}
    return {XSCALE: compare(np.hstack(ours), np.hstack(refs), real_rows, 0.0, 0.0)}


def quantities(base: tuple[str, ...], qw: dict[str, QuantWeight]) -> tuple[str, ...]:
    """The report's quantities: `base`, and xscale when the layer's linears quantize their input."""
    return base + (XSCALE,) if any(w.scheme.act for w in qw.values()) else base


def writing_tapes(write: Write, qw: dict[str, QuantWeight]) -> Write:
    """write, then the linears' integer tensors beside the nodes."""
    def write_both(folder: Path, n: int, rows: dict) -> list:
        return write(folder, n, rows) + quant_weights.write_tapes(folder, n, qw)
    return write_both


def checking_scales(compute: Compute, qw: dict[str, QuantWeight], n: int, into: dict) -> Compute:
    """compute, then each decode step's scales checked against its step-2 folder: into[(step, n)]."""
    def compute_and_check(x, st, cache):
        nodes = compute(x, st, cache)
        into[(st.step, n)] = check_scales(st.folder, n, qw, np.ones(x.shape[0], bool))
        return nodes
    return compute_and_check
