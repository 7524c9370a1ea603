r"""Code extraction: images -> views -> codes of any encoder, in ArrayRecord shards (see `par_jax.data.codes`).
The extract_codes job that runs it with a trained tokenizer is `par_jax.tokenizer.extract`.

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
    """Logs images done, images/s and the ETA every `every_s` seconds (and at the end)."""

    def __init__(self, total: int, every_s: float, what: str):
        self.total, self.every_s, self.what = total, every_s, what
        self.done, self.start = 0, time.perf_counter()
        self._last = self.start

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if force or now - self._last >= self.every_s:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logging.info("%s: %d/%d images (%.1f%%), %.1f images/s, elapsed %s, ETA %s", self.what, self.done,
                         self.total, 100 * self.done / max(self.total, 1), rate,
                         _format_time(now - self.start), _format_time(eta) if math.isfinite(eta) else "?")


class _Encoder:
    """Jitted uint8 views (B, S, S, 3) -> int32 codes (B, h, w), batch-sharded over `mesh`'s "data" axis.

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


def extract_codes(encoder, source: sources_lib.ImageSource, out_dir: str, *, image_size: int,
                  views: str = "ten_crop", crop_ratio: float = 1.1, flip_views: bool = False, batch_size: int = 64,
                  records_per_shard: int = 10_000, vocab_size: int | None = None, tokenizer_id: str = "",
                  tokenizer_fingerprint: str = "", expected_grid_shape=None, workers: int = 8, process_index: int | None = None,
                  process_count: int | None = None, log_every_s: float = 30.0) -> codes_lib.CodesMetadata | None:
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
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    config = getattr(encoder, "config", None)
    vocab_size = vocab_size or getattr(config, "codebook_size", None)
    if not vocab_size:
        raise ValueError("extract_codes needs vocab_size (the tokenizer's codebook size) for an encode function.")
    if batch_size < 1 or records_per_shard < 1:
        raise ValueError("batch_size and records_per_shard must be positive.")
    num_views = views_lib.num_views(views, flip_views)
    meta_dtype = codes_lib.code_dtype(vocab_size)

    # Shapes first: a mismatched tokenizer or resolution fails here, before any work.
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    encode = _Encoder(encoder, mesh, getattr(config, "in_channels", 3))
    # Views per step, padded up to a multiple of the local device count (the padding is encoded and dropped).
    step_views = -(-batch_size * num_views // len(devices)) * len(devices)
    out_shape = encode.output_shape((step_views, image_size, image_size, 3))
    grid_shape = tuple(out_shape[1:])
    if len(grid_shape) != 2 or out_shape[0] != step_views:
        raise ValueError(f"the encoder turns {step_views} views into codes of shape {out_shape}; expected "
                         f"({step_views}, h, w).")
    if expected_grid_shape is not None and grid_shape != tuple(expected_grid_shape):
        raise ValueError(f"the tokenizer turns {image_size}px views into {grid_shape[0]}x{grid_shape[1]} codes but "
                         f"the model expects {tuple(expected_grid_shape)}: set data.image_size (or res) to match.")

    codes_lib.check_local_path(out_dir)
    os.makedirs(os.path.join(out_dir, PARTS_DIR), exist_ok=True)
    start, end = (len(source) * process_index) // process_count, (len(source) * (process_index + 1)) // process_count
    settings = dict(source=source.name, count=len(source), process_count=process_count, views=views,
                    flip_views=flip_views, image_size=image_size, crop_ratio=crop_ratio, tokenizer=tokenizer_id,
                    tokenizer_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size, grid_shape=list(grid_shape), records_per_shard=records_per_shard)
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
                         f"extract_codes process {process_index}/{process_count}")
    if len(todo) < len(shards):
        logging.info("extract_codes: %d of %d shards already complete in %s", len(shards) - len(todo), len(shards),
                     out_dir)

    def prepare(index):
        image, label = source[index]
        if not 0 <= label < source.num_classes:
            raise ValueError(f"image {index} of {source.name} has label {label} outside [0, {source.num_classes}).")
        return {"views": views_lib.make_views(image, views, image_size, crop_ratio=crop_ratio,
                                              flip_views=flip_views),
                "label": np.int32(label)}

    read_options = grain.ReadOptions(num_threads=max(workers, 1), prefetch_buffer_size=max(2 * batch_size, workers))
    for name, lo, hi in todo:
        writer = codes_lib.ShardWriter(os.path.join(out_dir, name), meta_dtype)
        batches = (grain.MapDataset.range(lo, hi).map(prepare).to_iter_dataset(read_options).batch(batch_size))
        pending = None  # (device codes, labels): written after the next batch is dispatched, to overlap host and device
        for batch in batches:
            n = len(batch["label"])
            flat = batch["views"].reshape(n * num_views, image_size, image_size, 3)
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
    meta = codes_lib.CodesMetadata(
        grid_shape=first["grid_shape"], num_views=views_lib.num_views(first["views"], first["flip_views"]),
        vocab_size=first["vocab_size"], num_classes=first["num_classes"], count=first["count"],
        shards=[tuple(s) for part in parts for s in part["shards"]], tokenizer=first["tokenizer"],
        views=first["views"], eval_view=views_lib.eval_view(first["views"]), image_size=first["image_size"],
        source=first["source"], class_names=first["class_names"],
        extra=dict(crop_ratio=first["crop_ratio"], flip_views=first["flip_views"],
                   tokenizer_fingerprint=first.get("tokenizer_fingerprint", "")))
    meta.save(out_dir)
    logging.info("extract_codes: wrote %d records (%d views of %dx%d codes) in %d shards to %s", meta.count,
                 meta.num_views, *meta.grid_shape, len(meta.shards), out_dir)
    return meta
