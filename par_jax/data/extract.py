r"""Code extraction: images -> views -> codes of any encoder, in ArrayRecord shards (see `par_jax.data.codes`);
clips -> (t, h, w) codes of a video tokenizer (`extract_video_codes`, one view per clip). The extract_codes job that
runs it with a trained tokenizer is `par_jax.tokenizer.extract`.

Every process takes a contiguous part of the image source and writes its own shards; its local devices encode
batches under a batch sharding (encoding needs no communication, so no process waits for another until the end,
when process 0 writes `metadata.json`). Host threads decode and crop the next images while the devices encode.
Shards are written under a temporary name and renamed when complete; a restarted job skips complete shards.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from par_jax.data import codes as codes_lib
from par_jax.data import sources as sources_lib
from par_jax.data import views as views_lib

PARTS_DIR = "parts"


def _format_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """Logs items (images or clips) done, items/s and the ETA every `every_s` seconds (and at the end)."""

    def __init__(self, total: int, every_s: float, what: str, unit: str = "images"):
        self.total, self.every_s, self.what, self.unit = total, every_s, what, unit
        self.done, self.start = 0, time.perf_counter()
        self._last = self.start

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if force or now - self._last >= self.every_s:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logging.info("%s: %d/%d %s (%.1f%%), %.1f %s/s, elapsed %s, ETA %s", self.what, self.done,
                         self.total, self.unit, 100 * self.done / max(self.total, 1), rate, self.unit,
                         _format_time(now - self.start), _format_time(eta) if math.isfinite(eta) else "?")


class _Encoder:
    """Jitted uint8 views (B, S, S, 3) -> int32 codes (B, h, w) (or clips (B, T, S, S, 3) -> (B, t, h, w)),
    batch-sharded over `mesh`'s "data" axis.

    `encoder` is an nnx.Module with `encode` (its state is passed as a replicated argument, not baked into the
    program as constants) or a plain function of float images in [-1, 1].
    """

    def __init__(self, encoder, mesh, channels: int):
        from flax import nnx  # noqa: PLC0415

        self.batch_sharding = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())

        def to_float(views):
            return views[..., :channels].astype(jnp.float32) / 127.5 - 1.0

        if isinstance(encoder, nnx.Module):
            graphdef, state = nnx.split(encoder)

            def encode(state, views):
                model = nnx.merge(graphdef, state)
                model.eval()  # dropout off, on this traced copy only
                return model.encode(to_float(views)).astype(jnp.int32)

            self._args = (jax.device_put(state, replicated),)
            in_shardings = (replicated, self.batch_sharding)
        else:
            def encode(views):
                return jnp.asarray(encoder(to_float(views))).astype(jnp.int32)

            self._args, in_shardings = (), (self.batch_sharding,)
        self._encode = encode
        self._jitted = jax.jit(encode, in_shardings=in_shardings, out_shardings=self.batch_sharding)

    def __call__(self, views: np.ndarray) -> jax.Array:
        return self._jitted(*self._args, jax.device_put(views, self.batch_sharding))

    def output_shape(self, views_shape) -> tuple[int, ...]:
        return jax.eval_shape(self._encode, *self._args, jax.ShapeDtypeStruct(views_shape, jnp.uint8)).shape


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def _check_common(encoder, vocab_size, batch_size, records_per_shard, process_index, process_count):
    """(vocab_size, process_index, process_count) with the defaults filled in; ValueError on bad values."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    vocab_size = vocab_size or getattr(getattr(encoder, "config", None), "codebook_size", None)
    if not vocab_size:
        raise ValueError("extract_codes needs vocab_size (the tokenizer's codebook size) for an encode function.")
    if batch_size < 1 or records_per_shard < 1:
        raise ValueError("batch_size and records_per_shard must be positive.")
    return vocab_size, process_index, process_count


