"""The training input pipeline: grain over pre-extracted codes (or synthetic codes), one random view per sample.

`make_train_loader(config, global_batch_size=...)` returns a grain `IterDataset`. Iterating it gives an endless stream
of batches `{"tokens": int32 (local_batch, N) raster order, "label": int32 (local_batch,)}` for this process:

- every process takes an equal strided share of the records (record p, p + P, p + 2P, ...), shuffled anew every
  epoch with `config.data.seed`, and sees `global_batch_size / process_count` samples per batch;
- batches are built whole (a batched read, then one random view per sample from a generator grain derives from
  the seed, the process and the batch number), so the stream is a pure function of (data, seed, process
  index/count, batch size), whatever `read_threads` and `worker_count` build it;
- the iterator's `get_state()` / `set_state()` (and grain's orbax `CheckpointHandler`) resume it exactly.

`make_eval_loader` is one ordered pass over a fixed split with a fixed view, padded to whole batches with a mask.
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np
from absl import flags, logging

from par_jax.core.config_args import UsageError
from par_jax.data import codes as codes_lib

SOURCES = ("codes", "synthetic")


def make_codes_source(config, codes_dir: str | None = None):
    """`config.data.source` -> a CodesSource or SyntheticCodes checked against `config.model`."""
    data, model = config.data, config.model
    if data.source == "synthetic":
        return codes_lib.SyntheticCodes(count=data.synthetic_count, grid_shape=model.grid_shape,
                                        vocab_size=model.vocab_size, num_classes=model.num_classes,
                                        num_views=data.synthetic_views, noise=data.synthetic_noise, seed=data.seed)
    if data.source != "codes":
        raise UsageError(f"unknown config.data.source {data.source!r}; choose one of {SOURCES}.")
    codes_dir = codes_dir or data.codes_dir
    if not codes_dir:
        raise UsageError("config.data.source='codes' needs --config.data.codes_dir=DIR (written by "
                         "--job=extract_codes), or use --config.data.source=synthetic for a smoke run.")
    source = codes_lib.CodesSource(codes_dir)
    check_compatible(source.metadata, config, codes_dir)
    return source


def training_codes_dir(config) -> str:
    """The codes directory a decoder of `config` trains on, when it trains on codes that exist ("" otherwise): their
    metadata says which tokenizer made them, so that sampling can decode with that one."""
    data = config.get("data") or {}
    directory = str(data.get("codes_dir", "") or "") if data.get("source") == "codes" else ""
    return directory if directory and os.path.exists(os.path.join(directory, codes_lib.METADATA_FILE)) else ""


def num_records(config) -> int:
    """How many training records (images; each holds all its views) `config.data` points at: one epoch."""
    return len(make_codes_source(config))


def check_compatible(meta: codes_lib.CodesMetadata, config, where: str) -> None:
    """Fails before training if the codes cannot feed the model in `config.model`."""
    model = config.model
    grid = tuple(int(g) for g in model.grid_shape)
    problems = []
    if meta.grid_shape != grid:
        if len(meta.grid_shape) != len(grid):  # video codes for an image model, or the reverse
            hint = (f"{'video' if meta.is_video else 'image'} codes need a model with a "
                    f"{'(t, h, w)' if meta.is_video else '(h, w)'} grid_shape")
        elif meta.is_video:
            hint = ("extract codes with the model's num_frames and frame_size, or set config.model.grid_shape to "
                    "the codes' grid")
        else:
            hint = "extract codes at the model's resolution, or change res"
        problems.append(f"the codes are {meta.grid_text} token grids but config.model.grid_shape is {grid} ({hint})")
    if meta.vocab_size > model.vocab_size:
        problems.append(f"the tokenizer has {meta.vocab_size} codes but config.model.vocab_size is {model.vocab_size}")
    if meta.num_classes > model.num_classes:
        problems.append(f"the codes have {meta.num_classes} classes but config.model.num_classes is "
                        f"{model.num_classes}")
    if problems:
        raise UsageError(f"codes in {where} do not fit the model: " + "; ".join(problems) + ".")


def read_records(source, keys) -> list[dict[str, np.ndarray]]:
    keys = [int(k) for k in keys]
    getitems = getattr(source, "__getitems__", None)
    return getitems(keys) if getitems else [source[k] for k in keys]


class ReadBatch(grain.transforms.RandomMap):
    """Record keys (B,) -> {"tokens": int32 (B, N) one random view each (N = h*w, or t*h*w for video),
    "label": int32 (B,)}.

    Works on whole batches: one batched ArrayRecord read and one generator per batch keep the per-sample Python
    cost small, and make a batch's content independent of how many threads or worker processes build batches."""

    def __init__(self, source):
        self.source = source

    def random_map(self, keys, rng: np.random.Generator):
        records = read_records(self.source, keys)
        views = rng.integers(self.source.metadata.num_views, size=len(records))
        return {"tokens": np.stack([r["codes"][v].reshape(-1) for r, v in zip(records, views)]).astype(np.int32),
                "label": np.array([r["label"] for r in records], np.int32)}


