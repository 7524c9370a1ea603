"""Metrics of a generator on image features: Frechet distance, Inception Score, k-NN precision and recall.

Definitions follow the ADM (guided-diffusion) evaluation suite that PAR's numbers come from (PAR_SPEC section 11):

- Frechet distance between Gaussians fitted to two feature sets (FID on Inception pool features, sFID on its
  spatial features): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). Statistics and the matrix square root run
  in float64 NumPy on the host: FID is a small difference of traces in the hundreds, which float32 cannot resolve,
  and JAX's float64 mode is a process-wide switch we do not flip. tr((S1 S2)^(1/2)) is computed as the sum of square
  roots of the eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2): two
  symmetric eigendecompositions, no complex parts, no `sqrtm` failure on near-singular products.
- Inception Score: exp(E_x KL(p(y|x) || p(y))), averaged over consecutive splits of `split_size` samples (ADM: 5000,
  so 10 splits of 50k samples); the standard deviation over splits is reported too.
- Precision / recall (Kynkaanniemi et al. 2019, ADM's ManifoldEstimator): each set's manifold is the union of balls
  around its points with radius the distance to the k-th nearest neighbour (k=3, the point itself not counted).
  Precision is the fraction of generated points inside the real manifold, recall the fraction of real points inside
  the generated one. Pairwise squared distances run in JAX in row blocks (ADM computes them in float16 with a float32
  fallback; we use float32 throughout).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _as_features(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a (num_samples, feature_dim) array; got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or infinite values; check the images and the feature network.")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and unbiased covariance (D, D) of a feature set, float64, with the number of samples behind them."""
    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def __post_init__(self):
        mu, sigma = np.atleast_1d(np.asarray(self.mu, np.float64)), np.atleast_2d(np.asarray(self.sigma, np.float64))
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"FeatureStats needs mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}.")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]


def _check_count(count: int, dim: int, min_samples: int | None) -> None:
    # A covariance from N samples has rank <= N - 1: with N <= D it is singular and FID is dominated by estimation
    # bias, so that is refused unless the caller lowers `min_samples` on purpose (never below 2).
    need = dim + 1 if min_samples is None else max(int(min_samples), 2)
    if count < need:
        raise ValueError(
            f"too few samples for a {dim}x{dim} feature covariance: got {count}, need at least {need}. Use more "
            f"samples (FID on Inception features is only comparable at 50k samples against ADM's reference batch), "
            f"or pass min_samples=... to accept a rank-deficient covariance.")


class StatsAccumulator:
    """Streaming mean and covariance in float64, fed batch by batch (features never held all at once).

    Sums are taken around the first batch's mean: the plain sum-of-outer-products formula cancels catastrophically
    when the mean is large against the spread.
    """

    def __init__(self):
        self.count = 0
        self._shift = self._sum = self._outer = None

    def update(self, features) -> None:
        x = _as_features(features, "features").astype(np.float64)
        if not len(x):
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature size changed from {self._shift.shape[0]} to {x.shape[1]} between batches.")
        x = x - self._shift
        self.count += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def result(self, *, min_samples: int | None = None) -> FeatureStats:
        if self._shift is None:
            raise ValueError("no features were added; cannot compute statistics of an empty set.")
        n = self.count
        _check_count(n, self._shift.shape[0], min_samples)
        mean_shifted = self._sum / n
        sigma = (self._outer - n * np.outer(mean_shifted, mean_shifted)) / (n - 1)
        return FeatureStats(self._shift + mean_shifted, (sigma + sigma.T) / 2, n)


def feature_stats(features, *, min_samples: int | None = None) -> FeatureStats:
    """FeatureStats of a (N, D) feature array (N > D unless `min_samples` says otherwise)."""
    acc = StatsAccumulator()
    acc.update(features)
    return acc.result(min_samples=min_samples)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    root = _psd_sqrt(np.asarray(sigma1, np.float64))
    m = root @ np.asarray(sigma2, np.float64) @ root
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """Frechet distance between the Gaussians N(mu1, S1) and N(mu2, S2); 0 for identical statistics."""
    if stats1.dim != stats2.dim:
        raise ValueError(f"feature sizes differ: {stats1.dim} vs {stats2.dim}. Compute both sets with the same "
                         f"feature network (and the same output: pool vs spatial).")
    diff = stats1.mu - stats2.mu
    tr = np.trace(stats1.sigma) + np.trace(stats2.sigma) - 2.0 * trace_sqrt_product(stats1.sigma, stats2.sigma)
    # Identical inputs give 0 up to rounding (~1e-12 relative); never report a negative distance.
    return max(float(diff @ diff + tr), 0.0)


