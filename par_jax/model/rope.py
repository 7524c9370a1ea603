"""Rotary position embedding over grid coordinates (2D for images, 3D for video), permuted with the token order.

Pairs are interleaved (element 2j rotates with 2j+1). The D/2 pairs of a head are split between the grid axes: for
an (H, W) grid the first D/4 pairs rotate by the row and the last D/4 by the column, with frequencies
f_j = base^(-2j / (D/2)) (LlamaGen's 2D RoPE). For a (T, H, W) grid the pairs are split as evenly as possible with any
remainder going to the spatial axes, each axis using the same formula over its own pairs. Angles come from each
token's own grid coordinates, whatever its position in the sequence.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from par_jax import ordering


def axis_pairs(head_dim: int, num_axes: int) -> list[int]:
    pairs = head_dim // 2
    base, rem = divmod(pairs, num_axes)
    return [base + (1 if a >= num_axes - rem else 0) for a in range(num_axes)]


def rope_angles(positions: np.ndarray, head_dim: int, base: float = 10000.0) -> np.ndarray:
    """(L, head_dim/2) float64 rotation angles for integer grid coordinates `positions` of shape (L, num_axes)."""
    positions = np.asarray(positions, np.float64)
    parts = []
    for axis, p in enumerate(axis_pairs(head_dim, positions.shape[-1])):
        freqs = base ** (-np.arange(p, dtype=np.float64) * 2.0 / (2 * p))
        parts.append(positions[:, axis:axis + 1] * freqs[None, :])
    return np.concatenate(parts, axis=-1)


def rope_table(layout: ordering.SequenceLayout, head_dim: int, base: float = 10000.0,
               zero_special: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (L, head_dim/2) float32, for every position of the training sequence.

    At class and transition positions the table is all zeros (the release's behaviour, which makes q and k zero there)
    or, with zero_special=False, the identity rotation.
    """
    angles = rope_angles(layout.positions(), head_dim, base)
    cos, sin = np.cos(angles), np.sin(angles)
    special = (layout.input_kind != ordering.TOKEN)[:, None]
    cos = np.where(special, 0.0 if zero_special else 1.0, cos)
    sin = np.where(special, 0.0, sin)
    return cos.astype(np.float32), sin.astype(np.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x (B, Q, heads, head_dim) by per-position tables (Q, head_dim/2); computed in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
