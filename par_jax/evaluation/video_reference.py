"""Real clips that generated clips are compared with: a video source (`moving_fashion_mnist`, `tfds:ucf101`,
`folder:PATH`; par_jax.data.video) or a `.npz` whose `arr_0` holds uint8 clips (N, T, H, W, 3), with their features.

A source is read at the samples' own clip shape (frames and frame size as the tokenizer decodes them), each clip the
source's fixed evaluation crop (`source[i]`: from the first frame), then every frame is resized to the evaluation
resolution with the same bicubic resize as the samples.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from par_jax.core import paths
from par_jax.core.config_args import UsageError
from par_jax.evaluation import features as features_lib
from par_jax.evaluation import npz, resize
from par_jax.evaluation.settings import EvalSettings


def check(settings: EvalSettings) -> None:
    """Cheap checks that the reference is named and, for a file, exists (before any network or sampling)."""
    if not settings.reference:
        raise UsageError("config.eval.reference is empty: give a video source such as 'moving_fashion_mnist' or "
                         "'tfds:ucf101', or a .npz of uint8 clips (N, T, H, W, 3) in arr_0.")
    if settings.reference.endswith(".npz") and not paths.exists(settings.reference):
        raise FileNotFoundError(f"reference clips {settings.reference!r} do not exist.")


def _resize_clips(resolution: int):
    def run(clips):
        b, t = clips.shape[:2]
        frames = resize.resize_bicubic(resize.from_uint8(clips.reshape(b * t, *clips.shape[2:])), resolution)
        return resize.to_uint8(frames).reshape(b, t, *frames.shape[1:])
    return jax.jit(run)


def clips(settings: EvalSettings, num_frames: int, frame_size: int, batch_size: int, *, resolution: int = 0
          ) -> tuple[Iterator[np.ndarray], dict[str, Any]]:
    """uint8 batches (b, num_frames, R, R, 3) of the reference clips (R = `resolution`, or `frame_size` when 0), and
    a record of what they are."""
    check(settings)
    spec, limit = settings.reference, settings.reference_count or None
    want = (num_frames, resolution or frame_size, resolution or frame_size, 3)
    if spec.endswith(".npz"):
        shape, dtype = npz.read_header(spec)
        if dtype != np.uint8 or tuple(shape[1:]) != want:
            raise ValueError(f"{spec}: arr_0 must hold uint8 clips (N, {', '.join(map(str, want))}) to match the "
                             f"samples; got {dtype} {shape}.")
        count = shape[0] if limit is None else min(shape[0], limit)
        return npz.iter_batches(spec, batch_size, limit=limit), {"reference": spec, "reference_count": count}

    from par_jax.data import video  # noqa: PLC0415 (only source references need the data layer)

    source = video.make_video_source(spec, split=settings.reference_split, num_frames=num_frames,
                                     frame_size=frame_size)
    count = len(source) if limit is None else min(len(source), limit)
    resized = bool(resolution) and resolution != frame_size
    to_size = _resize_clips(resolution) if resized else None

    def batches():
        for begin in range(0, count, batch_size):
            batch = np.stack([source[i][0] for i in range(begin, min(begin + batch_size, count))])
            yield np.asarray(to_size(batch)) if resized else batch

    record = {"reference": f"{source.name} ({settings.reference_split} split), {num_frames} frames at {frame_size}px "
                           f"from the first frame" + (f", bicubic to {resolution}px" if resized else ""),
              "reference_count": count}
    return batches(), record


def features(settings: EvalSettings, network: features_lib.FeatureNetwork, num_frames: int, frame_size: int, *,
             resolution: int = 0) -> tuple[features_lib.Features, dict[str, Any]]:
    """Features of the reference clips through a video network, and a record of them."""
    if not network.video:
        raise UsageError(f"{network.name} is an image feature network; video references need a video one.")
    batches, record = clips(settings, num_frames, frame_size, network.batch_size, resolution=resolution)
    feats = features_lib.collect(network, batches, log_every=20)
    record["reference_stats"] = "computed"
    return feats, record