def frechet_video_distance(real_features, fake_features, *, min_samples: int | None = None) -> float:
    """The Frechet distance of Gaussians fitted to two (N, D) sets of clip features.

    FVD (Unterthiner et al. 2018) when the features are the Kinetics-400 I3D's 400 logits (evaluation/i3d.py); on
    any other network's features it is that network's Frechet distance, not FVD, and is reported under another name.
    """
    real = feature_stats(real_features, min_samples=min_samples)
    fake = feature_stats(fake_features, min_samples=min_samples)
    return frechet_distance(real, fake)


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------

@jax.jit
def _split_score(logits):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_marginal = jax.nn.logsumexp(logp, axis=0) - jnp.log(logp.shape[0])
    kl = jnp.sum(jnp.exp(logp) * (logp - log_marginal), axis=-1)
    return jnp.exp(jnp.mean(kl))


def inception_score(logits, *, split_size: int = 5000) -> tuple[float, float]:
    """(mean, std) over consecutive splits of `split_size` rows of exp(E KL(p(y|x) || p(y))), from class logits.

    1 when every prediction is the same distribution; the number of classes when predictions are confident and the
    classes balanced within each split. ADM's evaluator uses split_size=5000 and reports the mean.
    """
    logits = _as_features(logits, "logits")
    if split_size < 1:
        raise ValueError(f"split_size must be positive; got {split_size}.")
    if len(logits) < 2:
        raise ValueError(f"the Inception Score needs at least 2 samples; got {len(logits)}.")
    scores = [float(_split_score(jnp.asarray(logits[i:i + split_size])))
              for i in range(0, len(logits), split_size)]
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------
# Precision and recall with k-NN manifolds
# ----------------------------------------------------------------------------------------------------------------

