"""Image input for the tokenizer: endless shuffled uint8 image batches for training (grain, its iterator state
checkpointed) and the padded, masked eval batches, over any image source of `par_jax.data.sources`. Beside
`pipeline.py`, the decoder's codes input."""

from __future__ import annotations

import grain
import jax
import numpy as np
from absl import logging

from par_jax.data import sources as sources_lib
from par_jax.data import views as views_lib

TRAIN_VIEWS = ("pad", "resize", "center", "random_crop")
EVAL_VIEWS = ("pad", "resize", "center")


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator, min_crop_frac: float = 0.8) -> np.ndarray:
    """LlamaGen's training crop: scale the short side to a random length in [size, size / min_crop_frac], then take
    a random size x size crop."""
    h, w = image.shape[:2]
    short = rng.uniform(size, size / min_crop_frac)
    scale = short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    from PIL import Image  # noqa: PLC0415
    image = np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.Resampling.BICUBIC))
    top, left = rng.integers(0, nh - size + 1), rng.integers(0, nw - size + 1)
    return image[top:top + size, left:left + size]


class TrainView(grain.transforms.RandomMap):
    """(image uint8 (H, W, 3), label) -> uint8 (size, size, 3): the configured view, optionally flipped."""

    def __init__(self, size: int, view: str, flip: bool):
        self.size, self.view, self.flip = size, view, flip

    def random_map(self, element, rng: np.random.Generator):
        image = element[0]
        if self.view == "random_crop":
            image = random_crop(image, self.size, rng)
        else:
            image = views_lib.make_views(image, self.view, self.size)[0]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)


class EvalView(grain.transforms.Map):
    def __init__(self, size: int, view: str):
        self.size, self.view = size, view

    def map(self, element):
        return views_lib.make_views(element[0], self.view, self.size)[0]


def image_source(config, split: str):
    d = config.data
    return sources_lib.make_image_source(d.image_source, split=split, data_dir=d.tfds_data_dir or None,
                                         download=d.download, image_size=d.image_size, count=d.synthetic_count,
                                         seed=d.seed if split == d.train_split else d.seed + 1)


def make_train_loader(config, local_batch: int) -> grain.DataLoader:
    """Endless shuffled uint8 batches (local_batch, S, S, 3) for this process; its iterator state is checkpointed."""
    d = config.data
    if d.train_view not in TRAIN_VIEWS:
        raise ValueError(f"unknown data.train_view {d.train_view!r}; choose one of {TRAIN_VIEWS}.")
    source = image_source(config, d.train_split)
    shard = grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(),
                                        drop_remainder=True)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True,
                                          num_epochs=None, seed=d.seed)
    logging.info("tokenizer training images: %s (%d), view %s at %dpx", source.name, len(source), d.train_view,
                 d.image_size)
    return grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=shard,
        operations=[TrainView(d.image_size, d.train_view, d.flip),
                    grain.transforms.Batch(batch_size=local_batch, drop_remainder=True)],
        worker_count=d.worker_count,
        read_options=grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch))


def eval_batches(config, local_batch: int, num_images: int):
    """Yields (uint8 (local_batch, S, S, 3), valid bool (local_batch,)) over the first `num_images` images of the
    eval split (all of it when <= 0), split over processes; the last batch is padded and masked."""
    d = config.data
    if d.eval_view not in EVAL_VIEWS:
        raise ValueError(f"unknown data.eval_view {d.eval_view!r}; choose one of {EVAL_VIEWS}.")
    source = image_source(config, d.eval_split)
    total = len(source) if num_images <= 0 else min(num_images, len(source))
    count = jax.process_count()
    per_process = -(-total // count)
    start = jax.process_index() * per_process
    indices = list(range(start, min(start + per_process, total)))
    view = EvalView(d.image_size, d.eval_view)
    for i in range(0, per_process, local_batch):
        chunk = indices[i:i + local_batch]
        images = np.zeros((local_batch, d.image_size, d.image_size, 3), np.uint8)
        for j, index in enumerate(chunk):
            images[j] = view.map(source[index])
        yield images, np.arange(local_batch) < len(chunk)
