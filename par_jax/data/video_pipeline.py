"""Clip input for the video tokenizer: endless shuffled uint8 clip batches (B, T, S, S, 3) for training (grain, a
random temporal crop per clip, its iterator state checkpointed) and padded, masked eval batches of the fixed
evaluation clips (each video's crop from its first frame). The clip-shaped twin of `image_pipeline.py`, over any
source of `par_jax.data.video` (`config.data.video_source`)."""

from __future__ import annotations

import grain
import jax
import numpy as np
from absl import logging

from par_jax.data import video as video_lib


def video_source(config, split: str) -> video_lib.VideoSource:
    d = config.data
    return video_lib.make_video_source(d.video_source, split=split, num_frames=d.num_frames, frame_size=d.frame_size,
                                       frame_stride=d.get("frame_stride", 1), data_dir=d.tfds_data_dir or None,
                                       download=d.download, count=d.count,
                                       seed=d.seed if split == d.train_split else d.seed + 1)


class _Indices:
    """A grain data source of video indices: the random temporal crop (`video.RandomClips`) runs as a transform,
    so grain's per-element generator makes it reproducible and resumable, and only the crop's frames are decoded."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        return int(index)


class _DropLabel(grain.transforms.Map):
    def map(self, element):
        return np.ascontiguousarray(element[0])


def make_train_loader(config, local_batch: int) -> grain.DataLoader:
    """Endless shuffled uint8 clip batches (local_batch, T, S, S, 3) for this process; its iterator state is
    checkpointed with the run."""
    d = config.data
    source = video_source(config, d.train_split)
    shard = grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(),
                                        drop_remainder=True)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True,
                                          num_epochs=None, seed=d.seed)
    logging.info("tokenizer training clips: %s (%d videos), %d frames at %dpx", source.name, len(source),
                 source.num_frames, source.frame_size)
    return grain.DataLoader(
        data_source=_Indices(len(source)), sampler=sampler, shard_options=shard,
        operations=[video_lib.RandomClips(source), _DropLabel(),
                    grain.transforms.Batch(batch_size=local_batch, drop_remainder=True)],
        worker_count=d.worker_count,
        read_options=grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch))


def eval_batches(config, local_batch: int, num_clips: int):
    """Yields (uint8 (local_batch, T, S, S, 3), valid bool (local_batch,)) over the first `num_clips` evaluation
    clips of the eval split (all of it when <= 0), split over processes; the last batch is padded and masked."""
    d = config.data
    source = video_source(config, d.eval_split)
    total = len(source) if num_clips <= 0 else min(num_clips, len(source))
    count = jax.process_count()
    per_process = -(-total // count)
    start = jax.process_index() * per_process
    indices = list(range(start, min(start + per_process, total)))
    for i in range(0, per_process, local_batch):
        chunk = indices[i:i + local_batch]
        clips = np.zeros((local_batch, d.num_frames, d.frame_size, d.frame_size, 3), np.uint8)
        for j, index in enumerate(chunk):
            clips[j] = source[index][0]
        yield clips, np.arange(local_batch) < len(chunk)
