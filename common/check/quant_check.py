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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.check.decode import Compute, Write
from common.check.verify import compare
from common.files import layout, quant_weights
from common.files.csv_io import read_csv
from common.quant import quantize
from common.quant.linear import QuantWeight
from common.quant.schemes import Scheme

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


LINEAR = "linear"  # the report's quantity: v_proj and down_proj from their captured inputs vs the model's outputs
LINEAR_RTOL = 1e-5  # the float-path schemes (w4a8's float32 epilogue, weight-only): torchao's own float32 sums


def check_linears(acts_folder: Path, n: int, w, real_rows: np.ndarray) -> dict[str, dict]:
    """{"linear": metrics}: v_proj on the captured xnorm vs ref_v, down_proj on the captured ref_act vs
    ref_mlp (step 4), each computed by a fresh QuantWeight (the tapes stay the node chain's). w8a8 is
    an integer matmul with torchao's exact epilogue: bit for bit (atol = rtol = 0); the other schemes
    end in torchao's float32 sums: LINEAR_RTOL. {} for float weights."""
    attn = getattr(w, "attn", w)
    pairs = [(attn.wv, attn.bv, layout.layer_file("xnorm", n), layout.ref_file("v", n))]
    if hasattr(w, "mlp"):
        pairs.append((w.mlp.down, w.mlp.b_down, layout.ref_file("act", n), layout.ref_file("mlp", n)))
    ours, refs, exact = [], [], True
    for qw, b, x_name, y_name in pairs:
        x_file, y_file = acts_folder / x_name, acts_folder / y_name
        if not isinstance(qw, QuantWeight) or not (x_file.is_file() and y_file.is_file()):
            continue
        y = QuantWeight(qw.q, qw.scale, qw.scheme).apply(read_csv(x_file, (real_rows.size, qw.shape[1])), b)
        ours.append(y)
        refs.append(read_csv(y_file, y.shape))
        exact = exact and qw.scheme.name == "w8a8"
    if not ours:
        return {}
    return {LINEAR: compare(np.hstack(ours), np.hstack(refs), real_rows, 0.0, 0.0 if exact else LINEAR_RTOL)}


def check_layer(acts_folder: Path, n: int, w, real_rows: np.ndarray) -> dict[str, dict]:
    """The quantized path's own checks of one layer (xscale, linear); {} for float weights."""
    qw = linears(w)
    return {**check_scales(acts_folder, n, qw, real_rows), **check_linears(acts_folder, n, w, real_rows)} if qw else {}


def quantities(base: tuple[str, ...], scheme) -> tuple[str, ...]:
    """The report's quantities: `base`, with xscale when the scheme quantizes activations, and linear."""
    if scheme is None:
        return base
    return base + ((XSCALE,) if scheme.act else ()) + (LINEAR,)


def writing_tapes(write: Write, qw: dict[str, QuantWeight]) -> Write:
    """write, then the linears' integer tensors beside the nodes."""
    def write_both(folder: Path, n: int, rows: dict) -> list:
        return write(folder, n, rows) + quant_weights.write_tapes(folder, n, qw)
    return write_both


def checking(compute: Compute, w, n: int, into: dict) -> Compute:
    """compute, then each decode step's check_layer against its step-2 folder: into[(step, n)]."""
    def compute_and_check(x, st, cache):
        nodes = compute(x, st, cache)
        into[(st.step, n)] = check_layer(st.folder, n, w, np.ones(x.shape[0], bool))
        return nodes
    return compute_and_check


def within_margin(ours: np.ndarray, ref: np.ndarray, err: float) -> np.ndarray:
    """(N, V) logits -> (N,) bool: the model's logit of our top-1 token is within 2 * err (the measured
    max_abs of the logits) of its own top-1's: a near-tie that an LSB upstream may tip either way."""
    rows = np.arange(len(ref))
    return ref[rows, ref.argmax(1)] - ref[rows, ours.argmax(1)] <= 2 * err


@dataclass(frozen=True)
class QuantRun:
    """A run's scheme (None: a float capture), as steps 3 and 4 thread it: how weights are read, the
    report's quantities, the quantized head (--quant-head: () -> its QuantWeight)."""
    scheme: Scheme | None = None
    quant_head: bool = False
    head_weight: Callable | None = None

    def read(self, path: Path, shape: tuple[int, ...]):
        return quant_weights.read_weight(path, shape, self.scheme, self.quant_head)

    def quantities(self, base: tuple[str, ...]) -> tuple[str, ...]:
        return quantities(base, self.scheme)


FLOAT = QuantRun()
