"""The evaluation protocol's image resize and uint8 conversion, as the PyTorch release does them (PAR_SPEC 11).

The release generates at 384 px and, before saving, runs `F.interpolate(x, size, mode="bicubic")` on the decoded
[-1, 1] images (Keys cubic with a = -0.75, half-pixel centres, border pixels repeated, no antialiasing even when
shrinking), then `clamp(127.5 * x + 128, 0, 255)` cast to uint8 (truncation, so 0.5 is added before flooring). Both
are reproduced exactly here: `jax.image.resize` would differ (a = -0.5, antialiased downsampling), and FID moves
with such details.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # PyTorch's bicubic coefficient (PIL and jax.image use -0.5)


def _cubic(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=16)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of PyTorch's bicubic interpolation (align_corners=False) along one axis."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src).astype(np.int64)
    t = src - base
    m = np.zeros((out_size, in_size), np.float64)
    for offset in (-1, 0, 1, 2):
        # Taps outside the image read the border pixel (their weight is added to it).
        idx = np.clip(base + offset, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), _cubic(t - offset))
    return m.astype(np.float32)


def resize_bicubic(images, size: int | tuple[int, int]):
    """(B, H, W, C) float -> (B, size, size, C), PyTorch `F.interpolate(mode="bicubic")` semantics."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, h, w, _ = images.shape
    if (h, w) == (out_h, out_w):
        return images
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(bicubic_matrix(h, out_h)), images, precision=hi)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(bicubic_matrix(w, out_w)), x, precision=hi)


def to_uint8(images):
    """[-1, 1] floats -> uint8 as the release saves samples: clamp(127.5 x + 128, 0, 255), truncated."""
    return jnp.clip(127.5 * images + 128.0, 0.0, 255.0).astype(jnp.uint8)


def from_uint8(images):
    """uint8 -> float in [-1, 1] (x / 127.5 - 1), for resizing reference images the same way as samples."""
    return images.astype(jnp.float32) / 127.5 - 1.0
