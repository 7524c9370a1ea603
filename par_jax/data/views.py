"""Image views encoded once at extraction time (PAR_SPEC section 10); training picks one view per sample at random.

  ten_crop  centre-crop the image to `crop_ratio` x the target size (ADM/LlamaGen centre crop: box-halve while the
            short side is at least twice the target, bicubic resize of the short side, centre crop), then the four
            corner crops and the centre crop at the target size, followed by the same five crops of the horizontally
            flipped image (torchvision's TenCrop order). 10 views; view 4 is the plain centre.
  center    the centre crop at the target size. 1 view.
  resize    a bicubic resize to target x target (for small square data). 1 view.
  pad       zero-pad to target x target, centred (28x28 Fashion-MNIST -> 32x32). 1 view.

`flip_views=True` adds the horizontal flip of each view for center/resize/pad (ten_crop has its flips already).
All views are uint8 (V, size, size, 3).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

VIEW_KINDS = ("ten_crop", "center", "resize", "pad")


def _check_kind(kind: str) -> None:
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; choose one of {VIEW_KINDS}.")


def num_views(kind: str, flip_views: bool = False) -> int:
    _check_kind(kind)
    return 10 if kind == "ten_crop" else 2 if flip_views else 1


def eval_view(kind: str) -> int:
    """Index of the unflipped centre view, the one to use where a single fixed view is wanted."""
    _check_kind(kind)
    return 4 if kind == "ten_crop" else 0


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ADM-style centre crop to size x size: halve with a box filter while the short side is >= 2*size (cheap
    anti-aliasing for big photos), bicubic-resize the short side to `size`, then crop the centre."""
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def five_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops (torchvision's FiveCrop geometry)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot take {size}x{size} crops from a {h}x{w} image.")
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return [image[:size, :size], image[:size, w - size:], image[h - size:, :size], image[h - size:, w - size:],
            image[top:top + size, left:left + size]]


def ten_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """The five crops, then the five crops of the horizontally flipped image."""
    return five_crop(image, size) + five_crop(image[:, ::-1], size)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), resample=Image.Resampling.BICUBIC))


def pad(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"cannot pad a {h}x{w} image to {size}x{size}; use views='center' or 'resize'.")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(image, ((top, size - h - top), (left, size - w - left), (0, 0)))


def make_views(image: np.ndarray, kind: str, size: int, *, crop_ratio: float = 1.1,
               flip_views: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (num_views(kind, flip_views), size, size, 3)."""
    _check_kind(kind)
    if kind == "ten_crop":
        if crop_ratio < 1:
            raise ValueError(f"crop_ratio must be >= 1 (the crops are taken inside the centre crop), got {crop_ratio}.")
        views = ten_crop(center_crop(image, int(size * crop_ratio)), size)
    else:
        view = {"center": center_crop, "resize": resize, "pad": pad}[kind](image, size)
        views = [view, view[:, ::-1]] if flip_views else [view]
    return np.stack(views)
