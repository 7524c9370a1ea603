r"""How much image tokens tell about each other: conditional entropies of token features (the PAR paper's
appendix D, Figures 11 and 12; PAR_SPEC section 15).

    python -m par_jax.analysis.dependency --codes_dir=DIR --tokenizer=PATH --out=DIR [--n=4] [--references=4:4,0:0]

writes OUT/pairwise.png, OUT/order_increase.png and OUT/dependency.json, and prints a short table.

What it computes. Every token is replaced by its codebook vector v_i (dimension d, `tokenizer.quantize.codebook()`),
one view per image (the codes' eval view). For a target position i and a conditioning set S of other positions, a
regressor f predicts v_i from {v_k : k in S}; then
    H(v_i | v_S) <= H(v_i - f(v_S)) <= 1/2 log((2 pi e)^d |Sigma|),
Sigma the covariance of the residuals v_i - f(v_S) on held-out images (a Gaussian has the largest entropy of any
distribution with that covariance). Any f gives an upper bound; a better f gives a tighter one. Two analyses:
  pairwise   H(v_i | v_j) for every i and a few reference positions j (paper Figure 11).
  orders     for PAR's region order and for raster order with n consecutive tokens per step (`ordering.OrderSpec`
             kinds "region" and "raster_multi"), each token's H given every token generated before it one at a time
             (sequential) and given only the tokens of earlier steps (parallel: its own group hidden); the increase
             parallel - sequential is what generating a group at once gives up (paper Figure 12). The first n tokens
             are generated one by one in both orders, so their increase is zero.

The regressor: one ridge regression per (target, conditioning set), in closed form. A shared regressor would take
all tokens with the ones outside the set zeroed plus a mask channel; for a linear map zeroed inputs contribute
nothing and the mask channel is a constant per regression, i.e. a bias, which centring the vectors with the train
mean removes. So each estimate is exactly a ridge regression on the set's own vectors,
w = (C_SS + lambda I)^-1 C_Si with C the train covariance. Every set here is a prefix of some order of the tokens
(the generation order; a reference token first), so one Cholesky factor per order gives all of them by triangular
solves (`Probe.entropies`). Chosen over a trained shared MLP because it has no optimiser, learning rate, step count
or seed to tune, gives the same number on every run and costs two triangular solves per estimate; its price is that
it sees only linear dependencies, so its bound is looser than a good non-linear regressor's (the paper trains one).
Both sides of every comparison use the same regressor family and the same held-out images. Ridges are relative to the
data: lambda = --ridge and the residual-covariance ridge (`gaussian_entropy`) = --sigma_ridge, both times the mean
per-dimension variance of the token vectors. The class label is not conditioned on (as in the paper's analysis).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from par_jax import ordering
from par_jax.core import config_args, paths

ORDERS = (("region", "PAR region order"), ("raster_multi", "raster order"))
PAIRWISE_PNG, ORDERS_PNG, RESULTS_JSON = "pairwise.png", "order_increase.png", "dependency.json"


def gaussian_entropy(residuals, ridge: float = 0.0):
    """Differential entropy in nats of a Gaussian with the covariance of `residuals` (n, d):
    1/2 log((2 pi e)^d |Sigma + ridge I|), Sigma the sample covariance (mean removed, divided by n - 1).

    The ridge keeps the value finite when some direction has no spread at all (a position that is always the same
    token, or one the conditioning predicts exactly): such a direction then counts 1/2 log(2 pi e ridge) instead of
    minus infinity. Traceable (usable under jit and vmap)."""
    r = jnp.asarray(residuals, jnp.float32)
    if r.ndim != 2 or r.shape[0] < 2:
        raise ValueError(f"residuals must be (samples >= 2, dims), got shape {r.shape}.")
    n, d = r.shape
    r = r - r.mean(axis=0)
    sigma = r.T @ r / (n - 1) + ridge * jnp.eye(d, dtype=r.dtype)
    return 0.5 * (d * jnp.log(2 * jnp.pi * jnp.e) + jnp.linalg.slogdet(sigma)[1])


def token_features(codes, codebook) -> np.ndarray:
    """Codes (B, h, w) or (B, P) and a (K, d) codebook -> (B, P, d) float32 token vectors, raster order."""
    codes = np.asarray(codes)
    return np.asarray(codebook, np.float32)[codes.reshape(codes.shape[0], -1)]


@dataclasses.dataclass(frozen=True, eq=False)
class Probe:
    """Ridge regressions of one token's vector on any set of the others', fitted on a train split and scored on a
    held-out split. Build with `fit_probe`.

    cov          (P*d, P*d) covariance of the train split's token vectors (position-major).
    held_out     (n, P, d) held-out token vectors minus the train mean.
    ridge        lambda added to every regression's diagonal (absolute).
    sigma_ridge  added to every residual covariance's diagonal (absolute; see `gaussian_entropy`).
    """
    cov: np.ndarray
    held_out: np.ndarray
    ridge: float
    sigma_ridge: float

    @property
    def num_positions(self) -> int:
        return self.held_out.shape[1]

    def entropies(self, order: Sequence[int], targets: Sequence[int], lengths: Sequence[int],
                  what: str = "") -> np.ndarray:
        """H(v_t | v_order[0], ..., v_order[m-1]) in nats for each target t and prefix length m (t must not be in
        its prefix). Every conditioning set of this analysis is a prefix of some order of the tokens (generation
        order, or a reference token first), so one Cholesky factor L of the ridged covariance in that order serves
        them all: the ridge regression on a prefix of m tokens is w = (L_m L_m^T)^-1 C[prefix, t], L_m the leading
        block of L, i.e. two triangular solves. Runs in batches of `BATCH` targets, logging progress and an ETA."""
        order, targets, lengths = (np.asarray(a, np.int32) for a in (order, targets, lengths))
        p = self.num_positions
        if sorted(order.tolist()) != list(range(p)) or targets.shape != lengths.shape or targets.ndim != 1:
            raise ValueError(f"order must be a permutation of the {p} positions and lengths one per target.")
        if (np.argsort(order)[targets] < lengths).any():
            raise ValueError("a target is in its own conditioning prefix.")
        chol, cov, x = _in_order(self.cov, self.held_out, order, self.ridge)
        out, start = [], time.perf_counter()
        for lo in range(0, len(targets), BATCH):
            t, m = targets[lo:lo + BATCH], lengths[lo:lo + BATCH]
            pad = BATCH - len(t)  # one compiled shape: the last batch repeats its first target
            h = _prefix_entropies(chol, cov, x, self.held_out, np.concatenate([t, np.repeat(t[:1], pad)]),
                                  np.concatenate([m, np.repeat(m[:1], pad)]), self.sigma_ridge)
            out.append(np.asarray(h, np.float64)[:len(t)])
            done = lo + len(t)
            if done < len(targets):
                spent = time.perf_counter() - start
                logging.info("%s: %d/%d regressions, %.0f s, ETA %.0f s", what or "entropies", done, len(targets),
                             spent, spent * (len(targets) - done) / done)
        return np.concatenate(out) if out else np.zeros(0)


BATCH = 64   # targets per compiled call


@jax.jit
def _in_order(cov, held_out, order, ridge):
    """The Cholesky factor of the ridged covariance, the covariance's rows and the held-out features, all with the
    features in `order` (position-major)."""
    n, p, d = held_out.shape
    cols = (order[:, None] * d + jnp.arange(d)).reshape(-1)
    rows = cov[cols]
    return jnp.linalg.cholesky(rows[:, cols] + ridge * jnp.eye(p * d)), rows, held_out.reshape(n, p * d)[:, cols]


@jax.jit
def _prefix_entropies(chol, cov, x, held_out, targets, lengths, sigma_ridge):
    d = held_out.shape[2]

    def one(target, length):
        b = jax.lax.dynamic_slice_in_dim(cov, target * d, d, axis=1)
        # The forward solve's first m rows depend only on the first m rows of L and b; zeroing the rest makes the
        # backward solve return zero weights outside the prefix and (L_m L_m^T)^-1 b_m inside it.
        z = jax.scipy.linalg.solve_triangular(chol, b, lower=True)
        z = jnp.where(jnp.arange(chol.shape[0])[:, None] < length * d, z, 0.0)
        w = jax.scipy.linalg.solve_triangular(chol, z, lower=True, trans="T")
        y = jax.lax.dynamic_index_in_dim(held_out, target, axis=1, keepdims=False)
        return gaussian_entropy(y - x @ w, sigma_ridge)

    return jax.vmap(one)(targets, lengths)


def fit_probe(features, *, held_out: float = 0.2, seed: int = 0, ridge: float = 1e-3,
              sigma_ridge: float = 1e-3) -> Probe:
    """Token vectors (B, P, d) -> a Probe: a random `held_out` fraction of the images is kept for scoring, the rest
    fits. `ridge` and `sigma_ridge` are relative to the mean per-dimension variance of the train vectors."""
    features = np.asarray(features, np.float64)
    if features.ndim != 3:
        raise ValueError(f"features must be (images, positions, dims), got shape {features.shape}.")
    b, p, d = features.shape
    n_test = int(round(b * held_out))
    if not 0 < held_out < 1 or n_test < d + 2 or b - n_test < 2:
        raise ValueError(f"{b} images with held_out={held_out} leave {n_test} held-out and {b - n_test} train images; "
                         f"need at least {d + 2} held-out (the residual covariance is {d}x{d}) and 2 train images.")
    if ridge <= 0 or sigma_ridge < 0:
        raise ValueError(f"ridge must be positive and sigma_ridge non-negative, got {ridge} and {sigma_ridge}.")
    order = np.random.default_rng(seed).permutation(b)
    test, train = features[order[:n_test]], features[order[n_test:]]
    mean = train.mean(axis=0)
    flat = (train - mean).reshape(len(train), p * d)
    cov = flat.T @ flat / len(train)
    scale = float(np.trace(cov)) / (p * d) or 1.0  # all-constant data: ridges in absolute units
    return Probe(cov=cov.astype(np.float32), held_out=(test - mean).astype(np.float32),
                 ridge=ridge * scale, sigma_ridge=sigma_ridge * scale)


def marginal_entropies(probe: Probe) -> np.ndarray:
    """H(v_i) for every position (the empty conditioning set)."""
    p = probe.num_positions
    return probe.entropies(np.arange(p), np.arange(p), np.zeros(p), "marginal")


def pairwise_entropies(probe: Probe, reference: int) -> np.ndarray:
    """H(v_i | v_reference) for every position i; NaN at the reference itself."""
    p = probe.num_positions
    others = np.array([i for i in range(p) if i != reference])
    out = np.full(p, np.nan)
    out[others] = probe.entropies(np.concatenate([[reference], others]), others, np.ones(p - 1),
                                  f"pairwise, reference {reference}")
    return out


def order_entropies(probe: Probe, spec: ordering.OrderSpec) -> dict[str, np.ndarray]:
    """Per raster position: H given the tokens generated before it one at a time ("sequential"), given only the
    tokens of earlier steps ("parallel"), and the increase parallel - sequential (zero where the two sets agree).
    Both sets are prefixes of the generation order: the first generated[i] tokens, or those of steps < step[i]."""
    p = probe.num_positions
    if spec.num_tokens != p:
        raise ValueError(f"the order is over {spec.num_tokens} tokens but the features have {p} positions.")
    generated = spec.layout.inverse                    # generation index of each raster position
    step = ordering.step_map(spec).reshape(-1)         # forward step of each raster position
    earlier = (step[None, :] < step[:, None]).sum(axis=1)
    differ = np.nonzero(earlier != generated)[0]
    h_seq = probe.entropies(spec.perm, np.arange(p), generated, f"{spec.kind} sequential")
    h_par = h_seq.copy()
    h_par[differ] = probe.entropies(spec.perm, differ, earlier[differ], f"{spec.kind} parallel")
    return {"sequential": h_seq, "parallel": h_par, "increase": h_par - h_seq, "step": step}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (recorded in the JSON)."""
    n: int = 4                                          # tokens per parallel step of both orders
    references: tuple[tuple[int, int], ...] = ()       # (row, col); () = the centre and the top-left corner
    max_images: int = 10_000                            # the paper's count
    held_out: float = 0.2
    ridge: float = 1e-3
    sigma_ridge: float = 1e-3
    seed: int = 0

    def reference_cells(self, grid_shape) -> tuple[tuple[int, int], ...]:
        h, w = grid_shape
        return self.references or ((h // 2, w // 2), (0, 0))


def analyse(features, grid_shape, settings: Settings = Settings()) -> dict:
    """Token vectors (B, h*w, d) -> every map and summary of the analysis (numbers only; see `write_outputs`)."""
    grid_shape = tuple(int(g) for g in grid_shape)
    w = grid_shape[1]
    probe = fit_probe(features, held_out=settings.held_out, seed=settings.seed, ridge=settings.ridge,
                      sigma_ridge=settings.sigma_ridge)
    n_test = probe.held_out.shape[0]
    n_train, inputs = len(features) - n_test, probe.cov.shape[0] - probe.held_out.shape[2]
    if n_train < 10 * inputs:
        # Measured: independent 16x16 tokens (d = 8) with 2,400 train images gave a mean increase of -0.04, not 0.
        logging.warning("%d train images for regressions on up to %d inputs: long conditioning sets overfit, which "
                        "inflates their held-out entropies (increases come out too small, even negative). Use at "
                        "least %d images or a larger --ridge.", n_train, inputs,
                        int(10 * inputs / (1 - settings.held_out)))
    results = {
        "grid_shape": list(grid_shape), "dim": int(probe.held_out.shape[2]),
        "images": {"train": int(n_train), "held_out": int(n_test)},
        "ridge_absolute": probe.ridge, "sigma_ridge_absolute": probe.sigma_ridge,
        "marginal": marginal_entropies(probe).reshape(grid_shape),
        "pairwise": [], "orders": {},
    }
    for r, c in settings.reference_cells(grid_shape):
        results["pairwise"].append({"reference": [r, c],
                                    "entropy": pairwise_entropies(probe, r * w + c).reshape(grid_shape)})
    for kind, _ in ORDERS:
        o = order_entropies(probe, ordering.OrderSpec(grid_shape, settings.n, kind=kind))
        results["orders"][kind] = {
            **{k: v.reshape(grid_shape) for k, v in o.items()},
            "mean_sequential": float(o["sequential"].mean()), "mean_parallel": float(o["parallel"].mean()),
            "mean_increase": float(o["increase"].mean()), "max_increase": float(o["increase"].max())}
    return results


# ----- pictures, JSON, table -----

@dataclasses.dataclass(frozen=True)
class Row:
    """One row of heat maps sharing a colour scale. marks: a (row, col) cell to star per panel (or None); borders:
    regions per side per panel (red lines)."""
    maps: Sequence[np.ndarray]
    titles: Sequence[str]
    label: str = "nats"
    cmap: str = "viridis"
    marks: Sequence = ()
    borders: Sequence[int] = ()


def _draw(path, rows: Sequence[Row], suptitle: str) -> None:
    """Heat maps, one colour scale per row; values written in the cells of grids up to 16x16."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cols = max(len(row.maps) for row in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.2 * cols + 0.8, 4.2 * len(rows) + 0.5), squeeze=False)
    for row, row_axes in zip(rows, axes):
        values = np.concatenate([m[np.isfinite(m)] for m in row.maps])
        lo, hi = float(values.min()), float(values.max())
        for k, ax in enumerate(row_axes):
            if k >= len(row.maps):
                ax.axis("off")
                continue
            m = row.maps[k]
            cmap = matplotlib.colormaps[row.cmap].with_extremes(bad="white")   # NaN: the reference cell
            image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=lo, vmax=hi)
            h, w = m.shape
            if h * w <= 256:
                for r in range(h):
                    for c in range(w):
                        if np.isfinite(m[r, c]):
                            ax.text(c, r, f"{m[r, c]:.1f}", ha="center", va="center", fontsize=6,
                                    color="white" if m[r, c] < lo + 0.6 * (hi - lo) else "black")
            if k < len(row.marks) and row.marks[k] is not None:
                ax.plot(row.marks[k][1], row.marks[k][0], marker="*", color="red", markersize=14)
            s = row.borders[k] if k < len(row.borders) else 1
            for i in range(1, s):
                ax.axhline(i * h / s - 0.5, color="red", lw=1.2)
                ax.axvline(i * w / s - 0.5, color="red", lw=1.2)
            ax.set_title(row.titles[k], fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=list(row_axes), shrink=0.85, label=row.label)
    fig.suptitle(suptitle, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    paths.write_bytes(path, buffer.getvalue())


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None    # NaN (a reference cell) is not JSON
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_outputs(out, results: dict, settings: Settings, sources: dict) -> dict:
    """PNGs and the JSON into `out`; returns the JSON's content."""
    out = paths.makedirs(out)
    d, n = results["dim"], settings.n
    refs, marginal = results["pairwise"], results["marginal"]
    _draw(out / PAIRWISE_PNG, [
        Row([marginal] + [p["entropy"] for p in refs],
            ["H(v_i), no conditioning"] + [f"H(v_i | v_j), j = {tuple(p['reference'])} (star)" for p in refs],
            marks=[None] + [p["reference"] for p in refs]),
        Row([marginal - p["entropy"] for p in refs],
            [f"H(v_i) - H(v_i | v_j), j = {tuple(p['reference'])}" for p in refs], label="nats removed",
            cmap="magma", marks=[p["reference"] for p in refs])],
        f"Entropy of each token's codebook vector (d = {d}), Gaussian bound on held-out residuals; "
        f"bottom: how much knowing v_j lowers it")
    orders = results["orders"]
    _draw(out / ORDERS_PNG, [
        Row([orders[k]["increase"] for k, _ in ORDERS],
            [f"{name}, n = {n}: mean +{orders[k]['mean_increase']:.3f}" for k, name in ORDERS], cmap="magma",
            borders=[math.isqrt(n), 1])],
        "H(token | earlier steps) - H(token | all earlier tokens): what generating a group at once gives up")
    record = {"settings": dataclasses.asdict(settings), **sources, **results,
              "pictures": [PAIRWISE_PNG, ORDERS_PNG]}
    record = _jsonable(record)
    paths.write_json(out / RESULTS_JSON, record)
    return record


def table(results: dict, n: int) -> str:
    """A short text summary: the pairwise maps near and far from each reference, the order comparison."""
    h, w = results["grid_shape"]
    lines = [f"token dependency: {h}x{w} tokens, d = {results['dim']}, {results['images']['train']} train / "
             f"{results['images']['held_out']} held-out images; entropies in nats per token (Gaussian bound)",
             f"  H(v_i) without conditioning: mean {np.mean(results['marginal']):.3f}",
             "  reference   H(v_i|v_j): 4-neighbours  others   H(v_i) - H(v_i|v_j): 4-neighbours  others"]
    for p in results["pairwise"]:
        (r, c), m = p["reference"], np.asarray(p["entropy"], float)
        drop = np.asarray(results["marginal"], float) - m
        near = np.zeros(m.shape, bool)
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            if 0 <= r + dr < h and 0 <= c + dc < w:
                near[r + dr, c + dc] = True
        far = ~near & np.isfinite(m)
        lines.append(f"  {f'({r}, {c})':<12}{m[near].mean():>26.3f}{m[far].mean():>8.3f}"
                     f"{drop[near].mean():>37.3f}{drop[far].mean():>8.3f}")
    lines.append(f"  order (n = {n})          H sequential   H parallel   increase (mean)   increase (max)")
    for kind, name in ORDERS:
        o = results["orders"][kind]
        lines.append(f"  {name:<22}{o['mean_sequential']:>14.3f}{o['mean_parallel']:>13.3f}"
                     f"{o['mean_increase']:>18.3f}{o['max_increase']:>17.3f}")
    return "\n".join(lines)


# ----- the command -----

def load_features(codes_dir: str, tokenizer_path: str, max_images: int):
    """(token vectors (B, h*w, d) of the codes' eval view, codes metadata); mistakes are UsageErrors."""
    from par_jax.data import codes as codes_lib  # noqa: PLC0415

    try:
        source = codes_lib.CodesSource(codes_dir)
    except (FileNotFoundError, ValueError) as e:
        raise config_args.UsageError(f"--codes_dir={codes_dir}: {e}") from None
    meta = source.metadata
    count = min(len(source), max_images)
    codes = np.stack([r["codes"][meta.eval_view] for lo in range(0, count, 1024)
                      for r in source.__getitems__(range(lo, min(lo + 1024, count)))])
    from par_jax import tokenizer  # noqa: PLC0415  (jax and flax: after the cheap checks)
    try:
        model = tokenizer.load(tokenizer_path, codes_dir=codes_dir)
    except (FileNotFoundError, ValueError) as e:
        raise config_args.UsageError(f"--tokenizer={tokenizer_path}: {e}") from None
    codebook = np.asarray(model.quantize.codebook())
    if meta.vocab_size > len(codebook):
        raise config_args.UsageError(f"the codes use a vocabulary of {meta.vocab_size} but the tokenizer at "
                                     f"{tokenizer_path} has {len(codebook)} codebook entries: pass the tokenizer "
                                     f"the codes were extracted with (metadata: {meta.tokenizer!r}).")
    return token_features(codes, codebook), meta


def define_flags(fv: flags.FlagValues, argv) -> None:
    del argv
    flags.DEFINE_string("codes_dir", None, "A codes directory (par_jax.data.codes).", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "The tokenizer the codes were extracted with (export or workdir).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "Folder for the PNGs and dependency.json.", flag_values=fv)
    flags.DEFINE_integer("n", 4, "Tokens per parallel step of both orders compared.", flag_values=fv)
    flags.DEFINE_list("references", [], "Reference cells ROW:COL of the pairwise maps; default the centre and the "
                      "top-left corner.", flag_values=fv)
    flags.DEFINE_integer("max_images", 10_000, "Use at most this many images (the first ones).", flag_values=fv)
    flags.DEFINE_float("held_out", 0.2, "Fraction of the images kept out of the fit to score residuals.",
                       flag_values=fv)
    flags.DEFINE_float("ridge", 1e-3, "Regression ridge, relative to the mean variance of the token vectors.",
                       flag_values=fv)
    flags.DEFINE_float("sigma_ridge", 1e-3, "Ridge on the residual covariance, relative likewise.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the train / held-out split.", flag_values=fv)
    flags.mark_flags_as_required(["codes_dir", "tokenizer", "out"], flag_values=fv)


def settings_from_flags(f, grid_shape) -> Settings:
    """The flags as Settings, checked against the codes' grid; every mistake is a UsageError."""
    h, w = grid_shape
    refs = []
    for item in f.references:
        try:
            r, c = (int(v) for v in item.split(":"))
        except ValueError:
            raise config_args.UsageError(f"--references takes ROW:COL cells separated by commas (e.g. 4:4,0:0), "
                                         f"got {item!r}.") from None
        if not (0 <= r < h and 0 <= c < w):
            raise config_args.UsageError(f"--references cell {item} lies outside the {h}x{w} token grid.")
        refs.append((r, c))
    for kind, _ in ORDERS:
        try:
            ordering.OrderSpec(tuple(grid_shape), f.n, kind=kind)
        except ValueError as e:
            raise config_args.UsageError(f"--n={f.n}: {e}") from None
    if not 0 < f.held_out < 1:
        raise config_args.UsageError(f"--held_out must lie strictly between 0 and 1, got {f.held_out}.")
    if f.ridge <= 0 or f.sigma_ridge < 0:
        raise config_args.UsageError(f"--ridge must be positive and --sigma_ridge non-negative, got {f.ridge} and "
                                     f"{f.sigma_ridge}.")
    if f.max_images < 1:
        raise config_args.UsageError(f"--max_images must be positive, got {f.max_images}.")
    return Settings(n=f.n, references=tuple(refs), max_images=f.max_images, held_out=f.held_out, ridge=f.ridge,
                    sigma_ridge=f.sigma_ridge, seed=f.seed)


def main(argv=None) -> dict:
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    from par_jax.data import codes as codes_lib  # noqa: PLC0415
    try:
        grid_shape = codes_lib.CodesMetadata.load(f.codes_dir).grid_shape
    except (FileNotFoundError, ValueError) as e:
        raise config_args.UsageError(f"--codes_dir={f.codes_dir}: {e}") from None
    settings = settings_from_flags(f, grid_shape)
    try:
        paths.check_writable(f.out)
    except PermissionError as e:
        raise config_args.UsageError(f"--out: {e}") from None
    start = time.perf_counter()
    features, meta = load_features(f.codes_dir, f.tokenizer, settings.max_images)
    try:
        results = analyse(features, grid_shape, settings)
    except ValueError as e:  # too few images for the split
        raise config_args.UsageError(f"--codes_dir={f.codes_dir}: {e}") from None
    results["seconds"] = time.perf_counter() - start
    sources = {"codes_dir": f.codes_dir, "tokenizer": f.tokenizer, "codes_source": meta.source,
               "eval_view": meta.eval_view, "vocab_size": meta.vocab_size}
    record = write_outputs(f.out, results, settings, sources)
    print(table(results, settings.n))
    print(f"wrote {', '.join(record['pictures'] + [RESULTS_JSON])} to {f.out} ({results['seconds']:.1f} s)")
    return record


if __name__ == "__main__":
    config_args.run(main)
