"""Video evaluation: the I3D network and its weight loader on made-up weights (against PyTorch's ops), the Frechet
video distance against scipy, the video classifier, and the evaluate job on a tiny 3-D decoder and video tokenizer."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from par_jax.evaluation import i3d, metrics


# ----------------------------------------------------------------------------------------------------------------
# I3D
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made_up_i3d_state():
    """A random state dict with every pytorch-i3d key and shape (BN statistics away from 0 / 1 so they matter)."""
    rng = np.random.default_rng(0)
    state = {}
    for key, shape in i3d.torch_state_shapes().items():
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("conv3d.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        else:
            value = rng.normal(0, 0.1, shape)
        state[key] = value.astype(np.float32)
    state["Conv3d_1a_7x7.bn.num_batches_tracked"] = np.asarray(7)  # a real file has these; they must be ignored
    return state


def _torch_unit(torch, x, state, name, stride=(1, 1, 1), head=False):
    """pytorch-i3d's Unit3D written out with torch.nn.functional: its own 'same' padding rule, conv, BN, ReLU."""
    F = torch.nn.functional
    w = torch.from_numpy(state[f"{name}.conv3d.weight"])
    pads = []
    for dim in (2, 1, 0):  # F.pad wants the last axis first
        k, s, size = w.shape[2 + dim], stride[dim], x.shape[2 + dim]
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    x = F.conv3d(F.pad(x, pads), w, torch.from_numpy(state[f"{name}.conv3d.bias"]) if head else None, stride)
    if head:
        return x
    x = F.batch_norm(x, torch.from_numpy(state[f"{name}.bn.running_mean"]),
                     torch.from_numpy(state[f"{name}.bn.running_var"]), torch.from_numpy(state[f"{name}.bn.weight"]),
                     torch.from_numpy(state[f"{name}.bn.bias"]), training=False, eps=1e-3)
    return F.relu(x)


def test_i3d_has_the_kinetics_network_structure():
    shapes = i3d.torch_state_shapes()
    # 57 conv units (3 stem + 9 blocks x 6) with weight and four BN tensors, and the biased logits layer.
    assert len(shapes) == 57 * 5 + 2
    assert shapes["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert shapes["Mixed_3b.b1b.conv3d.weight"] == (128, 96, 3, 3, 3)
    assert shapes["Mixed_5c.b3b.conv3d.weight"] == (128, 832, 1, 1, 1)
    assert shapes["logits.conv3d.weight"] == (400, 1024, 1, 1, 1) and shapes["logits.conv3d.bias"] == (400,)
    params = sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k)
    assert 12_000_000 < params < 13_000_000  # I3D-RGB's ~12.7M (weights, BN scale and shift, logits)
    # At FVD's size (frames resized to 224) the graph traces through its exact [2, 7, 7] head to (B, 400).
    graphdef, state = nnx.split(nnx.eval_shape(lambda: i3d.I3D(rngs=nnx.Rngs(0))))
    out = jax.eval_shape(lambda st, c: nnx.merge(graphdef, st)(c), state,
                         jax.ShapeDtypeStruct((2, 17, 32, 32, 3), jnp.uint8))
    assert out["logits"].shape == (2, 400) and out["avg_pool"].shape == (2, 1024)