def _sq_distances(a, b):
    # HIGHEST: accelerators would otherwise run the matmul in bf16/tf32, which moves points across ball boundaries.
    dots = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(a * a, axis=1)[:, None] - 2.0 * dots + jnp.sum(b * b, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_block(rows, points, k: int):
    # The point itself is at distance 0, so the k-th neighbour is entry k (0-based) of the sorted distances.
    neg_smallest, _ = jax.lax.top_k(-_sq_distances(rows, points), k + 1)
    return -neg_smallest[:, k]


@jax.jit
def _inside_block(rows, points, radii):
    return jnp.any(_sq_distances(rows, points) <= radii[None, :], axis=1)


def _blocks(x: np.ndarray, block_size: int):
    """Row blocks padded to one fixed shape (one compilation), with the number of real rows in each."""
    for start in range(0, len(x), block_size):
        block = x[start:start + block_size]
        valid = len(block)
        if valid < block_size:
            block = np.concatenate([block, np.zeros((block_size - valid, x.shape[1]), x.dtype)])
        yield block, valid


def knn_radii(features, *, k: int = 3, block_size: int = 1024) -> np.ndarray:
    """Squared distance from every point to its k-th nearest neighbour in the same set, (N,) float32."""
    x = _as_features(features, "features").astype(np.float32)
    if len(x) <= k:
        raise ValueError(f"k-NN manifold with k={k} needs more than {k} samples; got {len(x)}.")
    points = jnp.asarray(x)
    block_size = min(block_size, len(x))
    out = [np.asarray(_kth_neighbour_block(jnp.asarray(b), points, k))[:v] for b, v in _blocks(x, block_size)]
    return np.concatenate(out)


def fraction_inside(queries, points, radii, *, block_size: int = 1024) -> float:
    """Fraction of `queries` inside at least one ball (center `points[i]`, squared radius `radii[i]`)."""
    q = _as_features(queries, "queries").astype(np.float32)
    pts = jnp.asarray(_as_features(points, "points").astype(np.float32))
    radii = jnp.asarray(np.asarray(radii, np.float32))
    block_size = min(block_size, len(q))
    inside = [np.asarray(_inside_block(jnp.asarray(b), pts, radii))[:v] for b, v in _blocks(q, block_size)]
    return float(np.mean(np.concatenate(inside)))


def precision_recall(real, fake, *, k: int = 3, block_size: int = 1024) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` against reference features `real` (ADM: k = 3)."""
    real = _as_features(real, "real features")
    fake = _as_features(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]} vs generated {fake.shape[1]}. Compute both "
                         f"sets with the same feature network.")
    real_radii = knn_radii(real, k=k, block_size=block_size)
    fake_radii = knn_radii(fake, k=k, block_size=block_size)
    precision = fraction_inside(fake, real, real_radii, block_size=block_size)
    recall = fraction_inside(real, fake, fake_radii, block_size=block_size)
    return precision, recall


def class_consistency(logits, labels) -> float:
    """Fraction of samples whose argmax class equals the label they were generated for."""
    logits = _as_features(logits, "logits")
    labels = np.asarray(labels)
    if labels.shape != (len(logits),):
        raise ValueError(f"labels must be ({len(logits)},) to match the logits; got shape {labels.shape}.")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# ----------------------------------------------------------------------------------------------------------------
# The registry: metric name (config.eval.metrics) -> fn(samples, reference, network, settings) -> {key: value}
# ----------------------------------------------------------------------------------------------------------------
# `samples` and `reference` are `features.Features`, `network` the `features.FeatureNetwork`, `settings` the
# `settings.EvalSettings`.

def _fid(samples, reference, network, settings) -> dict[str, float]:
    kw = {"min_samples": settings.min_samples}
    return {"fid": frechet_distance(samples.stats("pool", **kw), reference.stats("pool", **kw))}


def _sfid(samples, reference, network, settings) -> dict[str, float]:
    kw = {"min_samples": settings.min_samples}
    return {"sfid": frechet_distance(samples.stats("spatial", **kw), reference.stats("spatial", **kw))}


def _inception_score(samples, reference, network, settings) -> dict[str, float]:
    mean, std = inception_score(samples.logits, split_size=settings.is_split_size)
    return {"inception_score": mean, "inception_score_std": std}


def _precision_recall(samples, reference, network, settings) -> dict[str, float]:
    precision, recall = precision_recall(reference.pool, samples.pool, k=settings.pr_k)
    return {"precision": precision, "recall": recall}


def _class_consistency(samples, reference, network, settings) -> dict[str, float]:
    if samples.labels is None:
        raise ValueError("class_consistency needs the labels the samples were generated for.")
    return {"class_consistency": class_consistency(samples.logits, samples.labels)}


def _video_frechet(samples, reference, network, settings) -> dict[str, float]:
    # Named by the network: `fvd` only on I3D features; the video classifier's is `fd_video_classifier`.
    kw = {"min_samples": settings.min_samples}
    return {network.frechet_key: frechet_distance(samples.stats("pool", **kw), reference.stats("pool", **kw))}


METRICS = {
    "fid": _fid,                              # Frechet distance of pool features (FID with Inception)
    "sfid": _sfid,                            # Frechet distance of Inception's spatial features (ADM's sFID)
    "is": _inception_score,                   # Inception Score (mean and std over splits of is_split_size)
    "precision_recall": _precision_recall,    # k-NN manifold precision and recall (k = pr_k, 3 as in ADM)
    "class_consistency": _class_consistency,  # the network's classifier on samples against their requested labels
    "fvd": _video_frechet,                    # video: Frechet distance of clip features (FVD with I3D)
}
IMAGE_ONLY = ("fid", "sfid", "is")           # metrics of image feature networks
VIDEO_ONLY = ("fvd",)                        # metrics of video feature networks


def check_network(names, network) -> None:
    """Fail before any sampling when a requested metric cannot be computed with this feature network."""
    video = bool(getattr(network, "video", False))
    wrong = [m for m in names if m in (IMAGE_ONLY if video else VIDEO_ONLY)]
    if wrong:
        kind, other = ("video", "image") if video else ("image", "video")
        fits = [m for m in METRICS if m not in (IMAGE_ONLY if video else VIDEO_ONLY)]
        from par_jax.core.config_args import UsageError  # noqa: PLC0415
        raise UsageError(f"config.eval.metrics {wrong} are {other} metrics, but {network.name} is a {kind} "
                         f"feature network; choose from {fits}.")
    if "sfid" in names and not network.has_spatial:
        raise ValueError(f"sfid needs spatial features, which the {network.name} network lacks; drop 'sfid' from "
                         f"config.eval.metrics.")
    if "class_consistency" in names and network.label_space is None:
        raise ValueError(f"class_consistency needs a classifier of the generator's classes; {network.name} is not "
                         f"(use feature_network=fmnist_classifier for Fashion-MNIST).")


def compute(names, samples, reference, network, settings) -> dict[str, float]:
    """{key: value} of every metric in `names` (keys as the metric functions name them)."""
    check_network(names, network)
    out: dict[str, float] = {}
    for name in names:
        out.update(METRICS[name](samples, reference, network, settings))
    return out
