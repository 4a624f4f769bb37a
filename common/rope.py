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

Every step is done in float32 in the same order as the model does it, so the angles match the
model's bit for bit (an error of one ulp in an angle at position p is p times larger).
"""
from __future__ import annotations

import math

import numpy as np

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


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """theta ** (-2i / Dh) for i < Dh/2, float32: the frequencies of plain RoPE. (Dh/2,)"""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # The power in float64, rounded once: a correctly rounded float32 pow, as torch's is. numpy's
    # float32 powf is one ulp off for some exponents, and p * (one ulp) is a visible angle error.
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def llama3_inv_freq(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> np.ndarray:
    """Llama-3 scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.

    wavelen = 2 pi / inv_freq; wavelen > L / low_freq_factor   -> inv_freq / factor
                               wavelen < L / high_freq_factor  -> inv_freq
                               else (1 - s) inv_freq / factor + s inv_freq,
                                    s = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    with L = original_max_position_embeddings.
    """
    L = original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = L / low_freq_factor, L / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    s = (np.float32(L) / wavelen - np.float32(low_freq_factor)) / np.float32(high_freq_factor - low_freq_factor)
    smoothed = (1 - s) * scaled / np.float32(factor) + s * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """The per-pair frequencies for a rope_scaling of None/default, linear or llama3. (Dh/2,)

    Any other rope_type raises ValueError: a silent fallback to plain RoPE would be a wrong answer.
    """
    rope_type = check_scaling(scaling)
    inv_freq = default_inv_freq(head_dim, theta)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":  # positions divided by factor == frequencies divided by factor
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    return llama3_inv_freq(inv_freq, *(scaling[k] for k in ROPE_PARAMS["llama3"]))


def rope_cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * inv_freq: (B, T) positions -> two (B, T, Dh/2) arrays."""
    angle = position_ids.astype(np.float32)[..., None] * inv_freq  # (B, T, 1) * (Dh/2,) -> (B, T, Dh/2)
    return np.cos(angle), np.sin(angle)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (j, j + Dh/2) of every head: x (B, T, H, Dh), cos/sin (B, T, Dh/2) -> (B, T, H, Dh)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, T, H, Dh/2) each
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, Dh/2): the same angle for every head
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