def test_i3d_loader_and_forward_on_a_made_up_weights_file(tmp_path, made_up_i3d_state):
    torch = pytest.importorskip("torch")
    path = tmp_path / "rgb_made_up.pt"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in made_up_i3d_state.items()}, path)
    model = i3d.load(str(path), resize=False)
    rng = np.random.default_rng(1)
    clips = rng.integers(0, 256, (2, 8, 32, 32, 3)).astype(np.uint8)

    # The stem (conv 7x7x7 stride 2 + BN + ReLU) against PyTorch's ops with pytorch-i3d's padding rule.
    x = model.preprocess(jnp.asarray(clips))
    np.testing.assert_allclose(np.asarray(x), clips / 127.5 - 1.0, atol=1e-6)
    got = np.asarray(model.Conv3d_1a_7x7(x))
    xt = torch.from_numpy(np.asarray(x).transpose(0, 4, 1, 2, 3).copy())
    want = _torch_unit(torch, xt, made_up_i3d_state, "Conv3d_1a_7x7", (2, 2, 2)).numpy().transpose(0, 2, 3, 4, 1)
    assert got.shape == (2, 4, 16, 16, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # One Inception block: four branches, the 3x3x3 max pool padded as TF does.
    inp = rng.uniform(0, 1, (1, 3, 5, 6, 192)).astype(np.float32)
    got = np.asarray(model.Mixed_3b(jnp.asarray(inp)))
    xt = torch.from_numpy(inp.transpose(0, 4, 1, 2, 3).copy())
    unit = lambda y, n: _torch_unit(torch, y, made_up_i3d_state, f"Mixed_3b.{n}")  # noqa: E731
    pooled = torch.nn.functional.max_pool3d(torch.nn.functional.pad(xt, [1, 1] * 3), 3, 1)  # inputs >= 0
    want = torch.cat([unit(xt, "b0"), unit(unit(xt, "b1a"), "b1b"), unit(unit(xt, "b2a"), "b2b"),
                      unit(pooled, "b3b")], 1).numpy().transpose(0, 2, 3, 4, 1)
    assert got.shape == (1, 3, 5, 6, 256)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # The whole network: (B, 400) logits, the head being the 1x1x1 conv with bias of the pooled 1024-d features.
    out = nnx.jit(lambda m, c: m(c))(model, jnp.asarray(clips))  # weights as arguments, not 50 MB of constants
    assert out["logits"].shape == (2, 400) and out["avg_pool"].shape == (2, 1024)
    head = (np.asarray(out["avg_pool"]) @ made_up_i3d_state["logits.conv3d.weight"][:, :, 0, 0, 0].T
            + made_up_i3d_state["logits.conv3d.bias"])
    np.testing.assert_allclose(np.asarray(out["logits"]), head, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(out["logits"])))
    assert not np.allclose(out["logits"][0], out["logits"][1])  # different clips, different features

    # An .npz with the same keys reads to the same state dict as the .pt (which `load` then checks and converts).
    np.savez(tmp_path / "w.npz", **made_up_i3d_state)
    from_npz, from_pt = i3d.read_state_dict(str(tmp_path / "w.npz")), i3d.read_state_dict(str(path))
    assert set(from_npz) == set(from_pt) == set(made_up_i3d_state)
    np.testing.assert_array_equal(from_npz["Mixed_4f.b1b.conv3d.weight"], from_pt["Mixed_4f.b1b.conv3d.weight"])
    # The loaded kernel is the file's, moved from (out, in, t, h, w) to (t, h, w, in, out).
    np.testing.assert_array_equal(np.asarray(model.Mixed_4f.b1b.conv3d.kernel[...]),
                                  made_up_i3d_state["Mixed_4f.b1b.conv3d.weight"].transpose(2, 3, 4, 1, 0))


def test_i3d_resizes_frames_to_224_with_tf1_bilinear():
    model = nnx.eval_shape(lambda: i3d.I3D(rngs=nnx.Rngs(0)))
    clips = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 2, 32, 40, 3)), jnp.uint8)
    x = i3d.I3D.preprocess(model, clips)
    assert x.shape == (1, 2, 224, 224, 3)
    from par_jax.evaluation import inception
    frame = inception.tf1_resize_bilinear(clips[0, 1:2].astype(jnp.float32), 224)[0] / 127.5 - 1
    np.testing.assert_allclose(np.asarray(x[0, 1]), np.asarray(frame), atol=1e-5)
    with pytest.raises(ValueError, match="RGB clips"):
        i3d.I3D.preprocess(model, clips[0])


