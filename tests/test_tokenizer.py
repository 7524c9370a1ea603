"""The VQ tokenizer: shapes, the cosine nearest-code lookup, training, a quality bar, checkpoints and bad input."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from configs import vq as vq_configs
from par_jax import tokenizer
from par_jax.core import loop
from par_jax.data import sources
from par_jax.tokenizer import losses, train, vq

# A tokenizer small enough to train in seconds: 32x32 -> 8x8 codes, 64 codes of dim 4.
TINY = dict(image_size=32, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,),
            z_channels=16, codebook_size=64, codebook_dim=4, num_groups=4)
# Quality bar for the tiny tokenizer after QUALITY_STEPS steps, on held-out Fashion-MNIST test images (28x28 centre).
QUALITY_STEPS = 150
QUALITY_PSNR_DB = 17.0

HAVE_FMNIST = os.path.exists(os.path.join(sources.DEBIAN_FASHION_MNIST, "t10k-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST idx files not installed "
                                  "(apt-get install dataset-fashion-mnist; .ci/run does)")


def tiny(**overrides):
    return vq.vq_config("vq16", **{**TINY, **overrides})


def random_images(key, shape):
    return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


# ----- architecture ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return vq.VQModel(tiny(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mult,size", [((1, 2), (16, 16)), ((1, 1, 2), (32, 24)), ((1, 1, 2, 2), (32, 32)),
                                       ((1, 1, 2, 2, 4), (64, 48))])
def test_shapes_and_downsampling(mult, size):
    cfg = tiny(channel_mult=mult, attn_levels=(len(mult) - 1,), image_size=16)
    factor = 2 ** (len(mult) - 1)
    assert cfg.downsample == factor
    grid = (size[0] // factor, size[1] // factor)

    def run(images):
        m = vq.VQModel(cfg, rngs=nnx.Rngs(0))
        recon, q = m(images)
        codes = m.encode(images)
        return codes, m.decode(codes), recon, q.z_q

    codes, decoded, recon, z_q = jax.eval_shape(run, jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
    assert codes.shape == (2, *grid) and codes.dtype == jnp.int32
    assert decoded.shape == recon.shape == (2, *size, 3)
    assert z_q.shape == (2, *grid, cfg.codebook_dim)


def test_encode_decode_run(model):
    images = random_images(0, (3, 32, 24, 3))  # any multiple of the factor, not only the training size
    codes = model.encode(images)
    assert codes.shape == (3, 8, 6) and codes.dtype == jnp.int32
    out = model.decode(codes)
    assert out.shape == (3, 32, 24, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    assert vq.count_params(model.config) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_vq16_matches_llamagen():
    cfg = vq.vq_config("vq16")
    assert cfg.downsample == 16 and cfg.grid_shape == (16, 16) and vq.vq_config(image_size=384).grid_shape == (24, 24)
    shapes = vq.param_shapes(cfg)
    # PAR_SPEC section 8: 3x3 conv 3->128, five levels x (1,1,2,2,4), 2 residual blocks each (3 in the decoder),
    # attention only at the lowest resolution, 256 z-channels, 16384 x 8 codebook, about 72M parameters.
    assert shapes["encoder.conv_in.kernel"] == (3, 3, 3, 128)
    assert shapes["encoder.conv_blocks.2.res.0.nin_shortcut.kernel"] == (1, 1, 128, 256)
    assert shapes["encoder.conv_blocks.3.downsample.conv.kernel"] == (3, 3, 256, 256)
    assert "encoder.conv_blocks.4.downsample.conv.kernel" not in shapes
    assert shapes["encoder.conv_blocks.4.attn.1.q.kernel"] == (1, 1, 512, 512)
    assert not any(k.startswith("encoder.conv_blocks.3.attn") for k in shapes)
    assert shapes["encoder.mid.1.proj_out.kernel"] == (1, 1, 512, 512)
    assert shapes["encoder.conv_out.kernel"] == (3, 3, 512, 256)
    assert shapes["quant_conv.kernel"] == (1, 1, 256, 8)
    assert shapes["quantize.embedding"] == (16384, 8)
    assert shapes["post_quant_conv.kernel"] == (1, 1, 8, 256)
    assert shapes["decoder.conv_in.kernel"] == (3, 3, 256, 512)
    assert shapes["decoder.conv_blocks.0.attn.2.k.kernel"] == (1, 1, 512, 512)
    assert shapes["decoder.conv_blocks.4.res.2.conv2.kernel"] == (3, 3, 128, 128)
    assert "decoder.conv_blocks.4.upsample.conv.kernel" not in shapes
    assert shapes["decoder.conv_blocks.3.upsample.conv.kernel"] == (3, 3, 128, 128)
    assert shapes["decoder.conv_out.kernel"] == (3, 3, 128, 3)
    assert shapes["decoder.norm_out.scale"] == (128,)
    assert sum(np.prod(s) for s in shapes.values()) == _vq16_count_from_spec()  # 71,883,403


def _vq16_count_from_spec():
    """VQ-16's parameter count from the description in PAR_SPEC section 8, layer by layer (about 72M)."""
    def conv(cin, cout, k):
        return k * k * cin * cout + cout

    def norm(c):
        return 2 * c

    def res(cin, cout):
        return norm(cin) + conv(cin, cout, 3) + norm(cout) + conv(cout, cout, 3) + (conv(cin, cout, 1) if cin != cout else 0)

    def attn(c):
        return norm(c) + 4 * conv(c, c, 1)

    widths = [128 * m for m in (1, 1, 2, 2, 4)]
    total, c = conv(3, 128, 3), 128
    for level, w in enumerate(widths):  # encoder
        for _ in range(2):
            total += res(c, w) + (attn(w) if level == 4 else 0)
            c = w
        total += conv(c, c, 3) if level < 4 else 0
    total += res(512, 512) + attn(512) + res(512, 512) + norm(512) + conv(512, 256, 3)
    total += conv(256, 8, 1) + 16384 * 8 + conv(8, 256, 1)  # quant_conv, codebook, post_quant_conv
    total += conv(256, 512, 3) + res(512, 512) + attn(512) + res(512, 512)  # decoder
    c = 512
    for level in reversed(range(5)):
        for _ in range(3):
            total += res(c, widths[level]) + (attn(widths[level]) if level == 4 else 0)
            c = widths[level]
        total += conv(c, c, 3) if level > 0 else 0
    return total + norm(128) + conv(128, 3, 3)


