"""Generation metrics: draw samples from a model, extract their features, score them against a reference set.

Shared by the evaluate job (`job.py`: the full, recorded protocol) and the training loop (`evaluate` below, a
`par_jax.training.evaluators` plug-in). Metrics are plug-ins too, chosen by name from `config.eval.metrics`:

  fid                Frechet distance of pool features (FID with Inception)
  sfid               Frechet distance of Inception's spatial features (ADM's sFID)
  is                 Inception Score (mean and std over splits of `is_split_size`)
  precision_recall   k-NN manifold precision and recall (k = `pr_k`, 3 as in ADM)
  class_consistency  accuracy of the feature network's classifier on samples against their requested labels
                     (only for a network trained on the generator's own classes, e.g. fmnist_classifier)
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from par_jax.evaluation import features as features_lib
from par_jax.evaluation import metrics, npz, resize

LABEL_MODES = ("uniform", "balanced")


# ----------------------------------------------------------------------------------------------------------------
# Metrics registry
# ----------------------------------------------------------------------------------------------------------------

def _min_samples(ec) -> int | None:
    return int(ec.get("fid_min_samples", 0)) or None


def _fid(samples, reference, network, ec) -> dict[str, float]:
    kw = {"min_samples": _min_samples(ec)}
    return {"fid": metrics.frechet_distance(samples.stats("pool", **kw), reference.stats("pool", **kw))}


def _sfid(samples, reference, network, ec) -> dict[str, float]:
    if not network.has_spatial:
        raise ValueError(f"sfid needs spatial features; the {network.name} network has none (drop 'sfid' from "
                         f"config.eval.metrics).")
    kw = {"min_samples": _min_samples(ec)}
    return {"sfid": metrics.frechet_distance(samples.stats("spatial", **kw), reference.stats("spatial", **kw))}


def _inception_score(samples, reference, network, ec) -> dict[str, float]:
    mean, std = metrics.inception_score(samples.logits, split_size=int(ec.is_split_size))
    return {"inception_score": mean, "inception_score_std": std}


def _precision_recall(samples, reference, network, ec) -> dict[str, float]:
    precision, recall = metrics.precision_recall(reference.pool, samples.pool, k=int(ec.pr_k))
    return {"precision": precision, "recall": recall}


def _class_consistency(samples, reference, network, ec) -> dict[str, float]:
    if network.label_space is None:
        raise ValueError(f"class_consistency needs a feature network trained on the generator's classes; "
                         f"{network.name} is not (use feature_network=fmnist_classifier for Fashion-MNIST).")
    if samples.labels is None:
        raise ValueError("class_consistency needs the labels the samples were generated for.")
    return {"class_consistency": metrics.class_consistency(samples.logits, samples.labels)}


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "fid": _fid, "sfid": _sfid, "is": _inception_score, "precision_recall": _precision_recall,
    "class_consistency": _class_consistency,
}


def metric_names(ec) -> list[str]:
    names = [m.strip() for m in str(ec.metrics).split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"config.eval.metrics={ec.metrics!r}: unknown or no metrics {unknown}; choose from "
                         f"{sorted(METRICS)} (comma-separated).")
    return names


def compute_metrics(names, samples, reference, network, ec) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        out.update(METRICS[name](samples, reference, network, ec))
    return out


def check_network(names, network) -> None:
    """Fail before any sampling when a requested metric cannot be computed with this network."""
    if "sfid" in names and not network.has_spatial:
        raise ValueError(f"sfid needs spatial features, which {network.name} lacks; drop it from config.eval.metrics.")
    if "class_consistency" in names and network.label_space is None:
        raise ValueError(f"class_consistency needs a classifier of the generator's classes; {network.name} is not.")


# ----------------------------------------------------------------------------------------------------------------
# Labels and sampling
# ----------------------------------------------------------------------------------------------------------------

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


def make_decoder(tokenizer, grid_shape, resolution: int) -> Callable[[jax.Array], np.ndarray]:
    """Raster tokens (B, N) -> uint8 images (B, R, R, 3): VQ decode, the release's bicubic resize, its uint8 rule."""
    graphdef, state = nnx.split(tokenizer)
    state = jax.device_put(state, NamedSharding(features_lib.local_mesh(), P()))
    return lambda tokens: np.asarray(_decode(graphdef, tuple(grid_shape), int(resolution), state, tokens))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode(graphdef, grid_shape, resolution, state, tokens):
    # Module-level so that repeated evaluations during training reuse the compiled program.
    images = nnx.merge(graphdef, state).decode(tokens.reshape(tokens.shape[0], *grid_shape))
    if resolution:
        images = resize.resize_bicubic(images, resolution)
    return resize.to_uint8(images)


