"""Step 5 --rtl: examples/rtl's $readmemh vectors of one linear, from a quantized (w8a8) run's real integers.

From a step 3/4 folder of a w8a8 capture (its xq_P_layerN.csv, xscale_P_layerN.csv, acc_P_layerN.csv)
and step 1 --quant's folder (the linear's .q.csv and .scale.csv) it writes the seven files of
examples/rtl/README.md for the linear's first ROWS rows:

    x     = xq[:ROWS]                        int8, what the running model's linear multiplied
    w     = wq                               int8 per output channel, as torchao holds it
    acc   = x @ w.T                          int32, checked equal to the acc_ file (else the folders disagree)
    M[n], shift[n] = quantize_multiplier(wscale[n] / c)
    out   = requantize_single(acc, M, shift) int8

The output scale (the choice, documented in docs/step5_golden.md): a static int8 output scale would
make the factor xscale[t] * wscale[n] / yscale depend on the token t, but the RTL (like TFLite's
per-channel kernels) has one M and shift per output channel. So the output scale is per token and
tracks the input's, yscale[t] = xscale[t] * c, with c calibrated on the captured range:
c = max over every captured row t and channel n of |acc[t, n] * wscale[n]| / 127, i.e. the largest
|y[t, n] / xscale[t]| maps to 127. Then xscale[t] * wscale[n] / yscale[t] = wscale[n] / c, per channel.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common.check.golden_int import scheme_record
from common.cli import InputError, print_settings
from common.files import layout
from common.files.atomic import output_folder, write_json
from common.files.csv_io import read_csv, read_int_csv
from common.quant.intmm import int_matmul
from common.quant.requant import quantize_multiplier
from common.check.rtl_vectors import write_vectors

LINEARS = layout.QUANT_LINEARS
SCHEME = "w8a8"  # the one scheme the RTL computes: int8 x int8 per-channel weights, symmetric int8 activations
CASE_JSON = "case.json"  # beside the vector files: where they came from and the scale choice
# tb_int8_dot_requant.v's memories (its MAX_* parameters): T*K, N*K, N, T*N words
TB_MAX_X, TB_MAX_W, TB_MAX_N, TB_MAX_Y = 1 << 16, 1 << 20, 1 << 14, 1 << 16


def module_of(proj: str) -> str:
    return "self_attn" if proj in layout.ATTENTION_PROJ else "mlp"


def output_scale_ratio(acc: np.ndarray, wscale: np.ndarray) -> float:
    """c = max |acc[t, n] * wscale[n]| / 127 over every row (float64): yscale[t] = xscale[t] * c."""
    c = float(np.abs(acc.astype(np.float64) * wscale.reshape(1, -1).astype(np.float64)).max()) / 127
    if not c > 0:
        raise InputError("every accumulator of that linear is 0: its output range is empty, choose another linear")
    return c


def multipliers(wscale: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """M[n], shift[n] = quantize_multiplier(wscale[n] / c): int64 arrays (N,)."""
    pairs = [quantize_multiplier(float(s) / c) for s in wscale.reshape(-1)]
    return np.array([m for m, _ in pairs], np.int64), np.array([s for _, s in pairs], np.int64)


def _read(path: Path, integer: bool, what: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path} is missing ({what}): run steps 3/4 on a w8a8 capture (or step 1 --quant w8a8), "
                         "or pass --in-dir/--weights-dir")
    return read_int_csv(path) if integer else read_csv(path)


def main(args: argparse.Namespace) -> int:
    P, N, rows = args.rtl_linear, args.rtl_layer, args.rtl_rows
    default_in = layout.QKV if P in layout.ATTENTION_PROJ else layout.FORWARD
    in_dir = args.in_dir or layout.default_dir(args.model_dir, layout.quant_folder(default_in, SCHEME))
    weights_dir = args.weights_dir or layout.default_dir(args.model_dir, layout.quant_folder(layout.WEIGHTS, SCHEME))
    out_dir = args.out_dir or layout.default_dir(args.model_dir, layout.quant_folder(layout.GOLDEN_RTL, SCHEME))
    print("5_golden.py --rtl: examples/rtl vectors of one linear from a quantized run")
    print_settings({"IN_DIR": in_dir, "WEIGHTS_DIR": weights_dir, "OUT_DIR": out_dir, "RTL_LAYER": N,
                    "RTL_LINEAR": P, "RTL_ROWS": rows})
    if rows < 1:
        raise InputError(f"--rtl-rows {rows}: give 1 or more")
    if not in_dir.is_dir():
        raise InputError(f"input folder {in_dir} does not exist: run step 3/4 on a w8a8 capture, or pass --in-dir")
    output_folder(out_dir, inputs=[in_dir, weights_dir], create=False)
    t0 = time.perf_counter()
    scheme = scheme_record(in_dir, {})
    if scheme is None or scheme.get("scheme") != SCHEME:
        name = "no scheme recorded" if scheme is None else f"scheme {scheme.get('scheme')!r}"
        raise InputError(f"{in_dir}: {name}; --rtl needs a {SCHEME} run (int8 x int8 -> int32, the RTL's arithmetic): "
                         f"capture with --quant {SCHEME} and run step 3/4 on it")
    xq = _read(in_dir / layout.xq(P, N), True, "the int8 activations")
    xscale = _read(in_dir / layout.xscale(P, N), False, "their per-token scales")
    acc = _read(in_dir / layout.acc(P, N), True, "the int32 accumulators")
    base = layout.weight_name(N, module_of(P), P, "weight")
    wq = _read(weights_dir / f"{base}.q.csv", True, "the int8 weights")
    wscale = _read(weights_dir / f"{base}.scale.csv", False, "the weight scales")
    (R, K), Nout = xq.shape, wq.shape[0]
    if wq.shape[1] != K or acc.shape != (R, Nout) or xscale.shape != (R, 1) or wscale.shape != (Nout, 1):
        raise InputError(f"{in_dir} and {weights_dir} disagree on {P} of layer {N}: xq {xq.shape}, acc {acc.shape}, "
                         f"xscale {xscale.shape}, weights {wq.shape}, scales {wscale.shape}: use folders of one run")
    if min(xq.min(), wq.min()) < -128 or max(xq.max(), wq.max()) > 127:
        raise InputError(f"{in_dir / layout.xq(P, N)} or {base}.q.csv holds values outside int8: rerun those steps")
    T = min(rows, R)
    if T * K > TB_MAX_X or Nout * K > TB_MAX_W or Nout > TB_MAX_N or T * Nout > TB_MAX_Y:
        raise InputError(f"--rtl-rows {rows}: T={T} K={K} N={Nout} exceeds the testbench's memories "
                         f"(T*K, T*N <= {TB_MAX_X}, N*K <= {TB_MAX_W}): choose fewer rows")
    exact = int_matmul(xq.astype(np.int8), wq.astype(np.int8))  # int8 x int8 -> int32, exact
    if not np.array_equal(exact, acc):
        bad = tuple(int(i) for i in np.argwhere(exact != acc)[0])
        raise InputError(f"{in_dir / layout.acc(P, N)} differs from xq @ wq.T at {bad} ({acc[bad]} vs {exact[bad]}): "
                         f"{weights_dir} is not the weights of that run")
    c = output_scale_ratio(acc, wscale)
    M, shift = multipliers(wscale, c)
    golden = write_vectors(out_dir, xq[:T], wq, M, shift)
    write_json(out_dir / CASE_JSON, {
        "scheme": scheme, "layer": N, "linear": P, "rows": T, "of_rows": R, "K": K, "N": Nout,
        "sources": {"x": str(in_dir / layout.xq(P, N)), "acc": str(in_dir / layout.acc(P, N)),
                    "w": str(weights_dir / f"{base}.q.csv"), "wscale": str(weights_dir / f"{base}.scale.csv")},
        "requantization": "single: out = sat8((acc * M + 2^(s-1)) >> s), s = 31 + shift",
        "output_scale": "per token, yscale[t] = xscale[t] * c; M, shift = quantize_multiplier(wscale[n] / c)",
        "c": c, "c_definition": "max over every captured row t, channel n of |acc[t, n] * wscale[n]| / 127",
        "saturated_outputs": int(np.count_nonzero(np.abs(golden["out"]) >= 127))})
    print(f"wrote T={T} K={K} N={Nout} ({P} of layer {N}, rows 0..{T - 1} of {R}) to {out_dir} in "
          f"{time.perf_counter() - t0:.2f} s: acc equals the {layout.acc(P, N)} of the run; c = {c:.6g}, "
          f"M in [{M.min()}, {M.max()}], shift in [{shift.min()}, {shift.max()}]")
    print(f"simulate: python examples/rtl/run_rtl.py --vectors {out_dir}")
    return 0
