"""Draw samples from a decoder and decode them to images, batch by batch, on every process.

Shared by the evaluate job, the evaluation plug-in and the sample-grid plug-in of the training loop: labels for a
protocol (`make_labels`), the tokenizer check, the decoder (VQ decode -> the release's bicubic resize -> its uint8
rule), and `generate`, which splits the labels over the processes (`process_batches`), samples each share on its
local devices (or a mesh of them) and yields uint8 images. A decoder with a 3-D grid (T', H', W') is decoded by a
video tokenizer (`is_video`) into uint8 clips (b, T, H, W, 3), each frame resized like an image.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Iterator

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from par_jax import sampling
from par_jax.evaluation import features as features_lib
from par_jax.evaluation import resize
from par_jax.evaluation.settings import LABEL_MODES


def make_labels(num: int, num_classes: int, mode: str = "uniform", seed: int = 0) -> np.ndarray:
    """`num` class ids: i.i.d. uniform (the paper's protocol) or balanced (counts differ by at most one), shuffled."""
    if num < 1 or num_classes < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1; got {num} and {num_classes}.")
    rng = np.random.default_rng(seed)
    if mode == "uniform":
        return rng.integers(0, num_classes, num).astype(np.int32)
    if mode == "balanced":
        return rng.permutation(np.arange(num) % num_classes).astype(np.int32)
    raise ValueError(f"unknown label mode {mode!r}; choose one of {LABEL_MODES}.")


def check_tokenizer(model_config, tokenizer) -> None:
    vq = tokenizer.config
    if vq.codebook_size != model_config.vocab_size:
        raise ValueError(f"the tokenizer has {vq.codebook_size} codes but the model's vocabulary is "
                         f"{model_config.vocab_size}; use the tokenizer the training codes were extracted with "
                         f"(config.data.tokenizer).")
    video = bool(getattr(tokenizer, "is_video", False))
    if video and len(model_config.grid_shape) != 3:
        raise ValueError(f"a video tokenizer decodes (frames, height, width) code grids; the model's grid is "
                         f"{model_config.grid_shape}: decode an image decoder's samples with an image tokenizer.")
    if not video and len(model_config.grid_shape) != 2:
        raise ValueError(f"image evaluation needs a 2-D token grid; the model has {model_config.grid_shape}"
                         + (" (a video decoder: set config.data.tokenizer to its video tokenizer)."
                            if len(model_config.grid_shape) == 3 else "."))


def sample_shape(model_config, tokenizer, resolution: int) -> tuple[int, ...]:
    """Shape of one decoded sample after the resize: (R, R, 3) for images, (T, R, R, 3) for video clips (R is the
    decoded size when `resolution` is 0). Computed abstractly: nothing is decoded."""
    check_tokenizer(model_config, tokenizer)
    codes = jax.ShapeDtypeStruct((1, *model_config.grid_shape), np.int32)
    shape = tuple(jax.eval_shape(lambda c: tokenizer.decode(c), codes).shape[1:])
    if resolution:
        shape = (*shape[:-3], resolution, resolution, shape[-1])
    return shape


def make_decoder(tokenizer, grid_shape, resolution: int) -> Callable[[jax.Array], np.ndarray]:
    """Raster tokens (B, N) -> uint8 images (B, R, R, 3): VQ decode, the release's bicubic resize, its uint8 rule.
    With a video tokenizer and a (T', H', W') grid: uint8 clips (B, T, R, R, 3), every frame resized alike."""
    graphdef, state = nnx.split(tokenizer)
    state = jax.device_put(state, NamedSharding(features_lib.local_mesh(), P()))
    return lambda tokens: np.asarray(_decode(graphdef, tuple(grid_shape), int(resolution), state, tokens))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(graphdef, grid_shape, resolution, state, tokens):
    # Module-level so that repeated evaluations during training reuse the compiled program.
    images = nnx.merge(graphdef, state).decode(tokens.reshape(tokens.shape[0], *grid_shape))
    if resolution and images.ndim == 5:  # clips: frames resized one by one, as images are
        b, t = images.shape[:2]
        frames = resize.resize_bicubic(images.reshape(b * t, *images.shape[2:]), resolution)
        images = frames.reshape(b, t, *frames.shape[1:])
    elif resolution:
        images = resize.resize_bicubic(images, resolution)
    return resize.to_uint8(images)


def host_local(model: nnx.Module) -> nnx.Module:
    """`model` with every parameter whole on this process: parameters split over several processes (FSDP during a
    multi-process training run) are all-gathered (a collective: every process must call it); others pass as they
    are. The sampler then places them on this process's devices."""
    graphdef, state = nnx.split(model)
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    if all(x.is_fully_addressable for x in leaves):
        return model
    from jax.experimental import multihost_utils  # noqa: PLC0415

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x
    return nnx.merge(graphdef, jax.tree.map(whole, state))


def process_batches(num: int, batch_size: int) -> list[np.ndarray]:
    """This process's batches as global sample indices (each up to `batch_size` long; all < `num`).

    Round r covers samples [r * B * P, (r + 1) * B * P) for P processes and batch size B, process p its p-th slice
    of B: the shares are disjoint and cover every sample once, every process runs the same number of rounds (so
    gathers line up; at the end a batch may be short or empty), and the batches of a round gathered in process order
    are the samples in order, whatever the process count.
    """
    count, index = jax.process_count(), jax.process_index()
    rounds = -(-num // (batch_size * count))
    starts = [(r * count + index) * batch_size for r in range(rounds)]
    return [np.arange(min(start, num), min(start + batch_size, num)) for start in starts]


def generate(model, tokenizer, labels: np.ndarray, settings: sampling.SampleSettings, *, key: jax.Array,
             batch_size: int, resolution: int, what: str = "samples", mesh: jax.sharding.Mesh | None = None,
             rules=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield this process's (uint8 images (b, R, R, 3), labels (b,)) batch by batch; with a video tokenizer and a
    3-D grid the images are clips (b, T, R, R, 3).

    Each process samples its share of `labels` (`process_batches`) on its local devices (the Sampler shards a batch
    over them), or on `mesh`, a mesh of them, with the trainer's logical `rules` (sampling/placement.py). Sample i
    draws with its own key fold_in(key, i), so its tokens do not depend on the batch size or the process count; the
    batches of a round, gathered in process order, are the samples in order. Logs progress with images/s and ETA.
    """
    check_tokenizer(model.config, tokenizer)
    sampler = sampling.Sampler(host_local(model), settings, batch_size=batch_size, mesh=mesh, rules=rules)
    decode = make_decoder(tokenizer, model.config.grid_shape, resolution)
    t0, total = time.time(), len(labels)
    batches = process_batches(total, batch_size)
    for b, index in enumerate(batches):
        part = labels[index]
        padded = np.concatenate([part, np.zeros(batch_size - len(part), np.int32)])
        first = index[0] if len(index) else total
        tokens = sampler(padded, sampling.image_keys(key, np.arange(first, first + batch_size)))
        images = decode(tokens)[:len(part)]
        done = min(total, (b + 1) * batch_size * jax.process_count())
        elapsed = time.time() - t0
        rate = done / elapsed if elapsed > 0 else float("nan")
        logging.info("%s: %d/%d images (%.1f%%), %.2f images/s, ETA %s", what, done, total, 100 * done / total, rate,
                     _duration((total - done) / rate) if rate > 0 else "?")
        yield images, part


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