# ----- quantizer -------------------------------------------------------------------------------------------------

def test_codes_always_lie_in_the_codebook(model):
    codes = np.asarray(model.encode(random_images(1, (3, 32, 24, 3))))  # the shape compiled above
    assert codes.min() >= 0 and codes.max() < 64
    # Any latent, however large, small or degenerate, maps to an existing code.
    z = jnp.concatenate([1e3 * random_images(2, (500, 4)), 1e-30 * random_images(3, (500, 4)), jnp.zeros((1, 4))])
    quantizer = vq.VectorQuantizer(tiny(codebook_size=37), nnx.Rngs(1))
    for q in (model.quantize, quantizer):
        found = np.asarray(q.nearest(z))
        assert found.min() >= 0 and found.max() < q.config.codebook_size


def test_nearest_code_is_brute_force_cosine():
    quantizer = vq.VectorQuantizer(tiny(codebook_size=50, codebook_dim=6), nnx.Rngs(3))
    # A codebook with rows of very different norms: cosine and Euclidean nearest neighbours disagree.
    book = np.random.default_rng(0).normal(size=(50, 6)) * np.random.default_rng(1).uniform(0.1, 10, (50, 1))
    quantizer.embedding[...] = jnp.asarray(book, jnp.float32)
    z = np.random.default_rng(2).normal(size=(3, 5, 7, 6)).astype(np.float32) * 3
    zf = z.reshape(-1, 6)
    cosine = (zf / np.linalg.norm(zf, axis=1, keepdims=True)) @ (book / np.linalg.norm(book, axis=1, keepdims=True)).T
    expected = cosine.argmax(axis=1)
    euclid = ((zf[:, None] - book[None]) ** 2).sum(-1).argmin(axis=1)
    assert (expected != euclid).any()  # the test can tell the two lookups apart
    got = np.asarray(quantizer.nearest(jnp.asarray(z))).reshape(-1)
    np.testing.assert_array_equal(got, expected)

    q = quantizer(jnp.asarray(z))
    unit_book = book / np.linalg.norm(book, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(q.z_q).reshape(-1, 6), unit_book[expected], atol=1e-5)
    zn = zf / np.linalg.norm(zf, axis=1, keepdims=True)
    d = np.mean((unit_book[expected] - zn) ** 2)
    np.testing.assert_allclose(float(q.codebook_loss), d, rtol=1e-4)
    np.testing.assert_allclose(float(q.commit_loss), 0.25 * d, rtol=1e-4)

    # Straight-through: d(z_q)/dz is the Jacobian of the L2 normalisation (as if quantization were the identity).
    c = jnp.asarray(np.random.default_rng(3).normal(size=z.shape), jnp.float32)
    g = jax.grad(lambda zz: jnp.sum(quantizer(zz).z_q * c))(jnp.asarray(z))
    g_ref = jax.grad(lambda zz: jnp.sum(vq.l2_normalize(zz) * c))(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_usage_statistics():
    stats = losses.usage_stats(np.array([5, 0, 5, 0]))
    assert stats == {"usage": 0.5, "dead_codes": 2.0, "perplexity": pytest.approx(2.0)}
    hist = losses.code_histogram(jnp.array([[0, 3], [3, 3]]), 5)
    np.testing.assert_array_equal(np.asarray(hist), [1, 0, 0, 3, 0])


# ----- training --------------------------------------------------------------------------------------------------

def _loss_cfg(**kw):
    import ml_collections
    base = dict(reconstruction_weight=1.0, codebook_weight=1.0, perceptual_weight=0.0, perceptual_weights="",
                disc_weight=0.0, disc_start=0, disc_channels=8, disc_layers=2)
    return ml_collections.ConfigDict({**base, **kw})


def test_a_few_steps_lower_the_loss_and_train_the_discriminator():
    cfg = tiny(channel_mult=(1, 2), attn_levels=(), image_size=16)  # 16x16 -> 8x8 codes; few ops to compile
    loss_cfg = _loss_cfg(disc_weight=0.1, disc_layers=1)
    tx = optax.adam(3e-3, b1=0.9, b2=0.95)
    state = jax.jit(lambda: train.init_state(cfg, loss_cfg, 0, tx, tx))()
    vq_def, _, disc_def, _ = train.abstract_models(cfg, loss_cfg)
    synthetic = sources.SyntheticImages(8, size=16)  # coloured stripes with noise
    images = np.stack([synthetic[i][0] for i in range(8)])
    # The adversarial path from the first step (one compilation); its weight is small next to L2 here.
    step = jax.jit(lambda s, x: train.train_step(
        s, x, jax.random.key(0), vq_def=vq_def, disc_def=disc_def, tx=tx, disc_tx=tx, loss_cfg=loss_cfg,
        perceptual=None, gan=True, cfg=cfg))
    disc_before = jax.tree.map(np.asarray, state["opt_state"]["discriminator"]["params"])
    recs = []
    for _ in range(8):
        state, metrics, hist = step(state, images)
        recs.append(float(metrics["reconstruction"]))
        assert int(np.asarray(hist).sum()) == 8 * 8 * 8  # every token of the batch counted once
    assert int(state["step"]) == 8
    assert np.mean(recs[-2:]) < 0.7 * recs[0], recs
    assert {"disc_loss", "logits_real", "logits_fake", "generator_adv"} <= set(metrics)
    disc_after = state["opt_state"]["discriminator"]["params"]
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), disc_before, disc_after))
    assert all(changed)


