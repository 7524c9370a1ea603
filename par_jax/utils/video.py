"""Clips for people to look at: batches tiled into one clip, animated GIFs, PNG frame strips.

A clip is (T, H, W, 3): uint8, or floats in [-1, 1] (converted with `images.to_uint8`). Small clips are enlarged
with nearest-neighbour upscaling by a whole factor, so a 32 px sample stays sharp and visible in a browser.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from par_jax.core import paths
from par_jax.utils import images


def _clips(clips, what: str) -> np.ndarray:
    """uint8 (B, T, H, W, C) with C in (1, 3); a single clip (T, H, W, C) becomes a batch of one."""
    clips = images.to_uint8(clips)
    if clips.ndim == 4:
        clips = clips[None]
    if clips.ndim != 5 or clips.shape[-1] not in (1, 3) or not clips.shape[0] or not clips.shape[1]:
        raise ValueError(f"{what} needs clips (B, T, H, W, 3) or one clip (T, H, W, 3) with B, T >= 1; got shape "
                         f"{clips.shape}.")
    return clips


def upscale(frames: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (..., H, W, C) by the smallest whole factor making min(H, W) >= min_side.

    A whole factor keeps every source pixel a sharp square (a fractional resize would smear the 32 px samples).
    """
    h, w = frames.shape[-3:-1]
    factor = max(1, -(-min_side // max(1, min(h, w))))
    if factor == 1:
        return frames
    return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def clip_grid(clips, rows: int, *, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """A batch of clips (B, T, H, W, 3) -> one uint8 clip (T, H', W', 3) whose frame t tiles frame t of every clip.

    Filled row by row like `images.make_grid` (cols = ceil(B / rows)), with a `pad` pixel gap of `pad_value`.
    """
    clips = _clips(clips, "clip_grid")
    return np.stack([images.make_grid(clips[:, t], rows, pad=pad, pad_value=pad_value)
                     for t in range(clips.shape[1])])


def gif_bytes(frames, *, fps: float = 8.0, min_side: int = 128) -> bytes:
    """One clip (T, H, W, 3) as an animated GIF that loops forever, upscaled so its short side is >= min_side."""
    clip = upscale(_clips(frames, "write_gif")[0], min_side)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    if clip.shape[-1] == 1:
        clip = clip[..., 0]
    pictures = [Image.fromarray(frame) for frame in clip]
    buffer = io.BytesIO()
    # loop=0: repeat forever. GIF durations are in whole milliseconds (browsers round them to 10 ms).
    # Pillow merges a frame identical to the one before into it (adding the durations), so a still clip plays
    # at the same speed with fewer stored frames.
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=round(1000 / fps),
                     loop=0)
    return buffer.getvalue()


def write_gif(frames, path, *, fps: float = 8.0, min_side: int = 128) -> str:
    """Write one clip (T, H, W, 3) (uint8, or floats in [-1, 1]) as an endlessly looping animated GIF; local or
    `gs://` paths. Returns the path. Tile a batch first with `clip_grid`."""
    return str(paths.write_bytes(path, gif_bytes(frames, fps=fps, min_side=min_side)))


def frame_strip(clips, *, min_side: int = 64, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Clips (B, T, H, W, 3) -> one uint8 picture: a row per clip, its frames left to right."""
    clips = _clips(clips, "write_frame_strip")
    b, t = clips.shape[:2]
    frames = upscale(clips.reshape(b * t, *clips.shape[2:]), min_side)
    return images.make_grid(frames, b, pad=pad, pad_value=pad_value)


def write_frame_strip(clips, path, *, min_side: int = 64, pad: int = 2) -> str:
    """Write clips (B, T, H, W, 3) or one clip (T, H, W, 3) as a PNG: a row per clip, frames left to right, each
    frame upscaled so its short side is >= min_side. Returns the path."""
    return images.save_png(path, frame_strip(clips, min_side=min_side, pad=pad))
