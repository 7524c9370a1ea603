"""Evaluation: metrics against closed forms, the ADM file layout, the release's resize, the FID Inception network's
structure and weight loader, the Fashion-MNIST classifier, and the evaluate job end to end on tiny models."""

import dataclasses
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from par_jax.evaluation import classifier, features, inception, metrics, npz, resize


def _gaussian(rng, n, mu, cov):
    return rng.multivariate_normal(mu, cov, size=n)


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------

def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 1 + 6.25 + 4 + 1 = 12.25
    got = metrics.frechet_distance(metrics.FeatureStats(mu1, np.diag(a), 0), metrics.FeatureStats(mu2, np.diag(b), 0))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(12.25)


def test_frechet_distance_matches_closed_form_for_non_commuting_covariances():
    # For 2x2 PSD matrices tr((S1 S2)^(1/2)) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = metrics.frechet_distance(metrics.FeatureStats(mu1, s1, 0), metrics.FeatureStats(mu2, s2, 0))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_random_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 40)), rng.normal(size=(64, 80))
    s1, s2 = a @ a.T / 40, b @ b.T / 80  # s1 is rank-deficient (40 < 64)
    reference = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2).real)
    got = metrics.frechet_distance(metrics.FeatureStats(np.zeros(64), s1, 0),
                                   metrics.FeatureStats(np.zeros(64), s2, 0))
    assert got == pytest.approx(reference, rel=1e-7)


def test_frechet_distance_from_samples_of_known_gaussians():
    rng = np.random.default_rng(1)
    cov1 = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]])
    cov2 = np.array([[2.0, -0.2, 0.1], [-0.2, 1.0, 0.0], [0.1, 0.0, 1.5]])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -1.0])
    exact = metrics.frechet_distance(metrics.FeatureStats(mu1, cov1, 0), metrics.FeatureStats(mu2, cov2, 0))
    x, y = _gaussian(rng, 40_000, mu1, cov1), _gaussian(rng, 40_000, mu2, cov2)
    got = metrics.frechet_distance(metrics.feature_stats(x), metrics.feature_stats(y))
    assert got == pytest.approx(exact, rel=0.03)


def test_feature_set_against_itself_is_zero_even_far_from_the_origin():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    stats = metrics.feature_stats(x)
    assert metrics.frechet_distance(stats, stats) < 1e-9
    # A large common offset must not change distances (the accumulator centres its sums).
    y = x[::-1] * 1.1 + 0.3
    d = metrics.frechet_distance(metrics.feature_stats(x), metrics.feature_stats(y))
    shifted = metrics.frechet_distance(metrics.feature_stats(x + 1e4), metrics.feature_stats(y + 1e4))
    assert d > 0.1 and shifted == pytest.approx(d, rel=1e-6)


def test_streaming_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=5.0, size=(257, 7))
    acc = metrics.StatsAccumulator()
    for i in range(0, len(x), 50):
        acc.update(x[i:i + 50])
    stats = acc.result()
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.count == 257


