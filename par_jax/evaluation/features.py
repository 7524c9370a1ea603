"""Feature networks behind one interface, and feature extraction over batches of images.

A `FeatureNetwork` maps uint8 images (B, H, W, 3) to a dict with `pool` (B, D) (FID, precision/recall) and the
logits its Inception Score uses; Inception adds `spatial` (sFID). Video networks take uint8 clips (B, T, H, W, 3)
instead, and name their Frechet distance (`frechet_key`). Four are built in:

  inception          the FID InceptionV3 (ADM-comparable once its weight file is given; see inception.py)
  fmnist_classifier  the project's Fashion-MNIST CNN (offline; numbers NOT comparable with ImageNet FID/IS)
  i3d                the Kinetics-400 I3D of FVD (its 400 logits; needs its weight file; see i3d.py) -> `fvd`
  video_classifier   the project's Moving Fashion-MNIST clip classifier (offline) -> `fd_video_classifier`

Images are split over this process's devices along the batch (a 1-D `data` mesh, parameters replicated) in
fixed-size padded batches, so each resolution compiles once; results come back to the host as NumPy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from par_jax.core import paths
from par_jax.evaluation import metrics

NETWORKS = ("inception", "fmnist_classifier", "i3d", "video_classifier")
VIDEO_NETWORKS = ("i3d", "video_classifier")


def local_mesh() -> jax.sharding.Mesh:
    """This process's devices on one `data` axis (evaluation is embarrassingly parallel over images; with several
    processes each one handles its own share and the features are gathered on the host, see `gather`)."""
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def gather(x: np.ndarray) -> np.ndarray:
    """Every process's rows of `x`, concatenated in process order, on every process (identity for one process)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils  # noqa: PLC0415
    sizes = np.ravel(multihost_utils.process_allgather(np.asarray([len(x)])))
    most = int(np.max(sizes))
    padded = np.concatenate([x, np.zeros((most - len(x), *x.shape[1:]), x.dtype)])
    parts = multihost_utils.process_allgather(padded)
    return np.concatenate([p[:int(n)] for p, n in zip(parts, sizes)])