def _encoder_for(encoder, batch_size: int, num_views: int, item_shape) -> tuple[_Encoder, int, tuple[int, ...]]:
    """(the jitted encoder, encoder inputs per step, the codes' grid shape) for inputs of `item_shape` (one view:
    (S, S, 3) for an image, (T, S, S, 3) for a clip). Only shapes are computed: nothing is encoded yet."""
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    encode = _Encoder(encoder, mesh, getattr(getattr(encoder, "config", None), "in_channels", 3))
    # Views per step, padded up to a multiple of the local device count (the padding is encoded and dropped).
    step_views = -(-batch_size * num_views // len(devices)) * len(devices)
    out_shape = encode.output_shape((step_views, *item_shape))
    if out_shape[0] != step_views:
        raise ValueError(f"the encoder turns {step_views} inputs of shape {tuple(item_shape)} into codes of shape "
                         f"{out_shape}; expected one code grid per input.")
    return encode, step_views, tuple(out_shape[1:])


def extract_codes(encoder, source: sources_lib.ImageSource, out_dir: str, *, image_size: int,
                  views: str = "ten_crop", crop_ratio: float = 1.1, flip_views: bool = False, batch_size: int = 64,
                  records_per_shard: int = 10_000, vocab_size: int | None = None, tokenizer_id: str = "",
                  tokenizer_fingerprint: str = "", expected_grid_shape=None, workers: int = 8,
                  process_index: int | None = None, process_count: int | None = None,
                  log_every_s: float = 30.0) -> codes_lib.CodesMetadata | None:
    """Encodes every image of `source` (all its views) into a codes directory `out_dir`.

    encoder: a VQModel (anything nnx with `encode(images in [-1, 1]) -> codes (B, h, w)`) or such a function.
    batch_size: images per step on this process (each gives `num_views` encoder inputs).
    vocab_size: the codebook size (read from `encoder.config.codebook_size` when it has one).
    tokenizer_id / tokenizer_fingerprint: where the tokenizer came from and a digest of its weights, recorded in the
      metadata so that decoding with another tokenizer can be caught (`par_jax.tokenizer.check_codes_tokenizer`).
    process_index / process_count: default to JAX's. Process 0 writes `metadata.json` once every process has
      written its part (after a barrier when JAX runs several processes), and returns the metadata; others
      return None. To emulate several processes in one, call the others first and process 0 last.
    """
    vocab_size, process_index, process_count = _check_common(encoder, vocab_size, batch_size, records_per_shard,
                                                             process_index, process_count)
    num_views = views_lib.num_views(views, flip_views)

    # Shapes first: a mismatched tokenizer or resolution fails here, before any work.
    encode, step_views, grid_shape = _encoder_for(encoder, batch_size, num_views, (image_size, image_size, 3))
    if len(grid_shape) != 2:
        raise ValueError(f"the encoder turns {image_size}px views into codes of shape {grid_shape}; expected (h, w) "
                         f"(a video tokenizer encodes clips: extract_video_codes).")
    if expected_grid_shape is not None and grid_shape != tuple(expected_grid_shape):
        raise ValueError(f"the tokenizer turns {image_size}px views into {grid_shape[0]}x{grid_shape[1]} codes but "
                         f"the model expects {tuple(expected_grid_shape)}: set data.image_size (or res) to match.")

    # The keys and values here are what a restarted job compares against: keep them as they were for images.
    settings = dict(source=source.name, count=len(source), process_count=process_count, views=views,
                    flip_views=flip_views, image_size=image_size, crop_ratio=crop_ratio, tokenizer=tokenizer_id,
                    tokenizer_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size, grid_shape=list(grid_shape),
                    records_per_shard=records_per_shard)

    def prepare(index):
        image, label = source[index]
        if not 0 <= label < source.num_classes:
            raise ValueError(f"image {index} of {source.name} has label {label} outside [0, {source.num_classes}).")
        return {"views": views_lib.make_views(image, views, image_size, crop_ratio=crop_ratio,
                                              flip_views=flip_views),
                "label": np.int32(label)}

    return _extract(encode, source, out_dir, prepare, settings, step_views=step_views, num_views=num_views,
                    vocab_size=vocab_size, batch_size=batch_size, records_per_shard=records_per_shard,
                    workers=workers, process_index=process_index, process_count=process_count,
                    log_every_s=log_every_s, unit="images")


VIDEO_VIEWS = "clip"  # the views kind recorded for video codes: one view per clip, the source's own (eval) crop


def extract_video_codes(encoder, source, out_dir: str, *, batch_size: int = 8, records_per_shard: int = 10_000,
                        vocab_size: int | None = None, tokenizer_id: str = "", tokenizer_fingerprint: str = "",
                        source_spec: str = "", frame_stride: int = 1, expected_grid_shape=None, workers: int = 4,
                        process_index: int | None = None, process_count: int | None = None,
                        log_every_s: float = 30.0) -> codes_lib.CodesMetadata | None:
    """Encodes every clip of a video source into a codes directory `out_dir` (grid (t, h, w), one view per clip).

    encoder: a video tokenizer (`par_jax.tokenizer.load` of a video checkpoint: `is_video`, `encode(clips in
      [-1, 1] (B, T, H, W, 3)) -> codes (B, t, h, w)`, `config.latent_shape(num_frames, frame_size)`), or such an
      encode function (then `vocab_size` is needed).
    source: a `par_jax.data.video.VideoSource` (name, num_classes, class_names, num_frames, frame_size;
      `source[i]` -> (uint8 (num_frames, frame_size, frame_size, 3), label)), built for evaluation: each clip is
      encoded as the source returns it (its fixed temporal crop, no flips).
    source_spec / frame_stride: how the source was made (e.g. "moving_fashion_mnist"), recorded in the metadata
      (`source`, `extra["frame_stride"]`) with the clip's num_frames and frame size (`image_size`).
    expected_grid_shape: the decoder's grid_shape; codes of another grid are refused before any clip is encoded.
    The rest is as in `extract_codes` (resumable shards, processes, progress).

    A clip source that does not fit the tokenizer (a frame count it cannot take, such as not 1 + 4k for a causal
    3D tokenizer, or a frame size other than the one it was built for) is a ValueError before encoding starts.
    """
    vocab_size, process_index, process_count = _check_common(encoder, vocab_size, batch_size, records_per_shard,
                                                             process_index, process_count)
    name = getattr(source, "name", type(source).__name__)
    num_frames, frame_size = int(source.num_frames), int(source.frame_size)
    if getattr(encoder, "is_video", None) is False:
        raise ValueError("extract_video_codes needs a video tokenizer, but this one is an image tokenizer "
                         "(is_video False): set data.tokenizer to a tokenizer trained on clips "
                         "(--job=train_tokenizer with a video tokenizer config).")
    config = getattr(encoder, "config", None)
    latent = None
    if hasattr(config, "latent_shape"):
        try:
            latent = tuple(int(g) for g in config.latent_shape(num_frames, frame_size))
        except ValueError as e:
            raise ValueError(f"the clips of {name} ({num_frames} frames of {frame_size}x{frame_size}) do not fit the "
                             f"tokenizer: {e}") from e
    built_for = getattr(config, "frame_size", None)  # the resolution it was trained at
    if built_for and int(built_for) != frame_size:
        raise ValueError(f"the clips of {name} have {frame_size}x{frame_size} frames but the tokenizer was built "
                         f"for {built_for}x{built_for}: set data.frame_size={built_for} (or use a tokenizer trained "
                         f"at {frame_size} px).")

    # Shapes first: the tokenizer's grid for these clips, checked against the model's, before any clip is read.
    item_shape = (num_frames, frame_size, frame_size, 3)
    encode, step_views, grid_shape = _encoder_for(encoder, batch_size, 1, item_shape)
    if len(grid_shape) != 3:
        raise ValueError(f"the encoder turns clips of shape {item_shape} into codes of shape {grid_shape}, not a "
                         f"(t, h, w) grid: is it a video tokenizer?")
    if latent is not None and grid_shape != latent:
        raise ValueError(f"the tokenizer's encode gives {codes_lib.grid_text(grid_shape)} codes for {num_frames} "
                         f"frames of {frame_size} px, but its config.latent_shape says {latent}.")
    if expected_grid_shape is not None and grid_shape != tuple(expected_grid_shape):
        raise ValueError(f"the tokenizer turns {num_frames} frames of {frame_size} px into "
                         f"{codes_lib.grid_text(grid_shape)} codes but the model expects "
                         f"{tuple(expected_grid_shape)}: set data.num_frames / data.frame_size (or "
                         f"model.grid_shape) to match.")
    if len(source) < 1:
        raise ValueError(f"the video source {name} has no clips.")

    settings = dict(source=source_spec or name, count=len(source), process_count=process_count,
                    views=VIDEO_VIEWS, flip_views=False, image_size=frame_size, num_frames=num_frames,
                    frame_stride=int(frame_stride), crop_ratio=1.0, tokenizer=tokenizer_id,
                    tokenizer_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size, grid_shape=list(grid_shape),
                    records_per_shard=records_per_shard)

    def prepare(index):
        clip, label = source[index]
        clip = np.asarray(clip)
        if clip.shape != item_shape or clip.dtype != np.uint8:
            raise ValueError(f"clip {index} of {name} is {clip.dtype} {clip.shape}, but the source says its clips "
                             f"are uint8 {item_shape}.")
        if not 0 <= label < source.num_classes:
            raise ValueError(f"clip {index} of {name} has label {label} outside [0, {source.num_classes}).")
        return {"views": clip[None], "label": np.int32(label)}

    prepare(0)  # the first clip read and checked now: a source that breaks its promise fails before any encoding
    return _extract(encode, source, out_dir, prepare, settings, step_views=step_views, num_views=1,
                    vocab_size=vocab_size, batch_size=batch_size, records_per_shard=records_per_shard,
                    workers=workers, process_index=process_index, process_count=process_count,
                    log_every_s=log_every_s, unit="clips")


def _extract(encode: _Encoder, source, out_dir: str, prepare, settings: dict, *, step_views: int, num_views: int,
             vocab_size: int, batch_size: int, records_per_shard: int, workers: int, process_index: int,
             process_count: int, log_every_s: float, unit: str) -> codes_lib.CodesMetadata | None:
    """The resumable, sharded writing both extractions share. `prepare(index)` -> {"views": uint8 (num_views,
    *input shape), "label": int32}; `settings` are recorded per process and must match on a restart."""
    codes_lib.check_local_path(out_dir)
    os.makedirs(os.path.join(out_dir, PARTS_DIR), exist_ok=True)
    start, end = (len(source) * process_index) // process_count, (len(source) * (process_index + 1)) // process_count
    settings_path = os.path.join(out_dir, PARTS_DIR, f"settings-{process_index:05d}.json")
    if os.path.exists(settings_path) and _read_json(settings_path) != settings:
        raise ValueError(f"{out_dir} holds codes from another extraction ({settings_path} differs: "
                         f"{_read_json(settings_path)} vs {settings}); use a new directory or delete it.")
    _write_json(settings_path, settings)

    shards = []  # (file name, first source index, end source index)
    for k, lo in enumerate(range(start, end, records_per_shard)):
        shards.append((codes_lib.shard_name(process_index, k), lo, min(lo + records_per_shard, end)))
    todo = [s for s in shards if not _complete(os.path.join(out_dir, s[0]), s[2] - s[1])]
    progress = _Progress(sum(hi - lo for _, lo, hi in todo), log_every_s,
                         f"extract_codes process {process_index}/{process_count}", unit)
    if len(todo) < len(shards):
        logging.info("extract_codes: %d of %d shards already complete in %s", len(shards) - len(todo), len(shards),
                     out_dir)

    meta_dtype = codes_lib.code_dtype(vocab_size)
    read_options = grain.ReadOptions(num_threads=max(workers, 1), prefetch_buffer_size=max(2 * batch_size, workers))
    for name, lo, hi in todo:
        writer = codes_lib.ShardWriter(os.path.join(out_dir, name), meta_dtype)
        batches = (grain.MapDataset.range(lo, hi).map(prepare).to_iter_dataset(read_options).batch(batch_size))
        pending = None  # (device codes, labels): written after the next batch is dispatched, to overlap host and device
        for batch in batches:
            n = len(batch["label"])
            flat = batch["views"].reshape(n * num_views, *batch["views"].shape[2:])
            flat = np.concatenate([flat, np.zeros((step_views - len(flat), *flat.shape[1:]), np.uint8)])
            dispatched = (encode(flat), batch["label"])
            if pending is not None:
                _write_batch(writer, *pending, num_views, vocab_size, progress)
            pending = dispatched
        if pending is not None:
            _write_batch(writer, *pending, num_views, vocab_size, progress)
        writer.close()
    progress.update(0, force=True)

    part = dict(settings, shards=[[name, hi - lo] for name, lo, hi in shards], num_classes=source.num_classes,
                class_names=list(source.class_names))
    _write_json(os.path.join(out_dir, PARTS_DIR, f"process-{process_index:05d}.json"), part)
    if process_count > 1 and jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices("par_jax extract_codes: all parts written")
    if process_index != 0:
        return None
    return finalize_codes(out_dir, process_count)


def _complete(path: str, expected: int) -> bool:
    if not os.path.exists(path):
        return False
    try:
        return codes_lib.count_records(path) == expected
    except RuntimeError:
        return False


def _write_batch(writer, codes, labels, num_views, vocab_size, progress) -> None:
    n = len(labels)
    codes = np.asarray(codes)[:n * num_views]
    codes = codes.reshape(n, num_views, *codes.shape[1:])
    if codes.size and (codes.min() < 0 or codes.max() >= vocab_size):
        raise ValueError(f"the encoder returned codes in [{codes.min()}, {codes.max()}], outside its vocabulary "
                         f"[0, {vocab_size}).")
    for c, label in zip(codes, labels):
        writer.write(c, int(label))
    progress.update(n)


def finalize_codes(out_dir: str, process_count: int) -> codes_lib.CodesMetadata:
    """Merges the per-process parts of `out_dir` into its `metadata.json` (in process order = source order)."""
    parts = []
    for p in range(process_count):
        path = os.path.join(out_dir, PARTS_DIR, f"process-{p:05d}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: process {p} of {process_count} has not finished its part.")
        parts.append(_read_json(path))
    first = parts[0]
    for p, part in enumerate(parts):
        differing = sorted(k for k in first if k != "shards" and part.get(k) != first[k])
        if differing:
            raise ValueError(f"process {p}'s part of {out_dir} differs from process 0's in {differing}.")
    video = first["views"] == VIDEO_VIEWS
    extra = dict(crop_ratio=first["crop_ratio"], flip_views=first["flip_views"],
                 tokenizer_fingerprint=first.get("tokenizer_fingerprint", ""))
    if video:
        extra["frame_stride"] = first["frame_stride"]
    meta = codes_lib.CodesMetadata(
        grid_shape=first["grid_shape"],
        num_views=1 if video else views_lib.num_views(first["views"], first["flip_views"]),
        vocab_size=first["vocab_size"], num_classes=first["num_classes"], count=first["count"],
        shards=[tuple(s) for part in parts for s in part["shards"]], tokenizer=first["tokenizer"],
        views=first["views"], eval_view=0 if video else views_lib.eval_view(first["views"]),
        image_size=first["image_size"], num_frames=first["num_frames"] if video else 0,
        source=first["source"], class_names=first["class_names"], extra=extra)
    meta.save(out_dir)
    logging.info("extract_codes: wrote %d records (%d views of %s codes) in %d shards to %s", meta.count,
                 meta.num_views, meta.grid_text, len(meta.shards), out_dir)
    return meta