def test_bad_inputs_give_clear_errors():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="too few samples.*got 10, need at least 17"):
        metrics.feature_stats(rng.normal(size=(10, 16)))
    assert metrics.feature_stats(rng.normal(size=(10, 16)), min_samples=2).count == 10  # explicit opt-in
    with pytest.raises(ValueError, match="too few samples"):
        metrics.feature_stats(rng.normal(size=(1, 16)), min_samples=1)
    a, b = metrics.feature_stats(rng.normal(size=(40, 8))), metrics.feature_stats(rng.normal(size=(40, 4)))
    with pytest.raises(ValueError, match="feature sizes differ: 8 vs 4"):
        metrics.frechet_distance(a, b)
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.precision_recall(rng.normal(size=(20, 8)), rng.normal(size=(20, 4)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.feature_stats(np.full((20, 2), np.nan))
    with pytest.raises(ValueError, match=r"\(num_samples, feature_dim\)"):
        metrics.feature_stats(rng.normal(size=(20,)))
    with pytest.raises(ValueError, match="more than 3 samples"):
        metrics.knn_radii(rng.normal(size=(3, 2)), k=3)


# ----------------------------------------------------------------------------------------------------------------
# Inception Score, precision / recall, class consistency
# ----------------------------------------------------------------------------------------------------------------

def test_inception_score_is_one_for_uniform_and_num_classes_for_confident_balanced_predictions():
    mean, std = metrics.inception_score(np.zeros((100, 10)))
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # Every class equally often, each prediction certain: IS = 10 in every split of 40.
    logits = np.full((200, 10), -1e4)
    logits[np.arange(200), np.arange(200) % 10] = 0.0
    mean, std = metrics.inception_score(logits, split_size=40)
    assert mean == pytest.approx(10.0, rel=1e-5) and std == pytest.approx(0.0, abs=1e-4)
    # Confident but all one class: 1. Two classes only: 2.
    assert metrics.inception_score(logits[::10], split_size=40)[0] == pytest.approx(1.0, abs=1e-5)
    assert metrics.inception_score(logits[np.arange(200) % 10 < 2])[0] == pytest.approx(2.0, rel=1e-5)


def test_inception_score_splits_are_consecutive_chunks():
    logits = np.full((60, 4), -1e4)
    logits[:40, :] = 0.0                                # first 40 rows uniform: IS 1
    logits[40:, :] = -1e4
    logits[np.arange(40, 60), np.arange(20) % 4] = 0.0  # last 20 confident and balanced: IS 4
    mean, std = metrics.inception_score(logits, split_size=20)
    assert mean == pytest.approx((1 + 1 + 4) / 3, rel=1e-5)
    assert std == pytest.approx(np.std([1, 1, 4]), rel=1e-5)


def test_knn_radii_match_brute_force_with_ragged_blocks():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(37, 5)).astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]  # index 0 is the point itself
    np.testing.assert_allclose(metrics.knn_radii(x, k=3, block_size=8), expected, rtol=1e-4, atol=1e-5)


def test_precision_recall_on_identical_separable_and_partial_sets():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(200, 8)).astype(np.float32)
    assert metrics.precision_recall(real, real, block_size=64) == (1.0, 1.0)
    far = real + 100.0
    assert metrics.precision_recall(real, far, block_size=64) == (0.0, 0.0)
    # Real data has two far-apart modes; the generator covers one of them: precision 1, recall 1/2.
    modes = np.concatenate([rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 50.0]).astype(np.float32)
    assert metrics.precision_recall(modes, modes[:100], block_size=64) == (1.0, 0.5)
    # Fresh samples of the covered mode: nearly all inside the real manifold, at most half of the real set covered.
    precision, recall = metrics.precision_recall(modes, rng.normal(size=(100, 8)).astype(np.float32), block_size=64)
    assert precision > 0.7 and 0.3 < recall <= 0.5


def test_class_consistency():
    logits = np.eye(4)[[0, 1, 2, 3, 0]]
    assert metrics.class_consistency(logits, [0, 1, 2, 0, 0]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="labels must be"):
        metrics.class_consistency(logits, [0, 1])


# ----------------------------------------------------------------------------------------------------------------
# ADM .npz files and the release's resize
# ----------------------------------------------------------------------------------------------------------------