def test_i3d_loader_errors_list_the_keys(tmp_path, made_up_i3d_state):
    state = dict(made_up_i3d_state)
    del state["Mixed_4c.b2b.bn.running_var"]
    state["fc.weight"] = np.zeros((3, 3), np.float32)
    state["logits.conv3d.weight"] = np.zeros((10, 1024, 1, 1, 1), np.float32)
    with pytest.raises(ValueError) as e:
        i3d.load(state)
    message = str(e.value)
    assert "Mixed_4c.b2b.bn.running_var" in message and "fc.weight" in message
    assert "'logits.conv3d.weight' has shape (10, 1024, 1, 1, 1), needs (400, 1024, 1, 1, 1)" in message
    with pytest.raises(FileNotFoundError, match="rgb_imagenet.pt"):
        i3d.load(str(tmp_path / "absent.pt"))
    # A DataParallel prefix is accepted.
    model = i3d.load({f"module.{k}": v for k, v in made_up_i3d_state.items()}, resize=False)
    np.testing.assert_array_equal(np.asarray(model.logits.conv3d.bias[...]), made_up_i3d_state["logits.conv3d.bias"])


# ----------------------------------------------------------------------------------------------------------------
# Frechet video distance
# ----------------------------------------------------------------------------------------------------------------

def test_frechet_video_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) + 1.0
    fake = rng.normal(size=(250, 20)) @ rng.normal(size=(20, 20)) * 0.7 - 0.5
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_video_distance(real, fake) == pytest.approx(want, rel=1e-8)
    assert metrics.frechet_video_distance(real, real) < 1e-8
    with pytest.raises(ValueError, match="too few samples"):
        metrics.frechet_video_distance(real[:10], fake)
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.frechet_video_distance(real, fake[:, :10])


# ----------------------------------------------------------------------------------------------------------------
# The video classifier
# ----------------------------------------------------------------------------------------------------------------

def _toy_clips(n, frames=5, size=32, seed=0):
    """Two classes that a per-frame look tells apart, moving at random: a 10x10 square (0) or a 4x14 bar (1)."""
    rng = np.random.default_rng(seed)
    clips = np.zeros((n, frames, size, size, 3), np.uint8)
    labels = rng.integers(0, 2, n).astype(np.int32)
    for i, label in enumerate(labels):
        h, w = (10, 10) if label == 0 else (4, 14)
        y, x = rng.integers(0, size - 14, 2)
        dy, dx = rng.integers(-2, 3, 2)
        for t in range(frames):
            yy, xx = np.clip(y + dy * t, 0, size - h), np.clip(x + dx * t, 0, size - w)
            clips[i, t, yy:yy + h, xx:xx + w] = 200
    return clips, labels


@pytest.fixture(scope="module")
def tiny_video_classifier(tmp_path_factory):
    """(directory, model, metadata, settings, test set) of a video classifier trained for a few steps on toy clips."""
    from par_jax.evaluation import video_classifier as vc
    train_set, test_set = _toy_clips(64, seed=0), _toy_clips(40, seed=1)
    settings = vc.TrainSettings(steps=40, batch_size=16, learning_rate=3e-3, log_every=20, train_frames=3)
    directory = tmp_path_factory.mktemp("video_classifier") / "vc"
    model, metadata = vc.load_or_train(directory, settings, data=(train_set, test_set))
    return directory, model, metadata, settings, test_set


def test_video_classifier_trains_saves_loads_and_gives_features(tmp_path, tiny_video_classifier):
    from par_jax.evaluation import classifier, video_classifier as vc
    directory, model, metadata, settings, test_set = tiny_video_classifier
    assert metadata["test_accuracy"] >= 0.9 and metadata["test_clips"] == 40
    assert [h["step"] for h in metadata["history"]] == [20, 40]

    clips = jnp.asarray(test_set[0][:6])
    out = model(clips)
    assert out["pool"].shape == (6, vc.FEATURE_DIM) and out["logits"].shape == (6, vc.NUM_CLASSES)
    np.testing.assert_allclose(np.asarray(model.features(clips)), np.asarray(out["pool"]), rtol=1e-6)
    # Any clip length: the 3-frame training windows and the 5-frame test clips both work; frames are resized to 32.
    assert model.features(jnp.asarray(test_set[0][:2, :1])).shape == (2, vc.FEATURE_DIM)
    assert model.features(jnp.zeros((2, 4, 16, 16, 3), jnp.uint8)).shape == (2, vc.FEATURE_DIM)
    with pytest.raises(ValueError, match="clips"):
        model.features(jnp.zeros((2, 32, 32, 3), jnp.uint8))

    again, meta = vc.load_or_train(directory, settings)  # loads, does not train (no source needed)
    assert meta["test_accuracy"] == metadata["test_accuracy"] and meta["kind"] == "video_classifier"
    np.testing.assert_allclose(np.asarray(again.features(clips)), np.asarray(out["pool"]), rtol=1e-5, atol=1e-6)

    # An image classifier's folder is refused by name.
    image_model = classifier.Classifier(rngs=nnx.Rngs(0))
    classifier.save(tmp_path / "image", image_model, {"test_accuracy": 0.5})
    with pytest.raises(ValueError, match=r"kind of classifier \(image_classifier\), not the video classifier"):
        vc.load(tmp_path / "image")
    with pytest.raises(FileNotFoundError, match="no video classifier"):
        vc.load(tmp_path / "absent")
    # And the other way round: the image classifier's loader refuses a video classifier before reading parameters.
    with pytest.raises(ValueError, match=r"classifier \(video_classifier\), not the Fashion-MNIST classifier"):
        classifier.load(directory)


