"""The token-dependency analysis (par_jax.analysis.dependency): the Gaussian entropy estimator against closed forms,
the maps on token grids with a planted dependency, and the command end to end on tiny codes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from par_jax import ordering
from par_jax.analysis import dependency as dep
from par_jax.core import config_args


def _gaussian_entropy_exact(cov):
    d = len(cov)
    return 0.5 * (d * np.log(2 * np.pi * np.e) + np.linalg.slogdet(cov)[1])


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_gaussian_entropy_recovers_the_differential_entropy_of_a_known_covariance():
    rng = np.random.default_rng(0)
    cov = _random_cov(rng, 4)
    samples = rng.multivariate_normal(np.full(4, 3.0), cov, size=40_000)
    assert float(dep.gaussian_entropy(samples)) == pytest.approx(_gaussian_entropy_exact(cov), abs=0.03)
    # The ridge is what a direction without spread counts: constant data gives exactly 1/2 log((2 pi e r)^d).
    constant = np.ones((100, 3))
    assert float(dep.gaussian_entropy(constant, ridge=1e-2)) == pytest.approx(1.5 * np.log(2 * np.pi * np.e * 1e-2),
                                                                             rel=1e-5)


def test_conditional_entropy_of_a_linear_gaussian_pair():
    # y = A x + e with e ~ N(0, S_e): H(y | x) = H(e), H(y) is the entropy of A S_x A^T + S_e.
    rng = np.random.default_rng(1)
    d, n = 3, 30_000
    cov_x, cov_e, a = _random_cov(rng, d), 0.2 * _random_cov(rng, d), rng.normal(size=(d, d))
    x = rng.multivariate_normal(np.zeros(d), cov_x, size=n)
    y = x @ a.T + rng.multivariate_normal(np.zeros(d), cov_e, size=n)
    probe = dep.fit_probe(np.stack([x, y], axis=1), ridge=1e-6, sigma_ridge=0.0)
    h_y_given_x = dep.pairwise_entropies(probe, reference=0)[1]
    assert h_y_given_x == pytest.approx(_gaussian_entropy_exact(cov_e), abs=0.05)
    assert dep.marginal_entropies(probe)[1] == pytest.approx(_gaussian_entropy_exact(a @ cov_x @ a.T + cov_e),
                                                             abs=0.05)


def _chain_codes(rng, count, grid, vocab, keep=0.85):
    """Token grids whose rows are Markov chains: each token copies its left neighbour with probability `keep`, else
    is uniform. Rows are independent of each other."""
    h, w = grid
    codes = rng.integers(0, vocab, (count, h, w))
    for c in range(1, w):
        copy = rng.random((count, h)) < keep
        codes[:, :, c] = np.where(copy, codes[:, :, c - 1], codes[:, :, c])
    return codes


@pytest.fixture(scope="module")
def chain_probe():
    rng = np.random.default_rng(2)
    codebook = rng.normal(size=(32, 4))
    features = dep.token_features(_chain_codes(rng, 3000, (8, 8), 32), codebook)
    return dep.fit_probe(features)


def test_pairwise_map_is_lowest_next_to_the_reference(chain_probe):
    r, c = 3, 4
    m = dep.pairwise_entropies(chain_probe, r * 8 + c).reshape(8, 8)
    assert np.isnan(m[r, c]) and np.isfinite(np.delete(m.reshape(-1), r * 8 + c)).all()
    lowest = np.unravel_index(np.nanargmin(m), m.shape)
    assert lowest in ((r, c - 1), (r, c + 1))
    # Along the row the dependency fades with distance; other rows are independent of the reference.
    assert m[r, c + 1] < m[r, c + 2] < m[r, c + 3]
    other_rows = np.delete(m, r, axis=0)
    assert other_rows.min() > max(m[r, c - 1], m[r, c + 1]) + 0.5
    marginal = dep.marginal_entropies(chain_probe).reshape(8, 8)
    assert np.abs(np.delete(marginal - m, r, axis=0)).max() < 0.05


def test_order_increase_is_zero_for_the_sequential_tokens_and_smaller_for_distant_groups(chain_probe):
    # Row chains make horizontal neighbours dependent: raster order with 4 consecutive tokens per step hides them
    # from each other, PAR's region order puts tokens 4 apart (different regions) in a group.
    region = dep.order_entropies(chain_probe, ordering.OrderSpec((8, 8), 4, kind="region"))
    raster = dep.order_entropies(chain_probe, ordering.OrderSpec((8, 8), 4, kind="raster_multi"))
    for o, spec in ((region, ordering.OrderSpec((8, 8), 4)), (raster, ordering.OrderSpec((8, 8), 4, "raster_multi"))):
        first = spec.perm[:4]
        assert (o["increase"][first] == 0).all() and (o["step"][first] == np.arange(4)).all()
        # Hiding tokens never helps, up to estimation noise: a regression on up to 60 tokens fitted on 2400 images
        # scores a little worse on held-out images than one on fewer.
        assert o["increase"].min() > -0.05
    assert raster["increase"].mean() > 0.2
    assert region["increase"].mean() < 0.5 * raster["increase"].mean()


def test_probe_refuses_a_target_in_its_own_prefix(chain_probe):
    with pytest.raises(ValueError, match="own conditioning prefix"):
        chain_probe.entropies(np.arange(64), [5], [6])


# ----- the command -----

def _tiny_tokenizer(directory, rng):
    """A tokenizer checkpoint whose only meaningful weights are a random codebook (the analysis reads nothing else);
    built from the abstract model, as initialising the convolutions would take longer than the whole analysis."""
    import jax
    from flax import nnx

    from par_jax import tokenizer as tokenizer_lib
    from par_jax.core import checkpoint
    cfg = tokenizer_lib.vq_config("fmnist", base_channels=8, z_channels=8, codebook_size=64, num_groups=4,
                                  num_res_blocks=1, attn_levels=())
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tokenizer_lib.VQModel(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state))
    model.quantize.embedding[...] = rng.normal(size=(64, cfg.codebook_dim)).astype(np.float32)
    return str(checkpoint.save_params(directory, model))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from par_jax.data import codes as codes_lib
    root = tmp_path_factory.mktemp("dependency")
    rng = np.random.default_rng(3)
    tokenizer = _tiny_tokenizer(root / "tokenizer", rng)
    grids = _chain_codes(rng, 240, (4, 4), 64)
    codes_dir = str(root / "codes")
    codes_lib.write_codes(codes_dir, ((g[None], int(i % 3)) for i, g in enumerate(grids)), grid_shape=(4, 4),
                          num_views=1, vocab_size=64, num_classes=3, tokenizer="tiny")
    return root, codes_dir, tokenizer


def test_command_writes_maps_and_json(tiny_run, capsys):
    root, codes_dir, tokenizer = tiny_run
    out = str(root / "out")
    record = dep.main(["prog", f"--codes_dir={codes_dir}", f"--tokenizer={tokenizer}", f"--out={out}",
                       "--references=1:1,0:3", "--max_images=200"])
    assert sorted(os.listdir(out)) == sorted([dep.PAIRWISE_PNG, dep.ORDERS_PNG, dep.RESULTS_JSON])
    for name in (dep.PAIRWISE_PNG, dep.ORDERS_PNG):
        assert Image.open(os.path.join(out, name)).size[0] > 400
    saved = json.load(open(os.path.join(out, dep.RESULTS_JSON)))
    assert saved == record
    assert saved["settings"] == {"n": 4, "references": [[1, 1], [0, 3]], "max_images": 200, "held_out": 0.2,
                                 "ridge": 1e-3, "sigma_ridge": 1e-3, "seed": 0}
    assert saved["images"] == {"train": 160, "held_out": 40} and saved["codes_dir"] == codes_dir
    assert saved["pairwise"][0]["entropy"][1][1] is None       # the reference cell
    region = saved["orders"]["region"]
    assert np.mean(region["increase"]) == pytest.approx(region["mean_increase"])
    table = capsys.readouterr().out
    assert "PAR region order" in table and "raster order" in table and "(0, 3)" in table


@pytest.mark.parametrize("flag, says", [
    ("--n=3", "not a perfect square"),
    ("--references=9:9", "outside the 4x4 token grid"),
    ("--references=centre", "ROW:COL"),
    ("--held_out=1.5", "--held_out"),
])
def test_command_names_a_bad_flag(tiny_run, flag, says):
    root, codes_dir, tokenizer = tiny_run
    with pytest.raises(config_args.UsageError, match=says):
        dep.main(["prog", f"--codes_dir={codes_dir}", f"--tokenizer={tokenizer}", f"--out={root / 'bad'}", flag])


def test_command_names_a_missing_codes_dir_or_tokenizer(tiny_run):
    root, codes_dir, tokenizer = tiny_run
    with pytest.raises(config_args.UsageError, match="--codes_dir=.*not a codes directory"):
        dep.main(["prog", f"--codes_dir={root}", f"--tokenizer={tokenizer}", f"--out={root / 'bad'}"])
    with pytest.raises(config_args.UsageError, match="--tokenizer="):
        dep.main(["prog", f"--codes_dir={codes_dir}", f"--tokenizer={root / 'nothing'}", f"--out={root / 'bad'}"])