def test_npz_has_the_adm_layout_and_streams(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (10, 8, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 10)
    path = str(tmp_path / "samples.npz")
    with npz.NpzWriter(path, 10, (8, 6, 3)) as writer:
        writer.write(images[:4], labels[:4])
        writer.write(images[4:], labels[4:])
    with np.load(path) as f:
        assert f.files == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (10, 8, 6, 3)
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as member:
        assert np.lib.format.read_magic(member) in ((1, 0), (2, 0))  # the versions ADM's streaming reader takes
    batches = list(npz.iter_batches(path, 3))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_writer_rejects_bad_images_and_incomplete_files(tmp_path):
    with npz.NpzWriter(str(tmp_path / "a.npz"), 2, (4, 4, 3)) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((2, 4, 4, 3), np.float32), [0, 0])
        writer.write(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    writer = npz.NpzWriter(str(tmp_path / "b.npz"), 3, (4, 4, 3))
    writer.write(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="incomplete: 2 of 3"):
        writer.close()
    with pytest.raises(ValueError, match="no array 'arr_0'"):
        np.savez(str(tmp_path / "c.npz"), images=np.zeros(1))
        list(npz.iter_batches(str(tmp_path / "c.npz"), 1))


def test_bicubic_resize_and_uint8_rule_match_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    for h, w, out in [(24, 24, 16), (16, 12, 24), (7, 5, 9)]:
        x = rng.uniform(-1.2, 1.2, (2, h, w, 3)).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(out, out),
                                              mode="bicubic").permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(resize.resize_bicubic(x, out)), ref, atol=1e-5)
    values = np.linspace(-1.1, 1.1, 2001).astype(np.float32)
    ref = torch.clamp(127.5 * torch.from_numpy(values) + 128.0, 0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(resize.to_uint8(values)), ref)


def test_inception_input_resize_matches_tensorflow_1_bilinear():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(9)
    for h, w in [(256, 256), (32, 20)]:
        x = rng.uniform(0, 255, (1, h, w, 3)).astype(np.float32)
        ref = tf.raw_ops.ResizeBilinear(images=x, size=[299, 299], align_corners=False,
                                        half_pixel_centers=False).numpy()
        np.testing.assert_allclose(np.asarray(inception.tf1_resize_bilinear(x, 299)), ref, atol=1e-2)  # of 255


# ----------------------------------------------------------------------------------------------------------------
# FID InceptionV3: structure, pieces against PyTorch, weight loader on a made-up file
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made_up_weights():
    return _made_up_weights()