# ----------------------------------------------------------------------------------------------------------------
# The evaluate job on a video decoder
# ----------------------------------------------------------------------------------------------------------------

def test_evaluate_job_on_a_video_decoder_writes_the_video_metrics(tmp_path, tiny_video_classifier):
    """A tiny 3-D decoder and video tokenizer (random weights): sample, decode to clips, score against Moving
    Fashion-MNIST clips in the video classifier's feature space, record; then score the written samples.npz again."""
    from configs import par
    from par_jax import tokenizer as tokenizer_lib
    from par_jax.core import checkpoint as ckpt_lib
    from par_jax.evaluation import generate, job
    from par_jax.model import ParTransformer, checkpoint, model_config

    vq_cfg = tokenizer_lib.video_vq_config("video", base_channels=8, channel_mult=(1, 2), z_channels=8,
                                           codebook_size=64, codebook_dim=4, num_groups=4, temporal_downsample=2,
                                           num_frames=5, frame_size=8)
    tokenizer_dir = ckpt_lib.save_params(tmp_path / "tokenizer", tokenizer_lib.VideoVQModel(vq_cfg,
                                                                                            rngs=nnx.Rngs(0)))
    cfg = model_config("tiny", vocab_size=64, num_classes=10, grid_shape=vq_cfg.grid_shape, n=4, dtype="float32")
    checkpoint.save_params(tmp_path / "decoder", ParTransformer(cfg, rngs=nnx.Rngs(1)))

    config = par.get_config("runlocal")
    config.eval.update(checkpoint=str(tmp_path / "decoder"), feature_network="video_classifier",
                       classifier=str(tiny_video_classifier[0]), name="video", reference="moving_fashion_mnist",
                       reference_split="test", reference_count=24, num_samples=12, batch_size=6, resolution=16,
                       fid_min_samples=8, metrics="fvd,precision_recall,class_consistency", grid_images=4)
    config.data.update(tokenizer=str(tokenizer_dir))
    config.sample.update(temperature=1.0, top_k=16)

    # A video decoder with an image feature network fails before anything is built or sampled.
    config.eval.feature_network = "fmnist_classifier"
    with pytest.raises(ValueError, match="makes clips, but .* is an image network"):
        job.run(config, str(tmp_path / "work"))
    config.eval.feature_network = "video_classifier"

    record = job.run(config, str(tmp_path / "work"))
    out = tmp_path / "work" / "eval" / "video"
    m = record["metrics"]
    assert set(m) == {"fd_video_classifier", "precision", "recall", "class_consistency"}
    assert m["fd_video_classifier"] > 0 and all(np.isfinite(v) for v in m.values())
    assert record["comparable_to_published"] is False
    s = record["settings"]
    assert s["video"] is True and s["num_frames"] == 5 and s["frame_size"] == "16x16"
    assert s["feature_network"] == "video_classifier" and s["reference_count"] == 24
    assert "moving_fashion_mnist" in s["reference"] and "5 frames at 8px" in s["reference"]
    with np.load(out / "samples.npz") as f:
        clips, labels = f["arr_0"], f["arr_1"]
    assert clips.dtype == np.uint8 and clips.shape == (12, 5, 16, 16, 3)  # 8 px decoded, every frame resized
    np.testing.assert_array_equal(labels, generate.make_labels(12, 10, "uniform", 0))
    import json
    assert json.loads((out / "results.json").read_text())["metrics"] == pytest.approx(m)
    assert (out / "samples_grid.png").exists() and (out / "samples_grid.gif").read_bytes()[:4] == b"GIF8"

    # The same clips scored from the file give the same numbers (the reference then read at the file's 16 px).
    config.eval.update(samples=str(out / "samples.npz"), name="from_file")
    again = job.run(config, str(tmp_path / "work"))
    assert again["metrics"]["class_consistency"] == pytest.approx(m["class_consistency"])
    assert again["settings"]["resolution"] == "16x16 (as in the file)"


