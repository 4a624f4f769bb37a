"""RMSNorm as Llama computes it, in float32 numpy.

    rms_norm(x) = x * rsqrt(mean(x^2 over the last axis) + eps) * w

The weight multiplies as it is: Llama's `w`, not Gemma's `(1 + w)`. The variance is taken in
float32 over the model dimension (LlamaRMSNorm upcasts to float32 first, whatever the compute dtype).
"""
from __future__ import annotations

import numpy as np

# The RMSNorm modules whose formula is rms_norm's (step 2 records the class the model ran).
SUPPORTED_NORMS = ("LlamaRMSNorm",)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (..., d), weight (d,) -> (..., d), float32."""
    x = x.astype(np.float32, copy=False)
    variance = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)  # (..., 1)
    return weight * (x * (np.float32(1.0) / np.sqrt(variance + np.float32(eps))))
