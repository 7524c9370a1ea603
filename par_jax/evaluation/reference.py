"""Reference sets: the real images samples are compared with, their features, and a record of what they are.

A reference is an ADM reference batch (`.npz` with uint8 `arr_0`, possibly FID statistics `mu`/`sigma` and
`mu_s`/`sigma_s`) or an image source (`fashion_mnist`, `tfds:NAME`, `folder:PATH`) viewed as in training and resized
to the evaluation resolution with the release's bicubic resize.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from par_jax.core import paths
from par_jax.evaluation import features as features_lib
from par_jax.evaluation import metrics, npz, resize
from par_jax.evaluation.settings import EvalSettings


def check(settings: EvalSettings) -> None:
    """Cheap checks that the reference exists (before any feature network or sampling)."""
    if not settings.reference:
        raise ValueError("config.eval.reference is empty: give an ADM reference batch (.npz, e.g. "
                         "VIRTUAL_imagenet256_labeled.npz) or an image source such as 'fashion_mnist'.")
    if settings.reference.endswith(".npz") and not paths.exists(settings.reference):
        raise FileNotFoundError(f"reference batch {settings.reference!r} does not exist.")


def images(settings: EvalSettings, batch_size: int) -> tuple[Iterator[np.ndarray], dict[str, Any]]:
    """uint8 batches of the reference set at the evaluation resolution, and a record of what it is."""
    check(settings)
    spec, resolution = settings.reference, settings.resolution
    limit = settings.reference_count or None
    if spec.endswith(".npz"):
        shape, dtype = npz.read_header(spec)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{spec}: arr_0 must be uint8 (N, H, W, 3) images; got {dtype} {shape}.")
        if resolution and shape[1:3] != (resolution, resolution):
            raise ValueError(f"{spec} holds {shape[1]}x{shape[2]} images but config.eval.resolution is "
                             f"{resolution}; samples and references must have the same size.")
        count = shape[0] if limit is None else min(shape[0], limit)
        return npz.iter_batches(spec, batch_size, limit=limit), {"reference": spec, "reference_count": count}

    from par_jax.data import sources, views  # noqa: PLC0415 (only image-source references need the data layer)

    source = sources.make_image_source(spec, split=settings.reference_split)
    count = len(source) if limit is None else min(len(source), limit)
    kind, size = settings.reference_views, settings.reference_image_size
    view = views.eval_view(kind)
    resized = bool(resolution) and resolution != size
    to_size = jax.jit(lambda x: resize.to_uint8(resize.resize_bicubic(resize.from_uint8(x), resolution)))

    def batches():
        for begin in range(0, count, batch_size):
            batch = np.stack([views.make_views(source[i][0], kind, size)[view]
                              for i in range(begin, min(begin + batch_size, count))])
            yield np.asarray(to_size(batch)) if resized else batch

    record = {"reference": f"{source.name} ({settings.reference_split} split), view {kind!r} at {size}px"
                           + (f", bicubic to {resolution}px" if resized else ""),
              "reference_count": count}
    return batches(), record


def features(settings: EvalSettings, network: features_lib.FeatureNetwork
             ) -> tuple[features_lib.Features, dict[str, Any]]:
    """Features of the reference set, and a record of it (which file or source, how many, where FID stats come from).

    An ADM reference batch's stored Inception statistics (`mu`, `sigma`, `mu_s`, `sigma_s`) are used for FID/sFID
    when `reference_stats == "stored"` and the network is Inception, exactly as ADM's evaluator does; precision and
    recall always use features computed here from its images.
    """
    batches, record = images(settings, network.batch_size)
    feats = features_lib.collect(network, batches, log_every=20)
    record["reference_stats"] = "computed"
    spec = settings.reference
    if spec.endswith(".npz") and settings.reference_stats == "stored" and network.has_spatial:
        with paths.open_file(spec, "rb") as f, np.load(f) as z:
            if "mu" in z.files:
                feats.stored["pool"] = metrics.FeatureStats(z["mu"], z["sigma"], -1)
                record["reference_stats"] = "stored mu/sigma"
            if "mu_s" in z.files:
                feats.stored["spatial"] = metrics.FeatureStats(z["mu_s"], z["sigma_s"], -1)
                record["reference_stats"] += " and mu_s/sigma_s"
    return feats, record
