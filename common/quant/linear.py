"""A quantized linear as torchao 0.18's running model computes it on CPU, for the offline math.

QuantWeight stands where the float weight array stood: common.llama.attention.linear(x, w, b)
calls w.apply(x, b) when w has one, so the equations of common/llama stay as they are. Per scheme
(docs/quantized.md):

    w8a8      xq, xscale = int8 symmetric per token (x)                 int8 (M, K), float32 (M, 1)
              acc = xq @ wq^T                                           int8 x int8 -> int32, exact
              y = ((float32(acc) * xscale) * wscale) + b                float32, torchao's order
    w4a8-g*   xq, xscale, xzero = int8 asymmetric per token (x)        int8 (M, K), float32 (M,), int8 (M,)
              acc_g = (xq - xzero)[:, g] @ wq[:, g]^T, per group g     int16 x int8 -> int32, exact
              y = xscale * sum_g wscale[:, g] * acc_g + b               float64, rounded once to float32
    w8a16, w4a16-g*   y = x @ dequantized(wq)^T + b                     float activations: no tape

The tape keeps the integer tensors of the last call (xq, xscale, xzero, acc), which the steps
write as the files a hardware designer checks against (common/files/layout.py: xq, xscale, ...).
"""
from __future__ import annotations

import numpy as np

from common.quant import intmm, quantize
from common.quant.schemes import Scheme


class QuantWeight:
    """One linear's int8 weight (N, K) (int4 values in int8) and its float32 scales (N, G)."""

    def __init__(self, q: np.ndarray, scale: np.ndarray, scheme: Scheme):
        if q.dtype != np.int8 or scale.dtype != np.float32 or q.ndim != 2 or scale.shape[0] != q.shape[0] \
                or q.shape[1] % scale.shape[1]:
            raise ValueError(f"QuantWeight: int8 (N, K) and float32 (N, G) with G dividing K, got "
                             f"{q.dtype} {q.shape} and {scale.dtype} {scale.shape}")
        self.q, self.scale, self.scheme = q, scale, scheme
        self.tape: dict[str, np.ndarray] = {}  # the last call's integer tensors (activation-quantized schemes)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def apply(self, x: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """float32 x (M, K) -> float32 y (M, N), as the running quantized model computes it."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        act = self.scheme.act
        if act is None:
            self.tape = {}
            return intmm.linear_weight_only_float32(x, self.q, self.scale, b)
        if act == "sym":  # torchao's Int8Tensor: a true int32 matmul
            xq, xscale = quantize.quantize_activation_per_token(x)  # int8 (M, K), float32 (M, 1)
            acc = intmm.int_matmul(xq, self.q)  # int8 x int8 -> int32 (M, N), exact
            self.tape = {"xq": xq, "xscale": xscale, "acc": acc}
            return intmm.rescale_int8_float32(acc, xscale, self.scale, b)
        xq, xscale, xzero = quantize.quantize_activation_per_token_asymmetric(x)  # (M, K), (M,), (M,)
        acc = intmm.int_matmul_groups(xq, self.q, self.group_size, xzero)  # int32 (G, M, N), exact
        G, M, N = acc.shape
        self.tape = {"xq": xq, "xscale": xscale.reshape(M, 1), "xzero": xzero.reshape(M, 1),
                     "acc": acc.transpose(1, 2, 0).reshape(M, N * G)}  # (G, M, N) -> (M, N, G): column o*G + g
        return intmm.rescale_groups_float32(acc, xscale, self.scale, b)