def _job_config(workdir_steps: int, **train_overrides):
    config = vq_configs.get_config("fmnist,runlocal")
    config.tokenizer = vq_configs._tokenizer_section("vq16", **TINY)
    config.optimizer.update(lr=3e-3, schedule="constant", warmup_steps=0)
    config.train.update(batch_size=16, num_steps=workdir_steps, log_every=50, eval_every=0, checkpoint_every=2,
                        grid_images=8)
    config.train.update(**train_overrides)
    config.eval.update(batch_size=50, num_images=200, final_num_images=200, crop=28)
    return config


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Identical train steps across the job runs of this module compile once."""
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
           jax.config.jax_persistent_cache_min_entry_size_bytes)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # take the new settings even if something compiled before
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compile_cache):
    """The train_tokenizer job on Fashion-MNIST: QUALITY_STEPS steps of the tiny tokenizer."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST idx files not installed")
    workdir = tmp_path_factory.mktemp("tokenizer_job")
    config = _job_config(QUALITY_STEPS, eval_every=QUALITY_STEPS, checkpoint_every=QUALITY_STEPS)
    metrics = train.train_and_evaluate(config, str(workdir))
    return workdir, metrics


@needs_fmnist
def test_trained_tokenizer_beats_the_quality_bar_on_held_out_images(trained):
    workdir, metrics = trained
    model = tokenizer.load(workdir / "tokenizer")
    assert model.config == tiny()
    test = sources.fashion_mnist_files("test")
    originals = np.stack([np.pad(test[i][0], ((2, 2), (2, 2), (0, 0))) for i in range(200)])
    x = originals.astype(np.float32) / 127.5 - 1.0
    codes = model.encode(jnp.asarray(x))
    assert codes.shape == (200, 8, 8)
    recon = np.asarray(model.decode(codes))
    err = ((recon - x)[:, 2:30, 2:30] / 2.0) ** 2
    psnr = float(np.mean(-10 * np.log10(err.mean(axis=(1, 2, 3)))))
    # Stated bar: QUALITY_PSNR_DB on the 28x28 images, and far better than the best constant image (their mean).
    mean_image = x[:, 2:30, 2:30].mean(axis=0)
    baseline = float(np.mean(-10 * np.log10((((x[:, 2:30, 2:30] - mean_image) / 2) ** 2).mean(axis=(1, 2, 3)))))
    assert psnr > QUALITY_PSNR_DB and psnr > baseline + 4, (psnr, baseline)
    # The job's own evaluation (same 200 images, jitted, batched) agrees.
    assert metrics["images"] == 200
    np.testing.assert_allclose(metrics["psnr"], psnr, atol=0.05)
    np.testing.assert_allclose(metrics["mse"], err.mean(), rtol=1e-3)
    assert 0 < metrics["code_usage"] <= 1 and metrics["code_dead_codes"] == 64 * (1 - metrics["code_usage"])
    assert (workdir / "reconstructions" / f"step_{QUALITY_STEPS:08d}.png").exists()
    assert list(workdir.glob("events.out.tfevents*"))
    # load() also reads the training workdir (its latest step) and gives the same tokenizer.
    again = tokenizer.load(workdir)
    np.testing.assert_array_equal(np.asarray(again.encode(jnp.asarray(x))), np.asarray(codes))