def tokenizer_path(config) -> str:
    """The tokenizer that decodes samples: config.sample.tokenizer, else the one the codes came from."""
    path = config.sample.get("tokenizer", "") or config.data.get("tokenizer", "")
    if not path:
        raise ValueError("evaluation decodes samples to images and needs a tokenizer: set --config.data.tokenizer "
                         "(the one the training codes were extracted with) or --config.sample.tokenizer.")
    return str(path)


def check_tokenizer(model_config, tokenizer) -> None:
    vq = tokenizer.config
    if vq.codebook_size != model_config.vocab_size:
        raise ValueError(f"the tokenizer has {vq.codebook_size} codes but the model's vocabulary is "
                         f"{model_config.vocab_size}; use the tokenizer the training codes were extracted with "
                         f"(config.data.tokenizer).")
    if len(model_config.grid_shape) != 2:
        raise ValueError(f"image evaluation needs a 2-D token grid; the model has {model_config.grid_shape}.")


def generate(model, tokenizer, labels: np.ndarray, settings, *, seed: int, batch_size: int, resolution: int,
             what: str = "samples") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield this process's (uint8 images (b, R, R, 3), labels (b,)) batch by batch.

    Each process samples its own contiguous share of `labels` on its local devices (the Sampler shards a batch over
    them), in the same number of batches on every process (so gathers line up; a short share yields short or empty
    batches). With one process the batches cover `labels` in order. The batch starting at global sample i uses the
    key fold_in(key(seed), i): a run is reproducible for a given batch size and process count. Logs progress with
    images/s and ETA.
    """
    from par_jax import sampling  # noqa: PLC0415

    check_tokenizer(model.config, tokenizer)
    start, end, share = features_lib.process_share(len(labels))
    local = labels[start:end]
    sampler = sampling.Sampler(model, settings, batch_size=batch_size)
    decode = make_decoder(tokenizer, model.config.grid_shape, resolution)
    base_key = jax.random.key(seed)
    t0, total = time.time(), len(labels)
    num_batches = -(-share // batch_size)
    for b in range(num_batches):
        part = local[b * batch_size:(b + 1) * batch_size]
        padded = np.concatenate([part, np.zeros(batch_size - len(part), np.int32)])
        tokens = sampler(padded, jax.random.fold_in(base_key, start + b * batch_size))
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


# ----------------------------------------------------------------------------------------------------------------
# Reference sets
# ----------------------------------------------------------------------------------------------------------------

def _reference_images(ec, data_config, batch_size: int) -> tuple[Iterator[np.ndarray], dict[str, Any]]:
    """uint8 batches of the reference set at the evaluation resolution, and a record of what it is."""
    spec = str(ec.reference)
    limit = int(ec.reference_count) or None
    if not spec:
        raise ValueError("config.eval.reference is empty: give an ADM reference batch (.npz, e.g. "
                         "VIRTUAL_imagenet256_labeled.npz) or an image source such as 'fashion_mnist'.")
    if spec.endswith(".npz"):
        shape, dtype = npz.read_header(spec)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{spec}: arr_0 must be uint8 (N, H, W, 3) images; got {dtype} {shape}.")
        if ec.resolution and shape[1:3] != (ec.resolution, ec.resolution):
            raise ValueError(f"{spec} holds {shape[1]}x{shape[2]} images but config.eval.resolution is "
                             f"{ec.resolution}; samples and references must have the same size.")
        count = shape[0] if limit is None else min(shape[0], limit)
        return npz.iter_batches(spec, batch_size, limit=limit), {"reference": spec, "reference_count": count}

    from par_jax.data import sources, views  # noqa: PLC0415

    source = sources.make_image_source(spec, split=ec.reference_split)
    count = len(source) if limit is None else min(len(source), limit)
    kind, size = data_config.views, int(data_config.image_size)
    view = views.eval_view(kind)
    to_size = jax.jit(lambda x: resize.to_uint8(resize.resize_bicubic(resize.from_uint8(x), ec.resolution)))

    def batches():
        for begin in range(0, count, batch_size):
            images = np.stack([views.make_views(source[i][0], kind, size)[view]
                               for i in range(begin, min(begin + batch_size, count))])
            yield np.asarray(to_size(images)) if ec.resolution and ec.resolution != size else images

    record = {"reference": f"{source.name} ({ec.reference_split} split), view {kind!r} at {size}px"
                           + (f", bicubic to {ec.resolution}px" if ec.resolution and ec.resolution != size else ""),
              "reference_count": count}
    return batches(), record


def reference_features(ec, data_config, network) -> tuple[features_lib.Features, dict[str, Any]]:
    """Features of the reference set, and a record of it (which file or source, how many, where FID stats come from).

    An ADM reference batch's stored Inception statistics (`mu`, `sigma`, `mu_s`, `sigma_s`) are used for FID/sFID
    when `reference_stats == "stored"` and the network is Inception, exactly as ADM's evaluator does; precision and
    recall always use features computed here from its images.
    """
    batches, record = _reference_images(ec, data_config, network.batch_size)
    feats = features_lib.collect(network, batches, log_every=20)
    record["reference_stats"] = "computed"
    spec = str(ec.reference)
    if spec.endswith(".npz") and ec.reference_stats == "stored" and network.has_spatial:
        with np.load(spec) as f:
            if "mu" in f.files:
                feats.stored["pool"] = metrics.FeatureStats(f["mu"], f["sigma"], -1)
                record["reference_stats"] = "stored mu/sigma"
            if "mu_s" in f.files:
                feats.stored["spatial"] = metrics.FeatureStats(f["mu_s"], f["sigma_s"], -1)
                record["reference_stats"] += " and mu_s/sigma_s"
    elif ec.reference_stats not in ("stored", "computed"):
        raise ValueError(f"config.eval.reference_stats must be 'stored' or 'computed', got {ec.reference_stats!r}.")
    return feats, record


# ----------------------------------------------------------------------------------------------------------------
# During training
# ----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _cached_setup(key):
    # The feature network, the reference features and the tokenizer are built once per run (per settings).
    ec, data_config = key.ec, key.data
    network = features_lib.build(ec)
    reference, record = reference_features(ec, data_config, network)
    from par_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
    return network, reference, record, tokenizer_lib.load(key.tokenizer)


class _Frozen:
    """Hashable view of (config.eval with overrides, config.data, tokenizer path) for the setup cache."""

    def __init__(self, ec, data, tokenizer: str):
        self.ec, self.data, self.tokenizer = ec, data, tokenizer
        self._key = (ec.to_json(sort_keys=True), data.to_json(sort_keys=True), tokenizer)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Frozen) and self._key == other._key


def _with_overrides(config, overrides):
    ec = config.eval.copy_and_resolve_references()
    unknown = sorted(set(overrides) - set(ec.keys()))
    if unknown:
        raise ValueError(f"unknown evaluation settings {unknown}; they must be fields of config.eval: {sorted(ec)}.")
    ec.update(overrides)
    return ec


def validate(config, **overrides) -> None:
    """Cheap checks of an evaluation entry before training starts: metric names, the feature network's weights,
    the reference set and the tokenizer exist. (The training loop can call it for each `config.evals` entry that
    uses `evaluate`, so a typo fails in seconds, not at the first evaluation.)"""
    ec = _with_overrides(config, overrides)
    metric_names(ec)
    if ec.feature_network == "inception" and not (ec.inception_weights and
                                                   os.path.exists(ec.inception_weights)):
        raise FileNotFoundError(f"config.eval.inception_weights={ec.inception_weights!r} does not exist; the "
                                f"inception feature network needs the FID weight file.")
    if ec.feature_network not in features_lib.NETWORKS:
        raise ValueError(f"unknown feature network {ec.feature_network!r}; choose one of {features_lib.NETWORKS}.")
    if not ec.reference:
        raise ValueError("config.eval.reference is empty (an ADM reference .npz or an image source spec).")
    if str(ec.reference).endswith(".npz") and not os.path.exists(ec.reference):
        raise FileNotFoundError(f"reference batch {ec.reference!r} does not exist.")
    if not os.path.exists(tokenizer_path(config)):
        raise FileNotFoundError(f"tokenizer {tokenizer_path(config)!r} does not exist.")


def evaluate(model, config, *, step: int, workdir: str, **overrides) -> dict[str, float]:
    """A `par_jax.training.evaluators` plug-in: metrics of `overrides.get("num_samples")` fresh samples.

    `config.eval` gives the protocol; entries of `config.evals.<name>` override its fields (e.g. num_samples=1000,
    metrics="fid,is"). Uses `config.sample` for guidance, temperature, top-k/p. Returns {metric: value}.
    """
    del workdir  # results go through the training loop's writer
    ec = _with_overrides(config, overrides)
    names = metric_names(ec)
    network, reference, _, tokenizer = _cached_setup(_Frozen(ec, config.data, tokenizer_path(config)))
    check_network(names, network)
    from par_jax import sampling  # noqa: PLC0415
    settings = sampling.SampleSettings.from_config(config.sample)
    labels = make_labels(int(ec.num_samples), model.config.num_classes, ec.labels, int(ec.seed))
    collector = features_lib.FeatureCollector(network)
    for images, part in generate(model, tokenizer, labels, settings, seed=int(ec.seed),
                                 batch_size=int(ec.batch_size), resolution=int(ec.resolution),
                                 what=f"eval samples at step {step}"):
        collector.add(images, part, local=True)
    return compute_metrics(names, collector.result(), reference, network, ec)


# par_jax.training.evaluators runs `fn.validate(config, **kwargs)` before training starts.
evaluate.validate = validate
