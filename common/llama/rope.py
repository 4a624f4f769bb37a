"""Rotary position embeddings (RoPE), written from the equations, in float32 numpy.

Layout: rotate-half, the one Hugging Face Llama checkpoints use. Inside a head of Dh dims,
dimension j is rotated together with dimension j + Dh/2 (HF's `rotate_half`), NOT with its
neighbour j + 1 as in Meta's original complex-number code: the HF conversion script permutes the
rows of Wq and Wk so that this pairing is the right one (llama2.c's export.py undoes it with
`permute_reverse`). Pairing neighbours on an HF checkpoint is a real and silent bug; step 3 catches it.

    inv_freq[i]   = theta ** (-2i / Dh),  i = 0 .. Dh/2 - 1     then scaled by rope_type
    angle[b,t,i]  = position_ids[b,t] * inv_freq[i]
    out[j]        = x[j] cos(angle[j]) - x[j + Dh/2] sin(angle[j])      j < Dh/2
    out[j + Dh/2] = x[j + Dh/2] cos(angle[j]) + x[j] sin(angle[j])

Long positions (what the offline angle arithmetic must do to match the model there).
An angle is position * inv_freq in float32, and at position p one ulp of inv_freq moves the angle by
p ulps: at p = 100000 one float32 step of inv_freq ~ 0.66 is 0.006 rad, a relative error of ~6e-3
in Q and K, far above the check's 1e-5. So the angles must equal the model's bit for bit, and that
takes four things, each mirrored below:
  1. inv_freq bit for bit. transformers computes it in float32: exponent 2i/Dh rounded once,
     float32(theta) ** exponent with torch's CPU pow kernel (point 4), then 1.0 / that; and the
     Llama-3 scaling with torch's own operator order: `2 * pi / inv_freq` and `L / wavelen` are
     Tensor.__rtruediv__, i.e. reciprocal(x) * c (two roundings, not one division), every Python
     scalar is rounded to float32 first, and comparisons are in float32.
  2. The angle as one float32 product: float32(position) * inv_freq, rounded once (transformers'
     LlamaRotaryEmbedding.forward: position_ids.float() * inv_freq, no float64, no matmul
     accumulation). Positions stay exact in float32 up to 2**24.
  3. cos and sin of that float32 angle, with a correct range reduction (numpy's and torch's both
     are; their results differ in the last ulp at most, a 6e-8 error that does not grow with p).
  4. torch's float32 pow, which is not the correctly rounded power: its CPU kernel runs SLEEF's SIMD
     powf (1 ulp) on the first 2 * lanes * k frequencies and the C library's powf on the rest, with
     lanes = 16 floats under torch's AVX512 kernels, 8 under AVX2, 0 (powf only) under DEFAULT.
     common/llama/torch_pow.py mirrors both. The correctly rounded power (float64 rounded once) differs on
     ~4% of the frequencies of random configs (theta 1e6, Dh 128: one of 64, by one ulp, two after
     1 / pow), and at long positions that alone FAILs the check. So the last bit depends on the
     capture machine's CPU: step 2 records torch_cpu_capability and the model's own inv_freq
     (rope_inv_freq) in meta_layerN.json; step 3 computes with the recorded capability's lanes and
     reports every frequency that still differs (common/check/offline.py, rope_check).
     Where it is computed: transformers calls ROPE_INIT_FUNCTIONS / compute_default_rope_parameters
     with no device (LlamaRotaryEmbedding.__init__, and again in PreTrainedModel._init_weights after
     from_pretrained), so on the CPU even for a model that then runs on CUDA; this pipeline also
     loads on the CPU and moves the model after. Only a default torch device set around the load
     would compute it elsewhere (CUDA's powf is another function; the recorded inv_freq shows it).
"""
from __future__ import annotations

import math

import numpy as np

from common.llama import torch_pow

# rope_type -> the rope_scaling keys it needs.
ROPE_PARAMS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_PARAMS)


def rope_type_of(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def check_scaling(scaling: dict | None) -> str:
    """The rope_type of a rope_scaling (None = default); ValueError if unsupported or incomplete."""
    rope_type = rope_type_of(scaling)
    if rope_type not in ROPE_PARAMS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    missing = [k for k in ROPE_PARAMS[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)} in rope_scaling")
    return rope_type


def default_inv_freq(head_dim: int, theta: float, lanes: int | None = None) -> np.ndarray:
    """theta ** (-2i / Dh) for i < Dh/2, float32: the frequencies of plain RoPE. (Dh/2,)

    The power is torch's CPU pow with `lanes` floats per vector (module docstring, point 4);
    None: the lanes torch has on this machine.
    """
    lanes = torch_pow.lanes_of(None) if lanes is None else lanes
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return np.float32(1.0) / torch_pow.torch_powf(theta, exponent, lanes)


def llama3_inv_freq(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> np.ndarray:
    """Llama-3 scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.

    wavelen = 2 pi / inv_freq; wavelen > L / low_freq_factor   -> inv_freq / factor
                               wavelen < L / high_freq_factor  -> inv_freq
                               else (1 - s) inv_freq / factor + s inv_freq,
                                    s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    with L = original_max_position_embeddings. Every operation in float32 and in transformers' order
    (module docstring, point 1): `c / x` is reciprocal(x) * c there, so it is here.
    """
    f32 = np.float32
    L = original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = f32(L / low_freq_factor), f32(L / high_freq_factor)
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
    s = ((f32(1) / wavelen) * f32(L) - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
    smoothed = (f32(1) - s) * scaled / f32(factor) + s * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, lanes: int | None = None) -> np.ndarray:
    """The per-pair frequencies for a rope_scaling of None/default, linear or llama3. (Dh/2,)

    lanes: torch_pow.lanes_of the CPU capability the model computed its frequencies with (None: here).
    Any other rope_type raises ValueError: a silent fallback to plain RoPE would be a wrong answer.
    """
    return scale_inv_freq(default_inv_freq(head_dim, theta, lanes), scaling)


def scale_inv_freq(inv_freq: np.ndarray, scaling: dict | None) -> np.ndarray:
    """Plain RoPE frequencies (Dh/2,) -> those of the rope_scaling (None/default, linear or llama3)."""
    rope_type = check_scaling(scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":  # positions divided by factor == frequencies divided by factor
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    return llama3_inv_freq(inv_freq, *(scaling[k] for k in ROPE_PARAMS["llama3"]))


def rope_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * inv_freq: (B, T) positions -> two (B, T, Dh/2) arrays."""
    # One float32 product per angle, as the model does (module docstring, point 2).
    angle = position_ids.astype(np.float32)[..., None] * inv_freq  # (B, T, 1) * (Dh/2,) -> (B, T, Dh/2)
    return np.cos(angle), np.sin(angle)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (j, j + Dh/2) of every head: x (B, T, H, Dh), cos/sin (B, T, Dh/2) -> (B, T, H, Dh)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, T, H, Dh/2) each
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, Dh/2): the same angle for every head
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
