"""A decode step's KV cache and positions, as transformers' generate() keeps and computes them.

A decode step feeds one new token per prompt; its keys and values are the cache (every earlier
token's K after RoPE, and V) followed by its own, and its position is computed from the attention
mask, never read from a capture.
"""
from __future__ import annotations

import numpy as np

Cache = tuple[np.ndarray, np.ndarray]  # (B, P, Hkv, Dh) K after RoPE, V: every earlier token's


def step_positions(mask: np.ndarray, offset: int) -> np.ndarray:
    """The new token's position, as generate() computes it: cumsum(mask) - 1 + offset at the last column.
    (B, P + 1) -> (B, 1)"""
    return mask.cumsum(axis=1)[:, -1:] - 1 + offset


def heads(rows: np.ndarray, B: int, Dh: int) -> np.ndarray:
    """(B*T, Hkv*Dh) -> (B, T, Hkv, Dh): K or V rows as the cache holds them."""
    return rows.reshape(B, -1, rows.shape[1] // Dh, Dh)


def grow(cache: tuple[np.ndarray, np.ndarray] | None, k_rows: np.ndarray, v_rows: np.ndarray, B: int, Dh: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """The cache with new K and V rows (B*T, Hkv*Dh) appended after the old ones: (B, P + T, Hkv, Dh) each."""
    k, v = heads(k_rows, B, Dh), heads(v_rows, B, Dh)
    if cache is None:
        return k, v
    return np.concatenate([cache[0], k], axis=1), np.concatenate([cache[1], v], axis=1)
