"""Images for people to look at: [-1, 1] floats to uint8, grids, PNG files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from par_jax.core import paths


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] (values outside are clipped) to uint8 in [0, 255]; uint8 input passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round((np.clip(images.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def make_grid(images, rows: int, *, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, C) images (uint8, or floats in [-1, 1]) -> one uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, C) picture.

    Filled row by row; cols = ceil(N / rows); empty cells and borders are `pad_value`.
    """
    images = to_uint8(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or not len(images):
        raise ValueError(f"make_grid needs a non-empty batch (N, H, W[, C]); got shape {images.shape}.")
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}.")
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        if r >= rows:
            raise ValueError(f"{n} images do not fit {rows} rows of {cols}.")
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def png_bytes(array) -> bytes:
    """An (H, W), (H, W, 1) or (H, W, 3) image (uint8, or floats in [-1, 1]) encoded as PNG."""
    array = to_uint8(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path, array) -> str:
    """Write an (H, W), (H, W, 1) or (H, W, 3) image (uint8, or floats in [-1, 1]) as PNG, creating folders; local or
    `gs://` paths (par_jax.core.paths)."""
    return str(paths.write_bytes(path, png_bytes(array)))