@needs_fmnist
def test_resume_from_the_workdir_is_exact(tmp_path, compile_cache):
    config = _job_config(4, checkpoint_every=2, keep_checkpoints=3)
    train.train_and_evaluate(config, str(tmp_path))
    straight = jax.tree.map(np.asarray, nnx.state(tokenizer.load(tmp_path / "tokenizer")))
    # A crash after the step-2 checkpoint: the later checkpoint and the export never happened.
    assert (tmp_path / "checkpoints" / "2").exists()
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "tokenizer")
    train.train_and_evaluate(config, str(tmp_path))  # resumes at step 2: params, Adam state, data order
    resumed = nnx.state(tokenizer.load(tmp_path / "tokenizer"))
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_a_non_finite_state_between_log_steps_is_never_saved(tmp_path, compile_cache):
    """The job logs every 50 steps but saves every 2: a blow-up at step 5 must stop the run at the step-6 save
    (before, only log steps were checked, and the non-finite step 6 was saved as if it were good)."""
    config = _job_config(4, checkpoint_every=2)
    config.data.image_source = "synthetic"  # no dataset needed
    train.train_and_evaluate(config, str(tmp_path))
    config.train.num_steps = 8
    config.optimizer.lr = 1e30  # resuming with another learning rate is allowed; this one overflows at once
    with pytest.raises(loop.NonFiniteError, match=r"(?s)at step 6.*the last good checkpoint is step 4"):
        train.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4, steps
    params = jax.tree.leaves(nnx.state(tokenizer.load(tmp_path / "checkpoints" / "4")))
    assert all(np.isfinite(np.asarray(x)).all() for x in params)


def test_decoding_with_another_tokenizer_than_the_codes_were_made_with_is_refused(tmp_path):
    from par_jax.data import codes as codes_lib
    a, b = vq.VQModel(tiny(), rngs=nnx.Rngs(0)), vq.VQModel(tiny(), rngs=nnx.Rngs(1))
    assert tokenizer.fingerprint(a) == tokenizer.fingerprint(vq.VQModel(tiny(), rngs=nnx.Rngs(0)))
    assert tokenizer.fingerprint(a) != tokenizer.fingerprint(b)
    codes_lib.write_codes(str(tmp_path), [(np.zeros((1, 8, 8), np.int64), 0)], grid_shape=(8, 8), num_views=1,
                          vocab_size=64, num_classes=1, tokenizer="workdirs/tok_a",
                          extra={"tokenizer_fingerprint": tokenizer.fingerprint(a)})
    tokenizer.check_codes_tokenizer(a, str(tmp_path))
    with pytest.raises(ValueError, match=r"(?s)not the one the training codes.*workdirs/tok_a.*sample.tokenizer"):
        tokenizer.check_codes_tokenizer(b, str(tmp_path))
    # What the sample and evaluate jobs and the training plug-ins call: load(path, codes_dir=...).
    from par_jax.core import checkpoint as ckpt_lib
    ckpt_lib.save_params(tmp_path / "b", b)
    with pytest.raises(ValueError, match="not the one the training codes"):
        tokenizer.load(tmp_path / "b", codes_dir=str(tmp_path))