@dataclasses.dataclass
class FeatureNetwork:
    """A feature network as evaluation sees it. `name` and `description` are recorded beside every result."""
    name: str
    description: str
    apply: Callable[[jax.Array], dict[str, jax.Array]]  # compiled, batch sharded over `data`
    batch_size: int                    # images per call (a multiple of the local device count)
    score_logits: str = "logits"       # output used by the Inception Score
    has_spatial: bool = False          # `spatial` output (sFID)
    num_classes: int = 0               # classes of the logits
    label_space: str | None = None     # the dataset whose labels the logits predict (enables class consistency)
    comparable_to_published: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded (weights file, test accuracy, ...)
    video: bool = False                # takes clips (N, T, H, W, 3) instead of images
    frechet_key: str = "fid"           # the name its Frechet distance is reported under (video: fvd only for I3D)

    def __call__(self, images) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) host images (clips (N, T, H, W, 3) for a video network) -> {output: (N, ...) NumPy},
        in padded batches of `batch_size`."""
        images = np.asarray(images)
        if images.ndim != (5 if self.video else 4) or images.shape[-1] != 3:
            raise ValueError(f"the {self.name} feature network takes RGB "
                             f"{'clips (N, T, H, W, 3)' if self.video else 'images (N, H, W, 3)'}; got shape "
                             f"{images.shape}.")
        sharding = NamedSharding(local_mesh(), P("data"))
        outputs: dict[str, list[np.ndarray]] = {}
        # No images still runs one (padded) batch: empty outputs of the right shapes, which `gather` needs when one
        # process's share of a round is empty.
        for start in range(0, max(len(images), 1), self.batch_size):
            batch = images[start:start + self.batch_size]
            valid = len(batch)
            if valid < self.batch_size:
                batch = np.concatenate([batch, np.zeros((self.batch_size - valid, *batch.shape[1:]), batch.dtype)])
            result = self.apply(jax.device_put(batch, sharding))
            for key, value in result.items():
                outputs.setdefault(key, []).append(np.asarray(value)[:valid])
        return {k: np.concatenate(v) for k, v in outputs.items()}


def _compile(model: nnx.Module, batch_size: int) -> tuple[Callable, int]:
    devices = jax.local_device_count()
    batch_size = -(-batch_size // devices) * devices  # round up so every device gets the same share
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(local_mesh(), P()))
    return (lambda images: _apply(graphdef, state, images)), batch_size


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images):
    # Module-level, keyed by the network's structure: rebuilding a network (each evaluation during training, the
    # job's reference and sample passes) reuses the compiled program.
    return nnx.merge(graphdef, state)(images)


def inception_network(weights_path: str, *, batch_size: int = 64) -> FeatureNetwork:
    from par_jax.evaluation import inception  # noqa: PLC0415

    if not weights_path:
        raise ValueError(f"the inception feature network needs its weight file: set "
                         f"--config.eval.inception_weights=/path/to/{inception.WEIGHTS_FILE} (download "
                         f"{inception.WEIGHTS_URL} where there is internet), or use "
                         f"--config.eval.feature_network=fmnist_classifier for the offline demo.")
    apply, batch_size = _compile(inception.load(weights_path), batch_size)
    return FeatureNetwork(
        name="inception_v3_fid", apply=apply, batch_size=batch_size, score_logits="logits_unbiased",
        has_spatial=True, num_classes=inception.NUM_CLASSES, comparable_to_published=True,
        description=("FID InceptionV3 (TF 2015 graph weights, PyTorch port) in Flax: pool_3 features for FID and "
                     "precision/recall, unbiased softmax logits for IS, mixed_6/conv[:7] for sFID; comparable with "
                     "ADM-evaluator numbers up to the port's numerical differences (docs/evaluation.md)."),
        info={"weights": weights_path})


def classifier_network(directory: str, *, batch_size: int = 256) -> FeatureNetwork:
    from par_jax.evaluation import classifier  # noqa: PLC0415

    model, metadata = classifier.load_or_train(directory)
    apply, batch_size = _compile(model, batch_size)
    return FeatureNetwork(
        name="fmnist_classifier", apply=apply, batch_size=batch_size, num_classes=classifier.NUM_CLASSES,
        label_space="fashion_mnist", comparable_to_published=False,
        description=(f"par_jax Fashion-MNIST CNN (test accuracy {metadata.get('test_accuracy', float('nan')):.4f}): "
                     f"{classifier.FEATURE_DIM}-d penultimate features and its logits. Offline numbers, NOT "
                     f"comparable with ImageNet / Inception FID or IS."),
        info={"checkpoint": str(directory), "test_accuracy": metadata.get("test_accuracy")})


def i3d_network(weights_path: str, *, batch_size: int = 8) -> FeatureNetwork:
    from par_jax.evaluation import i3d  # noqa: PLC0415

    if not weights_path:
        from par_jax.core.config_args import UsageError  # noqa: PLC0415
        raise UsageError(f"the i3d feature network (FVD) needs its weight file: set "
                         f"--config.eval.i3d_weights=/path/to/{i3d.WEIGHTS_FILE} (docs/evaluation.md, 'Video'), or "
                         f"use --config.eval.feature_network=video_classifier offline.")
    model = i3d.load(weights_path)
    apply, batch_size = _compile(model, batch_size)
    # FVD's features are the 400 Kinetics logits, so they are both the Frechet features and the "logits".
    return FeatureNetwork(
        name="i3d_kinetics400", apply=lambda clips: _fvd_outputs(apply(clips)), batch_size=batch_size,
        num_classes=i3d.NUM_CLASSES, comparable_to_published=True, video=True, frechet_key="fvd",
        description=("Kinetics-400 I3D (pytorch-i3d rgb_imagenet weights) in Flax: frames TF1-bilinear to 224x224, "
                     "[-1, 1], the 400 time-averaged logits as features (FVD, Unterthiner et al. 2018); comparable "
                     "with published FVD up to the port's numerical differences and the clip protocol (frames, "
                     "resolution, number of clips)."),
        info={"weights": weights_path})


def _fvd_outputs(out):
    return {"pool": out["logits"], "logits": out["logits"]}


def video_classifier_network(directory: str, *, batch_size: int = 64) -> FeatureNetwork:
    from par_jax.evaluation import video_classifier  # noqa: PLC0415

    model, metadata = video_classifier.load_or_train(directory)
    apply, batch_size = _compile(model, batch_size)
    return FeatureNetwork(
        name="video_classifier", apply=apply, batch_size=batch_size, num_classes=video_classifier.NUM_CLASSES,
        label_space="fashion_mnist", comparable_to_published=False, video=True, frechet_key="fd_video_classifier",
        description=(f"par_jax Moving Fashion-MNIST clip classifier (test accuracy "
                     f"{metadata.get('test_accuracy', float('nan')):.4f}): {video_classifier.FEATURE_DIM}-d "
                     f"penultimate features and its logits. Its Frechet distance is NOT FVD (no I3D, no Kinetics): "
                     f"offline numbers for comparing runs of this project."),
        info={"checkpoint": str(directory), "test_accuracy": metadata.get("test_accuracy"),
              "train_seconds": metadata.get("train_seconds")})


def check(settings) -> None:
    """Cheap checks that the feature network named by the settings can be built (its weight file exists)."""
    if settings.feature_network not in NETWORKS:
        raise ValueError(f"unknown feature network {settings.feature_network!r}; choose one of {NETWORKS}.")
    if settings.feature_network == "i3d" and not (settings.i3d_weights and paths.exists(settings.i3d_weights)):
        raise FileNotFoundError(f"config.eval.i3d_weights={settings.i3d_weights!r} does not exist; the i3d feature "
                                f"network (FVD) needs the I3D weight file (docs/evaluation.md, 'Video').")
    if settings.feature_network == "inception" and not (settings.inception_weights and
                                                        paths.exists(settings.inception_weights)):
        raise FileNotFoundError(f"config.eval.inception_weights={settings.inception_weights!r} does not exist; the "
                                f"inception feature network needs the FID weight file.")


def build(settings) -> FeatureNetwork:
    """The feature network named by `settings.feature_network` (an `EvalSettings`)."""
    name = settings.feature_network
    if name == "inception":
        return inception_network(settings.inception_weights, batch_size=settings.feature_batch_size)
    if name == "fmnist_classifier":
        return classifier_network(settings.classifier, batch_size=settings.feature_batch_size)
    if name == "i3d":
        return i3d_network(settings.i3d_weights, batch_size=settings.feature_batch_size)
    if name == "video_classifier":
        return video_classifier_network(settings.classifier, batch_size=settings.feature_batch_size)
    raise ValueError(f"unknown feature network {name!r}; choose one of {NETWORKS}.")


# ----------------------------------------------------------------------------------------------------------------
# Collected features
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Features:
    """Features of one image set: raw pool features and score logits, and streaming statistics.

    `stored` holds statistics read from a reference file (ADM reference batches carry `mu`/`sigma` for pool and
    `mu_s`/`sigma_s` for spatial features); when present they are used for the Frechet distances, as ADM does.
    """
    pool: np.ndarray
    logits: np.ndarray
    labels: np.ndarray | None
    pool_stats: metrics.StatsAccumulator
    spatial_stats: metrics.StatsAccumulator | None
    stored: dict[str, metrics.FeatureStats] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.pool)

    def stats(self, kind: str = "pool", *, min_samples: int | None = None) -> metrics.FeatureStats:
        if kind in self.stored:
            return self.stored[kind]
        acc = self.pool_stats if kind == "pool" else self.spatial_stats
        if acc is None:
            raise ValueError(f"no {kind!r} features were collected (the feature network has none).")
        return acc.result(min_samples=min_samples)


class FeatureCollector:
    """Feeds image batches through a network, keeping pool features and logits and accumulating statistics."""

    def __init__(self, network: FeatureNetwork):
        self.network = network
        self._pool, self._logits, self._labels = [], [], []
        self._pool_stats = metrics.StatsAccumulator()
        self._spatial_stats = metrics.StatsAccumulator() if network.has_spatial else None

    def add(self, images, labels=None, *, local: bool = False) -> None:
        """Add a batch. `local=True`: each process passes its own images and the features (not the images) are
        gathered from all processes."""
        out = self.network(images)
        if local:
            out = {k: gather(v) for k, v in out.items()}
            labels = None if labels is None else gather(labels)
        self._pool.append(out["pool"].astype(np.float32))
        self._logits.append(out[self.network.score_logits].astype(np.float32))
        self._pool_stats.update(out["pool"])
        if self._spatial_stats is not None:
            self._spatial_stats.update(out["spatial"])
        if labels is not None:
            self._labels.append(np.asarray(labels))

    def result(self) -> Features:
        if not self._pool:
            raise ValueError("no images were added.")
        labels = np.concatenate(self._labels) if self._labels else None
        return Features(np.concatenate(self._pool), np.concatenate(self._logits), labels, self._pool_stats,
                        self._spatial_stats)


def collect(network: FeatureNetwork, batches: Iterable, *, log_every: int = 0) -> Features:
    """Features of an iterable of uint8 image batches (or (images, labels) pairs)."""
    collector = FeatureCollector(network)
    done = 0
    for i, batch in enumerate(batches):
        images, labels = batch if isinstance(batch, tuple) else (batch, None)
        collector.add(images, labels)
        done += len(images)
        if log_every and (i + 1) % log_every == 0:
            logging.info("features (%s): %d images", network.name, done)
    return collector.result()