def _made_up_weights(seed=0):
    """Random weights in the PyTorch FID Inception layout that keep activations alive through 94 conv layers."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in inception.torch_state_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            state[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("bn.weight"):
            state[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            state[key] = (rng.normal(size=shape) * 0.05).astype(np.float32)
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # present in some files; ignored
    return state


def test_inception_has_the_fid_network_structure():
    shapes = inception.torch_state_shapes()
    # 94 conv units x (conv weight + 4 BatchNorm arrays) + fc weight and bias; torchvision's InceptionV3 has
    # 27,161,264 parameters with its aux classifier (3,326,696) and 1000 classes; the FID net has 1008 classes.
    assert len(shapes) == 94 * 5 + 2
    trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
    assert trainable == 27_161_264 - 3_326_696 + 8 * 2049
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_1.conv.weight"] == (448, 2048, 1, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    abstract = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m, x: m(x), abstract, jax.ShapeDtypeStruct((4, 256, 256, 3), jnp.uint8))
    assert {k: v.shape for k, v in out.items()} == {"pool": (4, 2048), "logits": (4, 1008),
                                                    "logits_unbiased": (4, 1008), "spatial": (4, 17 * 17 * 7)}


def test_inception_loader_and_forward_on_a_made_up_weights_file(tmp_path, made_up_weights):
    state = made_up_weights
    path = str(tmp_path / "inception.npz")
    np.savez(path, **state)
    model = inception.load(path, input_size=75)  # the smallest input the graph takes: fast on a CPU
    np.testing.assert_array_equal(np.asarray(model.Mixed_6b.branch7x7_2.conv.kernel[...]),
                                  state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.Mixed_5b.branch_pool.bn.var[...]),
                                  state["Mixed_5b.branch_pool.bn.running_var"])
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 52, 3), dtype=np.uint8)
    out = jax.jit(lambda x: model(x))(images)
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008) and out["spatial"].shape == (3, 63)
    pool = np.asarray(out["pool"])
    assert np.all(np.isfinite(pool)) and np.all(pool >= 0) and np.std(pool, axis=0).max() > 1e-3
    np.testing.assert_allclose(out["logits_unbiased"], pool @ state["fc.weight"].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits"], pool @ state["fc.weight"].T + state["fc.bias"], rtol=1e-4, atol=1e-4)


def test_inception_loader_errors_name_the_problem(tmp_path, made_up_weights):
    state = made_up_weights
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception.load(str(tmp_path / "missing.pth"))
    bad = dict(state)
    del bad["Mixed_7c.branch1x1.conv.weight"]
    bad["aux.weight"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \['Mixed_7c.branch1x1.conv.weight'\].*1 unexpected"):
        inception.load(bad)
    bad = dict(state)
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 2048\).*needs \(1008, 2048\)"):
        inception.load(bad)


def test_inception_pieces_match_pytorch_ops():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 9, 11, 6)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    # conv (1x7, padding (0, 3)) + BatchNorm(eps=1e-3) + ReLU, with PyTorch-layout weights through the loader's
    # layout conversion.
    w = rng.normal(size=(5, 6, 1, 7)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    mean, var = rng.normal(size=5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
    unit = nnx.eval_shape(lambda: inception.BasicConv2d(6, 5, (1, 7), padding=(0, 3), rngs=nnx.Rngs(0)))
    graphdef, st = nnx.split(unit)
    values = {("conv", "kernel"): inception._from_torch_layout(w), ("bn", "scale"): gamma, ("bn", "bias"): beta,
              ("bn", "mean"): mean, ("bn", "var"): var}
    flat = nnx.to_flat_state(st)
    for path, variable in flat:
        variable.set_value(jnp.asarray(values[tuple(str(p) for p in path)]))
    unit = nnx.merge(graphdef, nnx.from_flat_state(flat))
    ref = F.relu(F.batch_norm(F.conv2d(xt, torch.from_numpy(w), padding=(0, 3)), torch.from_numpy(mean),
                              torch.from_numpy(var), torch.from_numpy(gamma), torch.from_numpy(beta), eps=1e-3))
    np.testing.assert_allclose(np.asarray(unit(x)), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
    # TF-style average pool (padding not counted), stride-1 padded max pool, stride-2 max pool.
    ref = F.avg_pool2d(xt, 3, 1, 1, count_include_pad=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3(x)), ref, rtol=1e-5, atol=1e-6)
    ref = F.max_pool2d(xt, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception._max_pool(x, 1, pad=1)), ref)
    ref = F.max_pool2d(xt, 3, 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception._max_pool(x, 2)), ref)


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST classifier
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist_test_split():
    return classifier.load_split("test")


@pytest.fixture(scope="module")
def small_classifier(tmp_path_factory, fmnist_test_split):
    """A classifier trained for a few steps on part of the test split (the real one trains on the train split)."""
    images, labels = fmnist_test_split
    settings = classifier.TrainSettings(steps=60, batch_size=64, log_every=30)
    model, history = classifier.train(settings, data=(images[:4000], labels[:4000]))
    directory = tmp_path_factory.mktemp("classifier") / "fmnist_classifier"
    classifier.save(directory, model, {"test_accuracy": 0.0, "history": history})
    return model, history, str(directory)


def test_classifier_trains_and_improves(small_classifier, fmnist_test_split):
    model, history, _ = small_classifier
    images, labels = fmnist_test_split
    assert history[-1]["loss"] < history[0]["loss"]
    held_out = classifier.accuracy(model, classifier.place(images[8000:9000]), labels[8000:9000])
    assert held_out > 0.6  # chance is 0.1; a few dozen steps already separate most classes
    out = model(jnp.asarray(classifier.place(images[:3])))
    assert out["pool"].shape == (3, classifier.FEATURE_DIM) and out["logits"].shape == (3, 10)


def test_classifier_save_load_round_trip_and_feature_network(small_classifier, fmnist_test_split):
    model, _, directory = small_classifier
    loaded, metadata = classifier.load(directory)
    x = jnp.asarray(classifier.place(fmnist_test_split[0][:5]))
    np.testing.assert_allclose(loaded(x)["logits"], model(x)["logits"], rtol=1e-5, atol=1e-5)
    assert "history" in metadata
    # Loading inside a training loop's mesh context (abstract shapes then carry the mesh) must work too.
    with jax.set_mesh(jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))):
        in_mesh, _ = classifier.load(directory)
    np.testing.assert_allclose(in_mesh(x)["logits"], model(x)["logits"], rtol=1e-5, atol=1e-5)
    net = features.classifier_network(directory, batch_size=4)  # batches of 4, padded: 5 -> 2 calls
    out = net(np.asarray(x))
    assert out["pool"].shape == (5, classifier.FEATURE_DIM)
    np.testing.assert_allclose(out["logits"], model(x)["logits"], rtol=1e-5, atol=1e-5)
    assert not net.comparable_to_published and "NOT comparable" in net.description
    # 28x28 pictures are padded-size agnostic: the classifier resizes other sizes to 32x32.
    assert model(jnp.zeros((2, 64, 64, 3), jnp.uint8))["logits"].shape == (2, 10)
    with pytest.raises(FileNotFoundError, match="no Fashion-MNIST classifier"):
        classifier.load(os.path.join(directory, "nowhere"))


# ----------------------------------------------------------------------------------------------------------------
# Labels, metric registry, the evaluate job
# ----------------------------------------------------------------------------------------------------------------

def test_labels_uniform_and_balanced():
    from par_jax.evaluation import generate
    uniform = generate.make_labels(1000, 10, "uniform", seed=1)
    assert uniform.min() >= 0 and uniform.max() <= 9 and len(np.unique(uniform)) == 10
    np.testing.assert_array_equal(uniform, generate.make_labels(1000, 10, "uniform", seed=1))
    balanced = generate.make_labels(1003, 10, "balanced", seed=1)
    counts = np.bincount(balanced, minlength=10)
    assert counts.max() - counts.min() == 1 and counts.sum() == 1003
    with pytest.raises(ValueError, match="unknown label mode"):
        generate.make_labels(10, 10, "sorted")


def _eval_config(**overrides):
    from configs import par
    config = par.get_config("runlocal")
    config.eval.update(overrides)
    return config


def test_settings_are_read_once_and_checked():
    from par_jax.evaluation.settings import EvalSettings
    with pytest.raises(ValueError, match="unknown or no metrics \\['fdi'\\]"):
        EvalSettings.from_config(_eval_config(metrics="fid,fdi"))
    config = _eval_config(metrics=" fid, is ", reference="fashion_mnist")
    config.data.update(views="pad", image_size=32, tokenizer="/tok")
    s = EvalSettings.from_config(config, num_samples=100)
    assert s.metrics == ("fid", "is") and s.num_samples == 100 and s.reference == "fashion_mnist"
    assert (s.reference_views, s.reference_image_size, s.tokenizer) == ("pad", 32, "/tok")
    assert s.batch_size == config.eval.batch_size and s.feature_network == "fmnist_classifier"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_samples = 5
    config.sample.tokenizer = "/other"  # the sampling tokenizer wins over the codes' one
    assert EvalSettings.from_config(config).tokenizer == "/other"
    with pytest.raises(ValueError, match="unknown evaluation settings \\['every_step'\\]"):
        EvalSettings.from_config(config, every_step=5)
    with pytest.raises(ValueError, match="unknown label mode"):
        EvalSettings.from_config(config, labels="sorted")
    with pytest.raises(ValueError, match="reference_stats"):
        EvalSettings.from_config(config, reference_stats="cached")
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        EvalSettings.from_config(config, num_samples=0)


def test_the_plugin_checks_its_inputs_before_training(tmp_path):
    from par_jax.evaluation import plugin
    config = _eval_config(reference="fashion_mnist")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        plugin.GenerationMetrics(config)
    config.data.tokenizer = str(tmp_path)
    made = plugin.GenerationMetrics(config, num_samples=16)
    assert made.settings.num_samples == 16 and made.network is None  # nothing heavy is built before the first call
    with pytest.raises(FileNotFoundError, match="inception_weights=''"):
        plugin.GenerationMetrics(config, feature_network="inception")
    with pytest.raises(FileNotFoundError, match="reference batch"):
        plugin.GenerationMetrics(config, reference=str(tmp_path / "ref.npz"))
    with pytest.raises(ValueError, match="unknown evaluation settings"):
        plugin.GenerationMetrics(config, every_step=5)
    config.data.tokenizer = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer .*missing"):
        plugin.GenerationMetrics(config)


def test_evaluate_job_scores_an_existing_npz(tmp_path, small_classifier, fmnist_test_split):
    from par_jax.evaluation import job
    images, labels = fmnist_test_split
    path = str(tmp_path / "external.npz")
    np.savez(path, classifier.place(images[:200]), labels[:200])  # arr_0, arr_1 as guided-diffusion writes them
    config = _eval_config(samples=path, classifier=small_classifier[2], reference="fashion_mnist",
                          reference_count=300, resolution=0, fid_min_samples=0,
                          metrics="fid,is,precision_recall,class_consistency", is_split_size=100)
    config.data.update(views="pad", image_size=32)
    record = job.run(config, str(tmp_path / "work"))
    m = record["metrics"]
    # Real test images against real test images: a small FID, high precision/recall, consistency = accuracy.
    assert 0 <= m["fid"] < 20 and m["precision"] > 0.7 and m["recall"] > 0.7
    assert m["class_consistency"] > 0.6 and 1 < m["inception_score"] <= 10
    assert record["comparable_to_published"] is False
    s = record["settings"]
    assert s["samples_file"] == os.path.abspath(path) and s["reference_count"] == 300
    assert s["feature_network"] == "fmnist_classifier" and s["pr_k"] == 3
    out = tmp_path / "work" / "eval" / "file_fmnist_classifier_200"
    assert json.loads((out / "results.json").read_text())["metrics"] == pytest.approx(m)
    assert (out / "samples_grid.png").exists() and any(p.name.startswith("events") for p in out.iterdir())


def test_evaluate_job_samples_a_checkpoint_end_to_end(tmp_path, small_classifier):
    """Tiny decoder + tiny tokenizer: sample, decode, resize, write the ADM file, score, record, and the same metrics
    through the training-loop plug-in."""
    from par_jax import tokenizer as tokenizer_lib
    from par_jax.evaluation import generate, job, plugin
    from par_jax.model import ParTransformer, model_config
    from par_jax.tokenizer import train as tokenizer_train
    from par_jax.model import checkpoint

    vq_cfg = tokenizer_lib.vq_config("fmnist", base_channels=8, z_channels=8, codebook_size=64, num_groups=4,
                                     num_res_blocks=1, attn_levels=())
    tokenizer_dir = tokenizer_train.export(tmp_path, tokenizer_lib.VQModel(vq_cfg, rngs=nnx.Rngs(0)))
    cfg = model_config("tiny", vocab_size=64, num_classes=10, grid_shape=vq_cfg.grid_shape, n=4, dtype="float32")
    model = ParTransformer(cfg, rngs=nnx.Rngs(1))
    checkpoint.save_params(tmp_path / "decoder", model)

    config = _eval_config(checkpoint=str(tmp_path / "decoder"), classifier=small_classifier[2], name="tiny",
                          reference="fashion_mnist", reference_count=64, num_samples=20, batch_size=8,
                          resolution=40, fid_min_samples=16, metrics="fid,is,precision_recall,class_consistency",
                          is_split_size=10, grid_images=9)
    config.data.update(tokenizer=str(tokenizer_dir), views="pad", image_size=32)
    config.sample.update(guidance=1.5, temperature=1.0, top_k=16)
    record = job.run(config, str(tmp_path / "work"))

    out = tmp_path / "work" / "eval" / "tiny"
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (20, 40, 40, 3)  # 32 px decoded, resized
        np.testing.assert_array_equal(f["arr_1"], generate.make_labels(20, 10, "uniform", 0))
    m = record["metrics"]
    assert set(m) == {"fid", "inception_score", "inception_score_std", "precision", "recall", "class_consistency"}
    assert all(np.isfinite(v) for v in m.values()) and m["fid"] > 0
    s = record["settings"]
    assert s["checkpoint"] == str(tmp_path / "decoder") and s["weights"] == "params"
    assert s["sampling"]["guidance"] == 1.5 and s["sampling"]["top_k"] == 16 and s["n"] == 4
    assert s["num_samples"] == 20 and s["seed"] == 0 and s["labels"] == "uniform" and s["resolution"] == 40
    assert s["reference_count"] == 64 and "fashion_mnist" in s["reference"]
    assert s["feature_network"] == "fmnist_classifier" and s["tokenizer"] == str(tokenizer_dir)
    assert json.loads((out / "results.json").read_text())["settings"]["num_steps"] == cfg.layout.num_steps
    assert (out / "samples_grid.png").exists()

    # The training-loop plug-in: same protocol on fewer samples, settings overridden per entry.
    evaluate = plugin.GenerationMetrics(config, num_samples=16, metrics="is,class_consistency")
    first = evaluate(model, config, step=7, workdir=str(tmp_path / "work"))
    assert set(first) == {"inception_score", "inception_score_std", "class_consistency"}
    network = evaluate.network
    assert evaluate(model, config, step=8, workdir=str(tmp_path / "work")) == first  # same seed, same samples
    assert evaluate.network is network  # built once, reused


_SHARDED = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from par_jax import sampling, tokenizer as tokenizer_lib
from par_jax.evaluation import classifier, features, generate
from par_jax.model import ParTransformer, model_config
assert jax.device_count() == 8
net = classifier.Classifier(rngs=nnx.Rngs(0))
net.eval()
apply, batch = features._compile(net, 12)  # rounded up to 16: two images per device
fn = features.FeatureNetwork(name="c", description="", apply=apply, batch_size=batch)
images = np.random.default_rng(0).integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)
out = fn(images)
want = net(jnp.asarray(images))
vq = tokenizer_lib.VQModel(tokenizer_lib.vq_config("fmnist", base_channels=8, z_channels=8, codebook_size=64,
                                                   num_groups=4, num_res_blocks=1, attn_levels=()), rngs=nnx.Rngs(0))
model = ParTransformer(model_config("tiny", vocab_size=64, num_classes=10, grid_shape=(8, 8), n=4, dtype="float32"),
                       rngs=nnx.Rngs(1))
labels = generate.make_labels(12, 10, "uniform", 0)
settings = sampling.SampleSettings(guidance=1.5)
run = lambda: list(generate.generate(model, vq, labels, settings, key=jax.random.key(0), batch_size=8, resolution=24))
first, second = run(), run()
print(json.dumps({
    "batch": batch, "pool_err": float(np.abs(out["pool"] - np.asarray(want["pool"])).max()),
    "logits_err": float(np.abs(out["logits"] - np.asarray(want["logits"])).max()),
    "shapes": [list(b[0].shape) for b in first], "labels": np.concatenate([b[1] for b in first]).tolist(),
    "repeatable": all((a[0] == b[0]).all() for a, b in zip(first, second)),
}))
"""


@pytest.mark.slow  # a fresh process compiling the sampler, decoder and classifier for 8 devices
def test_features_and_sampling_sharded_over_eight_devices():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED, root], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["batch"] == 16
    assert out["pool_err"] < 1e-4 and out["logits_err"] < 1e-4
    assert out["shapes"] == [[8, 24, 24, 3], [4, 24, 24, 3]]  # 12 samples in batches of 8, the last one cut
    from par_jax.evaluation import generate
    assert out["labels"] == generate.make_labels(12, 10, "uniform", 0).tolist() and out["repeatable"]