def _process(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} outside [0, {count}).")
    return index, count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the number of "
                         f"processes ({process_count}).")
    return global_batch_size // process_count


def make_train_loader(config, *, global_batch_size: int, process_index: int | None = None,
                      process_count: int | None = None) -> grain.IterDataset:
    """The endless, shuffled, per-process training stream (see the module docstring)."""
    data = config.data
    process_index, process_count = _process(process_index, process_count)
    batch = local_batch_size(global_batch_size, process_count)
    source = make_codes_source(config)
    if isinstance(source, codes_lib.CodesSource):
        if codes_lib.shard_bytes(source) <= codes_lib.VERIFY_AT_START_BYTES:
            codes_lib.verify_source(source)  # a damaged record stops the run now, not when first read
        else:
            logging.info("codes in %s are too large to verify at start; `python -m par_jax.data.verify --codes_dir=%s` "
                         "reads and checks every record ahead of a run", source.directory, source.directory)
    if len(source) < process_count:
        raise ValueError(f"{len(source)} records cannot be split over {process_count} processes.")
    if not 0 <= data.seed < 2**32:
        raise UsageError(f"config.data.seed must be in [0, 2**32), got {data.seed}.")
    # Equal shares (the remainder is dropped) keep the processes' epochs in step; striding gives every process a
    # share of every class even when the records are sorted by class.
    keys = grain.MapDataset.range(len(source) // process_count * process_count)[process_index::process_count]
    if data.shuffle:
        keys = keys.shuffle(seed=data.seed)  # a new permutation every epoch (grain reseeds per epoch)
    # Each process draws its views from its own stream: same seed, other process -> independent choices.
    view_seed = int(np.random.SeedSequence((data.seed, process_index)).generate_state(1)[0])
    ds = keys.repeat().batch(batch, drop_remainder=True).random_map(ReadBatch(source), seed=view_seed)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch))
    if data.worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # grain reads its absl flags when it starts workers; parsing them is the program's edge's business.
            raise RuntimeError("config.data.worker_count > 0 starts grain worker processes, and grain reads its absl "
                               "flags: run under an absl app (every par_jax command does), call "
                               "absl.flags.FLAGS.mark_as_parsed() first (tests, notebooks), or set "
                               "config.data.worker_count=0.")
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    return ds


def make_eval_loader(config, *, global_batch_size: int, codes_dir: str | None = None, view: int | None = None,
                     process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """One ordered pass over a fixed split (`codes_dir`, default `config.data.eval_codes_dir`, else the training
    codes) with one view (default: the metadata's unflipped centre view). Re-iterable. Batches have a fixed shape:
    the last ones are padded with copies of a real record and `"mask"` (bool) marks the real samples. Each process
    reads its own contiguous part, and all processes yield the same number of batches (for collective steps)."""
    data = config.data
    process_index, process_count = _process(process_index, process_count)
    batch = local_batch_size(global_batch_size, process_count)
    source = make_codes_source(config, (codes_dir or data.eval_codes_dir or None) if data.source == "codes" else None)
    meta = source.metadata
    view = meta.eval_view if view is None else view
    if not 0 <= view < meta.num_views:
        raise ValueError(f"view {view} outside [0, {meta.num_views}).")
    if len(source) < process_count:
        raise ValueError(f"{len(source)} evaluation records cannot be split over {process_count} processes.")
    start, end = (len(source) * process_index) // process_count, (len(source) * (process_index + 1)) // process_count
    per_process = -(-len(source) // process_count)
    num_batches = -(-per_process // batch)

    n = end - start

    def read_batch(slots):
        records = read_records(source, [start + min(int(k), n - 1) for k in slots])
        return {"tokens": np.stack([r["codes"][view].reshape(-1) for r in records]).astype(np.int32),
                "label": np.array([r["label"] for r in records], np.int32),
                "mask": np.asarray(slots) < n}

    return (grain.MapDataset.range(num_batches * batch).batch(batch).map(read_batch)
            .to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch)))