def test_video_and_image_metrics_and_references_are_kept_apart(tmp_path):
    from par_jax.core.config_args import UsageError
    from par_jax.evaluation import features, video_reference
    from par_jax.evaluation.settings import EvalSettings
    video_net = features.FeatureNetwork(name="video_classifier", description="", apply=None, batch_size=4,
                                        label_space="fashion_mnist", video=True, frechet_key="fd_video_classifier")
    image_net = features.FeatureNetwork(name="fmnist_classifier", description="", apply=None, batch_size=4,
                                        label_space="fashion_mnist")
    metrics.check_network(("fvd", "precision_recall", "class_consistency"), video_net)
    metrics.check_network(("fid", "is"), image_net)
    with pytest.raises(UsageError, match=r"\['fid', 'is'\] are image metrics"):
        metrics.check_network(("fid", "is", "fvd"), video_net)
    with pytest.raises(UsageError, match=r"\['fvd'\] are video metrics"):
        metrics.check_network(("fvd",), image_net)
    with pytest.raises(ValueError, match=r"takes RGB clips \(N, T, H, W, 3\)"):
        video_net(np.zeros((2, 8, 8, 3), np.uint8))

    # The Frechet metric is named by the network: fvd only on I3D features.
    rng = np.random.default_rng(4)
    feats = features.Features(rng.normal(size=(20, 3)), np.zeros((20, 10)), None, metrics.StatsAccumulator(), None)
    feats.pool_stats.update(feats.pool)
    other = features.Features(feats.pool + 1, feats.logits, None, metrics.StatsAccumulator(), None)
    other.pool_stats.update(other.pool)
    s = EvalSettings(metrics=("fvd",))
    assert set(metrics.compute(("fvd",), feats, other, video_net, s)) == {"fd_video_classifier"}
    i3d_net = features.FeatureNetwork(name="i3d_kinetics400", description="", apply=None, batch_size=4, video=True,
                                      frechet_key="fvd")
    got = metrics.compute(("fvd",), feats, other, i3d_net, s)["fvd"]
    assert got == pytest.approx(3.0, rel=1e-9)  # a shift by 1 in each of 3 dimensions, same covariance

    # A reference file of clips must match the samples' clip shape.
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 5, 8, 8, 3), np.uint8))
    ok = EvalSettings(metrics=("fvd",), reference=str(tmp_path / "ref.npz"))
    batches, record = video_reference.clips(ok, 5, 8, 3)
    assert [b.shape for b in batches] == [(3, 5, 8, 8, 3), (1, 5, 8, 8, 3)] and record["reference_count"] == 4
    with pytest.raises(ValueError, match=r"uint8 clips \(N, 9, 8, 8, 3\)"):
        video_reference.clips(ok, 9, 8, 3)
    with pytest.raises(UsageError, match="reference is empty"):
        video_reference.clips(EvalSettings(metrics=("fvd",)), 5, 8, 3)

    # FVD without its weight file fails at once, naming the setting.
    with pytest.raises(UsageError, match="i3d_weights"):
        features.i3d_network("")
    with pytest.raises(FileNotFoundError, match="i3d_weights='/nowhere.pt'"):
        features.check(EvalSettings(metrics=("fvd",), feature_network="i3d", i3d_weights="/nowhere.pt"))