# ----- perceptual and adversarial losses ---------------------------------------------------------------------------

def test_perceptual_loss_needs_its_weights_file(tmp_path):
    with pytest.raises(ValueError, match="perceptual_weight=0"):
        losses.load_perceptual_weights("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        losses.load_perceptual_weights(str(tmp_path / "missing.safetensors"))
    rng = np.random.default_rng(0)
    weights = {k: (rng.normal(size=s) * 0.05).astype(np.float32) for k, s in losses.perceptual_weight_shapes().items()}
    bad = dict(weights)
    bad["lin2.model.1.weight"] = np.zeros((1, 128, 1, 1), np.float32)
    del bad["features.28.bias"]
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match=r"(?s)missing features\.28\.bias.*lin2\.model\.1\.weight: expected"):
        losses.load_perceptual_weights(str(tmp_path / "bad.npz"))
    # LPIPS/LlamaGen naming (net.slice{s}.{i}) is accepted; identical images are at distance 0, different ones not.
    renamed = {(f"net.slice1.{k[9:]}" if k.startswith("features.") else k): v for k, v in weights.items()}
    np.savez(tmp_path / "lpips.npz", **renamed)
    w = losses.load_perceptual_weights(str(tmp_path / "lpips.npz"))
    for k in range(5):  # LPIPS's linear weights are non-negative
        w[f"lin{k}.model.1.weight"] = np.abs(w[f"lin{k}.model.1.weight"])
    x = random_images(0, (2, 32, 32, 3))
    lpips = jax.jit(losses.perceptual_loss)
    d = np.asarray(lpips(w, x, x))
    np.testing.assert_allclose(d, 0.0, atol=1e-6)
    assert d.shape == (2,)
    assert (np.asarray(lpips(w, x, random_images(1, (2, 32, 32, 3)))) > 0).all()


def test_job_refuses_perceptual_loss_without_weights(tmp_path):
    config = _job_config(2)
    config.loss.perceptual_weight = 1.0
    with pytest.raises(ValueError, match="perceptual_weights"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_patch_discriminator_shape():
    out = jax.eval_shape(lambda x: losses.PatchDiscriminator(64, 3, rngs=nnx.Rngs(0))(x),
                         jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert out.shape == (1, 30, 30, 1)  # the 70x70 PatchGAN on 256px images
    assert losses.hinge_d_loss(jnp.array([2.0]), jnp.array([-2.0])) == 0.0
    assert losses.hinge_g_loss(jnp.array([1.0, 3.0])) == -2.0


# ----- bad input -------------------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsampling factor 4"):
        model.encode(jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*x / 127.5 - 1"):
        model.encode(jnp.full((1, 32, 32, 3), 255.0))
    with pytest.raises(ValueError, match="dtype uint8"):
        model.encode(jnp.zeros((1, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match="channels-last"):
        model.encode(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.decode(jnp.full((1, 8, 8), 64, jnp.int32))
    with pytest.raises(ValueError, match="token grids"):
        model.decode(jnp.zeros((1, 64), jnp.int32))
    # Codebook dimension mismatch: latents from a model with another codebook_dim.
    with pytest.raises(ValueError, match="codebook dimension is 4"):
        model.decode_latent(jnp.zeros((1, 8, 8, 8)))
    with pytest.raises(ValueError, match="codebook dimension is 4"):
        model.quantize(jnp.zeros((1, 8, 8, 3)))
    # ...and a checkpoint loaded into a config with another codebook_dim.
    from par_jax.core import checkpoint as ckpt_lib
    ckpt_lib.save_params(tmp_path / "tok", model)
    with pytest.raises(ValueError, match=r"codebook_dim: checkpoint 4 vs requested 8"):
        tokenizer.load(tmp_path / "tok", tiny(codebook_dim=8))
    assert tokenizer.load(tmp_path / "tok", tiny(dtype="bfloat16")).config.dtype == "bfloat16"
    with pytest.raises(FileNotFoundError, match="no tokenizer checkpoint"):
        tokenizer.load(tmp_path / "nothing")
    # Configurations that cannot be built.
    with pytest.raises(ValueError, match="num_groups=32"):
        vq.vq_config("vq16", base_channels=48)
    with pytest.raises(ValueError, match="attn_levels"):
        tiny(attn_levels=(3,))
    with pytest.raises(ValueError, match="unknown tokenizer config"):
        vq.vq_config("vq32")
    with pytest.raises(ValueError, match="unknown tokenizer config fields"):
        vq.vq_config("vq16", codebook=3)
