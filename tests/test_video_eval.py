"""Video evaluation: the I3D network and its weight loader on made-up weights (against PyTorch's ops), the Frechet
video distance against scipy, the video classifier, and the evaluate job on a tiny 3-D decoder and video tokenizer."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

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
            value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
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
    out = jax.jit(lambda c: model(c))(jnp.asarray(clips))
    assert out["logits"].shape == (2, 400) and out["avg_pool"].shape == (2, 1024)
    head = (np.asarray(out["avg_pool"]) @ made_up_i3d_state["logits.conv3d.weight"][:, :, 0, 0, 0].T
            + made_up_i3d_state["logits.conv3d.bias"])
    np.testing.assert_allclose(np.asarray(out["logits"]), head, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(out["logits"])))
    assert not np.allclose(out["logits"][0], out["logits"][1])  # different clips, different features

    # An .npz with the same keys loads to the same network.
    np.savez(tmp_path / "w.npz", **made_up_i3d_state)
    again = i3d.load(str(tmp_path / "w.npz"), resize=False)
    np.testing.assert_array_equal(np.asarray(again.Mixed_4f.b1b.conv3d.kernel[...]),
                                  np.asarray(model.Mixed_4f.b1b.conv3d.kernel[...]))


def test_i3d_resizes_frames_to_224_with_tf1_bilinear():
    model = jax.eval_shape(lambda: i3d.I3D(rngs=__import__("flax").nnx.Rngs(0)))
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
    assert "logits.conv3d.weight (10, 1024, 1, 1, 1) (needs (400, 1024, 1, 1, 1))" in message
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
