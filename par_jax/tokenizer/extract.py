r"""The extract_codes job: encode an image source's views (or a video source's clips) with a trained tokenizer into
the codes the decoder trains on. It lives here, where its inputs meet (`par_jax.data` reads the images and clips and
writes the codes format; the tokenizer encodes).

    python -m par_jax.main --config=configs/par.py:size=XL,res=384 --job=extract_codes --workdir=DIR \
        --config.data.image_source=tfds:imagenet2012 --config.data.tokenizer=PATH [--config.data.codes_dir=OUT]

Video: a non-empty `config.data.video_source` switches the job to clips, encoded by a video tokenizer into
(t, h, w) codes, one view per clip (the source's evaluation crop). The fields it reads from `config.data`:
    video_source   "moving_fashion_mnist" | "moving_synthetic" | "tfds:ucf101" | "folder:PATH"
                   (`par_jax.data.video.make_video_source`); "" or absent: images
    num_frames     frames per clip (17; 1 + 4k for a causal 3D tokenizer)
    frame_size     frame side in pixels (32; the tokenizer's own frame_size)
    frame_stride   temporal stride of real videos (1)
    video_count    clips of the moving sets (0: one per image of the split)
plus split, seed, tfds_data_dir, download, tokenizer, codes_dir, extract_batch_size (clips per step),
records_per_shard and extract_workers as for images. config.model.grid_shape must be the tokenizer's latent shape
of those clips (5x8x8 for 17 frames of 32 px with the `video` tokenizer), checked before any clip is encoded.
"""

from __future__ import annotations

import os

from absl import logging
from etils import epath

from par_jax import tokenizer as tokenizer_lib
from par_jax.core.config_args import UsageError
from par_jax.data import codes, extract, sources


def run(config, workdir: str) -> codes.CodesMetadata | None:
    """The extract_codes job: `config.data` names the image (or video) source, views, tokenizer and output
    directory."""
    data = config.data
    if not data.tokenizer:
        raise UsageError("extract_codes needs --config.data.tokenizer=PATH, a trained tokenizer (train one with "
                         "--job=train_tokenizer).")
    out_dir = data.codes_dir or os.fspath(epath.Path(workdir) / "codes")
    if data.get("video_source", ""):
        return run_video(config, out_dir)
    source = sources.make_image_source(
        data.image_source, split=data.split, data_dir=data.tfds_data_dir or None, download=data.download,
        image_size=data.image_size, num_classes=config.model.num_classes, count=data.synthetic_count,
        seed=data.seed)
    encoder = tokenizer_lib.load(data.tokenizer)
    logging.info("extract_codes: %s (%d images, %d classes) -> %s with tokenizer %s", source.name, len(source),
                 source.num_classes, out_dir, data.tokenizer)
    if source.num_classes > config.model.num_classes:
        raise UsageError(f"{source.name} has {source.num_classes} classes but config.model.num_classes is "
                         f"{config.model.num_classes}.")
    return extract.extract_codes(encoder, source, out_dir, image_size=data.image_size, views=data.views,
                                 crop_ratio=data.crop_ratio, flip_views=data.flip_views,
                                 batch_size=data.extract_batch_size, records_per_shard=data.records_per_shard,
                                 tokenizer_id=data.tokenizer, tokenizer_fingerprint=tokenizer_lib.fingerprint(encoder),
                                 expected_grid_shape=config.model.grid_shape, workers=data.extract_workers)


def video_settings(data) -> dict:
    """The video fields of `config.data` (module docstring), defaults filled in and checked."""
    settings = dict(spec=str(data.get("video_source", "")), num_frames=int(data.get("num_frames", 17)),
                    frame_size=int(data.get("frame_size", 32)), frame_stride=int(data.get("frame_stride", 1)),
                    count=int(data.get("video_count", 0)))
    bad = [f"data.{k}={settings[k]}" for k in ("num_frames", "frame_size", "frame_stride") if settings[k] < 1]
    if settings["count"] < 0:
        bad.append(f"data.video_count={settings['count']}")
    if bad:
        raise UsageError(f"video extraction needs positive data.num_frames, data.frame_size and data.frame_stride, "
                         f"and data.video_count >= 0 (0: all); got {', '.join(bad)}.")
    return settings


def make_video_source(data, split: str = ""):
    """The video source `config.data` names (its evaluation clips), for extraction."""
    from par_jax.data import video  # noqa: PLC0415 (image runs never need it)
    v = video_settings(data)
    return video.make_video_source(v["spec"], split=split or data.split, num_frames=v["num_frames"],
                                   frame_size=v["frame_size"], frame_stride=v["frame_stride"],
                                   data_dir=data.get("tfds_data_dir", "") or None,
                                   download=bool(data.get("download", False)), count=v["count"],
                                   seed=int(data.get("seed", 0)))


def encode_video_source(config, source, tok, out_dir: str, *, tokenizer_id: str) -> codes.CodesMetadata | None:
    """`source`'s clips through the video tokenizer `tok` into `out_dir`, checked against config.model first."""
    data = config.data
    v = video_settings(data)
    if not getattr(tok, "is_video", False):
        raise UsageError(f"data.video_source={v['spec']!r} asks for video codes, but the tokenizer {tokenizer_id} "
                         f"is an image tokenizer: set --config.data.tokenizer to a video tokenizer (trained with "
                         f"--job=train_tokenizer on clips).")
    if source.num_classes > config.model.num_classes:
        raise UsageError(f"{source.name} has {source.num_classes} classes but config.model.num_classes is "
                         f"{config.model.num_classes}.")
    grid = tuple(int(g) for g in config.model.grid_shape)
    try:
        latent = tuple(tok.config.latent_shape(v["num_frames"], v["frame_size"]))
    except ValueError as e:
        raise UsageError(f"data.num_frames={v['num_frames']} / data.frame_size={v['frame_size']} do not fit the "
                         f"video tokenizer {tokenizer_id}: {e}") from e
    if latent != grid:
        raise UsageError(f"the video tokenizer turns {v['num_frames']} frames of {v['frame_size']} px into "
                         f"{codes.grid_text(latent)} codes but config.model.grid_shape is {grid}: set "
                         f"--config.model.grid_shape={latent} (or change data.num_frames / data.frame_size).")
    logging.info("extract_codes: %s (%d clips, %d classes) -> %s with video tokenizer %s", source.name, len(source),
                 source.num_classes, out_dir, tokenizer_id)
    return extract.extract_video_codes(
        tok, source, out_dir, batch_size=data.extract_batch_size, records_per_shard=data.records_per_shard,
        tokenizer_id=tokenizer_id, tokenizer_fingerprint=tokenizer_lib.fingerprint(tok), source_spec=v["spec"],
        frame_stride=v["frame_stride"], expected_grid_shape=grid, workers=data.extract_workers)


def run_video(config, out_dir: str) -> codes.CodesMetadata | None:
    """The extract_codes job on clips (`config.data.video_source` set)."""
    data = config.data
    video_settings(data)  # bad numbers fail before the tokenizer or the source is read
    tok = tokenizer_lib.load(data.tokenizer)
    return encode_video_source(config, make_video_source(data), tok, out_dir, tokenizer_id=data.tokenizer)
