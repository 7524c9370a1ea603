"""A small video classifier, trained by the project on Moving Fashion-MNIST clips, as the offline video feature network.

The Kinetics I3D that FVD needs has to be copied in (evaluation/i3d.py), and its features of 32 px clips of bouncing
clothes would say little anyway, so the video demo scores its samples with this network: its penultimate layer
(128-d) gives the Frechet distance (reported as `fd_video_classifier`, never as FVD), precision and recall, and its
logits give class consistency (the predicted garment against the label the clip was generated for). These numbers
compare runs of this project that use the same classifier checkpoint, nothing published.

The class of a Moving Fashion-MNIST clip is its garment; its motion is random. So the network looks at each frame
with a shared 2-D CNN, max-pools over space (where the garment is does not matter), then runs a temporal convolution
over the frame embeddings (so features see frame-to-frame changes: a garment that flickers or jumps moves them)
and pools over time. Input: uint8 clips (B, T, H, W, 1 or 3), any T >= 1; channels are averaged to grey and frames
of another size are resized to 32x32.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from par_jax.evaluation import classifier as image_classifier

FRAME_SIZE = 32
NUM_FRAMES = 17
NUM_CLASSES = 10
FEATURE_DIM = 128
SOURCE = "moving_fashion_mnist"


class VideoClassifier(nnx.Module):
    """Per frame three 3x3 convs of stride 2 (16, 32, 64 channels) - spatial max; temporal conv64 (k=3) - time
    mean and max; dense128 (features) - dense10 (logits). Strided convolutions rather than conv + pool: a quarter
    of the arithmetic, which decides whether this trains in a minute or ten on two CPU cores."""

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        self.conv1 = nnx.Conv(1, 16, (3, 3), (2, 2), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), (2, 2), rngs=rngs)
        self.conv3 = nnx.Conv(32, 64, (3, 3), (2, 2), rngs=rngs)
        self.temporal = nnx.Conv(64, 64, (3,), rngs=rngs)
        self.dense = nnx.Linear(2 * 64, FEATURE_DIM, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, num_classes, rngs=rngs)

    def features(self, clips) -> jax.Array:
        """Penultimate features (B, 128) of uint8 / [0, 255] clips (B, T, H, W, C)."""
        x = preprocess(clips)
        b, t = x.shape[:2]
        x = x.reshape(b * t, *x.shape[2:])
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        x = jnp.max(jax.nn.relu(self.conv3(x)), axis=(1, 2)).reshape(b, t, -1)
        x = jax.nn.relu(self.temporal(x))
        x = jnp.concatenate([jnp.mean(x, axis=1), jnp.max(x, axis=1)], axis=-1)
        return jax.nn.relu(self.dense(x))

    def __call__(self, clips) -> dict[str, jax.Array]:
        """{"pool": (B, 128) features, "logits": (B, 10)}, the feature-network outputs evaluation reads."""
        features = self.features(clips)
        return {"pool": features, "logits": self.head(self.dropout(features))}


def preprocess(clips):
    """(B, T, H, W, C) in [0, 255] -> grey (B, T, 32, 32, 1) in [-1, 1]."""
    if clips.ndim != 5 or clips.shape[-1] not in (1, 3):
        raise ValueError(f"the video classifier takes clips (batch, frames, height, width, 1 or 3) in [0, 255]; "
                         f"got shape {tuple(clips.shape)}.")
    x = jnp.mean(clips.astype(jnp.float32), axis=-1, keepdims=True) / 127.5 - 1.0
    if x.shape[2:4] != (FRAME_SIZE, FRAME_SIZE):
        x = jax.image.resize(x, (*x.shape[:2], FRAME_SIZE, FRAME_SIZE, 1), "linear")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    log_every: int = 50
    source: str = SOURCE             # a par_jax.data.video source spec
    num_frames: int = NUM_FRAMES
    frame_size: int = FRAME_SIZE
    test_clips: int = 1000           # clips of the test split scored (0 = all)
    train_frames: int = 4            # a random window of this many frames per training clip (0 = all): features
                                     # pool over time, so they accept any length, and the frames of one clip show
                                     # one garment, so more clips of fewer frames teach more for the same cost


def _source(settings: TrainSettings, split: str):
    from par_jax.data import video  # noqa: PLC0415
    return video.make_video_source(settings.source, split=split, num_frames=settings.num_frames,
                                   frame_size=settings.frame_size)


def _reader(source) -> tuple[image_classifier.Reader, int]:
    def read(index):
        items = [source[int(i)] for i in index]
        return np.stack([c for c, _ in items]), np.asarray([y for _, y in items], np.int32)
    return read, len(source)


def _array_reader(clips: np.ndarray, labels: np.ndarray) -> tuple[image_classifier.Reader, int]:
    clips, labels = np.asarray(clips), np.asarray(labels, np.int32)
    if clips.ndim != 5 or clips.dtype != np.uint8 or labels.shape != (len(clips),):
        raise ValueError(f"clips must be uint8 (N, T, H, W, C) with (N,) labels; got {clips.dtype} {clips.shape} "
                         f"and {labels.shape}.")
    return (lambda index: (clips[index], labels[index])), len(clips)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

def accuracy(model: VideoClassifier, clips: np.ndarray, labels: np.ndarray, batch_size: int = 100) -> float:
    """Top-1 accuracy on uint8 clips (N, T, H, W, C)."""
    return image_classifier.accuracy_of(model, *_array_reader(clips, labels), batch_size)


def train(settings: TrainSettings = TrainSettings(), *, data: tuple[np.ndarray, np.ndarray] | None = None
          ) -> tuple[VideoClassifier, list[dict[str, float]]]:
    """Train on the train split of `settings.source` (or `data` = uint8 clips (N, T, H, W, C), labels (N,));
    returns (model in eval mode, loss history)."""
    read, count = _reader(_source(settings, "train")) if data is None else _array_reader(*data)
    rng = np.random.default_rng(settings.seed)
    model = VideoClassifier(rngs=nnx.Rngs(settings.seed))

    def next_batch():  # random clips, each cut to a random window of train_frames frames
        clips, labels = read(rng.integers(0, count, settings.batch_size))
        if settings.train_frames and clips.shape[1] > settings.train_frames:
            first = int(rng.integers(0, clips.shape[1] - settings.train_frames + 1))
            clips = clips[:, first:first + settings.train_frames]
        return clips, labels

    return model, image_classifier.fit(model, settings, next_batch, name="video classifier", inputs="clips")


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------

def save(directory, model: VideoClassifier, metadata: dict[str, Any]) -> epath.Path:
    """Write params + a JSON record to `directory`, which must not exist (the image classifier's format)."""
    return image_classifier.save(directory, model, {**metadata, "kind": "video_classifier"})


def load(directory) -> tuple[VideoClassifier, dict[str, Any]]:
    """(model in eval mode, metadata) from a directory written by `save`."""
    return image_classifier.restore(directory, lambda: VideoClassifier(rngs=nnx.Rngs(0)), kind="video_classifier",
                                    name="video classifier", command="par_jax.evaluation.video_classifier")


def load_or_train(directory, settings: TrainSettings = TrainSettings(), *,
                  data: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[VideoClassifier, dict[str, Any]]:
    """The video classifier saved in `directory`, trained on `settings.source`'s train split, scored on its test
    split and saved first if it is absent (1-2 minutes on a CPU). `data` = ((train clips, labels), (test clips,
    labels)) replaces the source (tests)."""
    if (epath.Path(directory) / "params").exists():
        return load(directory)
    logging.info("training the video evaluation classifier into %s", directory)
    start = time.time()
    model, history = train(settings, data=None if data is None else data[0])
    if data is None:
        read, count = _reader(_source(settings, "test"))
        described = f"{settings.source}: {settings.num_frames} frames at {settings.frame_size} px"
    else:
        read, count = _array_reader(*data[1])
        described = "clips given in memory"
    count = min(count, settings.test_clips) if settings.test_clips else count
    test_accuracy = image_classifier.accuracy_of(model, read, count, 100)
    metadata = {"test_accuracy": test_accuracy, "test_clips": count,
                "train_seconds": round(time.time() - start, 1), "train_settings": dataclasses.asdict(settings),
                "history": history, "data": described + " (train split; scored on the test split)",
                "backend": jax.default_backend()}
    logging.info("video classifier test accuracy %.4f on %d clips (%.0f s)", test_accuracy, count,
                 metadata["train_seconds"])
    save(directory, model, metadata)
    return model, metadata


def _define_flags(fv, argv) -> None:
    from absl import flags  # noqa: PLC0415
    del argv
    flags.DEFINE_string("out", "workdirs/video_classifier", "Where the classifier is (or is saved once trained).",
                        flag_values=fv)
    flags.DEFINE_integer("steps", TrainSettings.steps, "Training steps when it has to be trained.", flag_values=fv)
    flags.DEFINE_integer("num_frames", NUM_FRAMES, "Frames per training clip.", flag_values=fv)


def main(argv=None) -> None:
    """`python -m par_jax.evaluation.video_classifier [--out=DIR] [--steps=N]`: train (or load) the Moving
    Fashion-MNIST video classifier and print its record."""
    from par_jax.core import config_args  # noqa: PLC0415
    f = config_args.parse_flags(argv, _define_flags, doc=main.__doc__)
    logging.set_verbosity(logging.INFO)
    _, metadata = load_or_train(f.out, TrainSettings(steps=f.steps, num_frames=f.num_frames))
    print(json.dumps({k: v for k, v in metadata.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    from par_jax.core import config_args
    config_args.run(main)
