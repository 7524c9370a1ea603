"""The video tokenizer: frame-count arithmetic, causality in time, shapes, the per-frame baseline, loading, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from par_jax import tokenizer
from par_jax.core import checkpoint as ckpt_lib
from par_jax.tokenizer import video_vq, vq

# 9 frames of 16 px -> 3 x 4 x 4 codes; widths small enough to compile and run in seconds.
TINY = dict(frame_size=16, num_frames=9, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
            z_channels=8, codebook_size=32, codebook_dim=4, num_groups=4)


def tiny(**overrides):
    return video_vq.video_vq_config("video", **{**TINY, **overrides})


def random_clips(key, shape):
    return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def model():
    return video_vq.VideoVQModel(tiny(), rngs=nnx.Rngs(0))


# ----- frame-count arithmetic ---------------------------------------------------------------------------------------

def test_latent_shape_takes_one_plus_4k_frames():
    cfg = video_vq.video_vq_config("video")
    assert cfg.grid_shape == (5, 8, 8)  # the demo's 17 frames at 32 px
    for k in range(5):
        assert cfg.latent_shape(1 + 4 * k, 32) == (1 + k, 8, 8)
        assert cfg.num_frames_of(1 + k) == 1 + 4 * k
    assert cfg.latent_shape(9, 64) == (3, 16, 16)
    with pytest.raises(ValueError, match=r"takes 1 \+ 4k frames \(5, 9, 13, 17, \.\.\.\); got 16"):
        cfg.latent_shape(16, 32)
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's spatial downsampling factor 4"):
        cfg.latent_shape(17, 30)
    # 2x temporal compression: 1 + 2k frames.
    assert tiny(temporal_downsample=2).latent_shape(7, 16) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"1 \+ 2k frames"):
        tiny(temporal_downsample=2).latent_shape(8, 16)
    # The per-frame baseline keeps every frame, whatever the count.
    per_frame = video_vq.video_vq_config("video_per_frame")
    assert per_frame.latent_shape(16, 32) == (16, 8, 8)
    assert per_frame.num_frames_of(16) == 16


def test_bad_configs_are_refused_with_every_reason():
    with pytest.raises(ValueError, match=r"(?s)kind='3d'.*temporal_downsample=3"):
        tiny(kind="3d", temporal_downsample=3)
    with pytest.raises(ValueError, match=r"temporal_downsample=8 must be a power of 2 of at most 2 \*\* 2"):
        tiny(temporal_downsample=8)
    with pytest.raises(ValueError, match="per_frame tokenizer does not compress time"):
        tiny(kind="per_frame")
    with pytest.raises(ValueError, match=r"got 16"):
        tiny(num_frames=16)
    with pytest.raises(ValueError, match="unknown video tokenizer config fields"):
        video_vq.video_vq_config("video", frames=3)


# ----- causality --------------------------------------------------------------------------------------------------

def _group_of_frame(t: int, td: int = 4) -> int:
    return 0 if t == 0 else 1 + (t - 1) // td


def test_a_frame_changes_no_latent_of_an_earlier_group(model):
    """Frame t belongs to latent group g (frame 0 alone, then groups of 4): perturbing it must leave the latents of
    groups < g exactly as they were, and change group g (the encoder is not blind to it)."""
    frames = (0, 1, 4, 6, 8)
    x = random_clips(0, (1, 9, 16, 16, 3))
    noise = random_clips(1, (1, 16, 16, 3))
    batch = jnp.concatenate([x] + [x.at[:, t].set(noise) for t in frames])  # one compiled call for every case
    z = np.asarray(jax.jit(lambda c: model.encode_latent(c))(batch))
    assert z.shape == (1 + len(frames), 3, 4, 4, 4)
    for i, t in enumerate(frames, start=1):
        g = _group_of_frame(t)
        np.testing.assert_array_equal(z[i, :g], z[0, :g], err_msg=f"frame {t} leaked into an earlier group")
        assert np.abs(z[i, g] - z[0, g]).max() > 1e-4, t


def test_the_decoder_is_causal_too(model):
    """Perturbing latent frame j changes no decoded frame before its group (frames 0 .. 4j-4)."""
    z = random_clips(2, (1, 3, 4, 4, 4))
    out = np.asarray(jax.jit(lambda zz: model.decode_latent(zz))(
        jnp.concatenate([z, z.at[:, 1].add(1.0), z.at[:, 2].add(1.0)])))
    for j in (1, 2):
        first = 4 * j - 3
        np.testing.assert_array_equal(out[j, :first], out[0, :first])
        assert np.abs(out[j, first:] - out[0, first:]).max() > 1e-4


# ----- shapes -----------------------------------------------------------------------------------------------------

def test_encode_decode_shapes_and_dtypes(model):
    clips = random_clips(3, (2, 9, 16, 16, 3))
    codes = model.encode(clips)
    assert codes.shape == (2, 3, 4, 4) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    out = model.decode(codes)
    assert out.shape == (2, 9, 16, 16, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    assert model.is_video and not vq.VQModel.is_video
    # Training forward, and other lengths: 5 frames -> 2 latent frames -> 5 frames (traced only).
    recon, q = jax.eval_shape(lambda c: model(c), jax.ShapeDtypeStruct((2, 5, 16, 16, 3), jnp.float32))
    assert recon.shape == (2, 5, 16, 16, 3) and q.codes.shape == (2, 2, 4, 4) and q.z_q.shape == (2, 2, 4, 4, 4)


def test_evaluation_sums_psnr_per_frame_index_over_valid_clips_only(model):
    from par_jax.tokenizer import train
    clips = random_clips(5, (3, 9, 16, 16, 3))
    images = jnp.round((clips + 1) * 127.5).astype(jnp.uint8)
    valid = jnp.asarray([True, True, False])
    sums, _, recon = train.eval_step(nnx.to_pure_dict(nnx.state(model, nnx.Param)), images, valid,
                                     vq_def=nnx.graphdef(model), cfg=model.config, crop=0)
    x = np.asarray(train.to_float(images), np.float64)
    mse = np.mean(((x - np.asarray(recon, np.float64)) / 2) ** 2, axis=(2, 3, 4))  # (clip, frame)
    expected = (-10 * np.log10(mse))[:2].sum(axis=0)  # the third clip is padding
    assert sums["psnr_by_frame"].shape == (9,)
    np.testing.assert_allclose(np.asarray(sums["psnr_by_frame"]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(sums["psnr"]), expected.sum() / 9, rtol=1e-4)  # a clip's PSNR: its frames' mean


def test_per_frame_baseline_keeps_every_frame_and_treats_each_alone():
    cfg = tiny(kind="per_frame", temporal_downsample=1, num_frames=3)
    m = video_vq.VideoVQModel(cfg, rngs=nnx.Rngs(1))
    # Its encoder is the image encoder (2D kernels) applied per frame; causal3d's kernels span 3 frames.
    assert m.encoder.net.conv_in.kernel.shape == (3, 3, 3, 8)
    assert video_vq.param_shapes(tiny())["encoder.conv_in.kernel"] == (3, 3, 3, 3, 8)
    x = random_clips(4, (1, 3, 16, 16, 3))
    y = x.at[:, 1].set(random_clips(5, (1, 16, 16, 3)))
    codes = np.asarray(m.encode(jnp.concatenate([x, y])))
    assert codes.shape == (2, 3, 4, 4) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes[0, [0, 2]], codes[1, [0, 2]])
    assert (codes[0, 1] != codes[1, 1]).any()
    out = m.decode(jnp.asarray(codes))
    assert out.shape == (2, 3, 16, 16, 3) and out.dtype == jnp.float32


def test_bad_clips_give_clear_errors(model):
    with pytest.raises(ValueError, match=r"got 8"):
        model.encode(jnp.zeros((1, 8, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"add a batch axis"):
        model.encode(jnp.zeros((9, 16, 16, 3)))
    with pytest.raises(ValueError, match="spatial downsampling factor 4"):
        model.encode(jnp.zeros((1, 9, 18, 18, 3)))
    with pytest.raises(ValueError, match="dtype uint8"):
        model.encode(jnp.zeros((1, 9, 16, 16, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        model.encode(jnp.full((1, 9, 16, 16, 3), 255.0))
    with pytest.raises(ValueError, match=r"\(batch, frames, height, width\)"):
        model.decode(jnp.zeros((1, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        model.decode(jnp.full((1, 3, 4, 4), 32, jnp.int32))


# ----- checkpoints ------------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(model, tmp_path):
    ckpt_lib.save_params(tmp_path / "tok", model)
    assert isinstance(tokenizer.read_config(tmp_path / "tok"), video_vq.VideoVQConfig)
    loaded = tokenizer.load(tmp_path / "tok")
    assert isinstance(loaded, video_vq.VideoVQModel) and loaded.is_video and loaded.config == model.config
    clips = random_clips(3, (2, 9, 16, 16, 3))  # the shape compiled above
    np.testing.assert_array_equal(np.asarray(loaded.encode(clips)), np.asarray(model.encode(clips)))
    assert tokenizer.fingerprint(loaded) == tokenizer.fingerprint(model)
    other = nnx.clone(model)
    other.quantize.embedding[...] = other.quantize.embedding[...].at[0, 0].add(1.0)
    assert tokenizer.fingerprint(other) != tokenizer.fingerprint(model)
    # Runtime fields may differ, parameters' fields may not, nor may the kind of tokenizer.
    assert tokenizer.load(tmp_path / "tok", tiny(num_frames=17, frame_size=32)).config.frame_size == 32
    with pytest.raises(ValueError, match=r"codebook_dim: checkpoint 4 vs requested 8"):
        tokenizer.load(tmp_path / "tok", tiny(codebook_dim=8))
    with pytest.raises(ValueError, match="holds a VideoVQConfig, but a VQConfig was requested"):
        tokenizer.load(tmp_path / "tok", vq.vq_config("fmnist"))
    # An image tokenizer still loads as one.
    image = vq.VQModel(vq.vq_config("vq16", image_size=16, base_channels=8, channel_mult=(1, 2), attn_levels=(),
                                    z_channels=8, codebook_size=16, codebook_dim=4, num_groups=4), rngs=nnx.Rngs(0))
    ckpt_lib.save_params(tmp_path / "img", image)
    assert type(tokenizer.load(tmp_path / "img")) is vq.VQModel and not tokenizer.load(tmp_path / "img").is_video


# ----- the train_tokenizer job on clips ---------------------------------------------------------------------------

@pytest.mark.slow
def test_train_tokenizer_job_on_clips_writes_a_gif_and_an_export_that_loads(tmp_path):
    from configs import vq as vq_configs
    from par_jax.tokenizer import evaluate, train

    config = vq_configs.get_config("video,runlocal")
    config.tokenizer = vq_configs._video_tokenizer_section("video", **TINY)
    config.data.update(video_source="moving_synthetic", num_frames=9, frame_size=16, count=8)
    config.train.update(batch_size=2, num_steps=2, log_every=1, eval_every=2, checkpoint_every=2, grid_images=2)
    config.optimizer.update(schedule="constant", warmup_steps=0)
    config.eval.update(batch_size=2, num_images=2, final_num_images=2)
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert metrics["clips"] == 2 and np.isfinite(metrics["psnr"]) and 0 < metrics["code_usage"] <= 1
    assert len(metrics["psnr_by_frame"]) == config.data.num_frames  # one per frame index, beside the mean
    gif = tmp_path / "reconstructions" / "step_00000002.gif"
    assert gif.exists() and (tmp_path / "reconstructions" / "step_00000002_frames.png").exists()
    from PIL import Image
    with Image.open(gif) as im:
        assert getattr(im, "n_frames", 1) > 1  # animated: the clip's frames
    model = tokenizer.load(tmp_path / "tokenizer")
    assert model.is_video and model.config == tiny()
    clips = random_clips(3, (2, 9, 16, 16, 3))
    assert model.encode(clips).shape == (2, 3, 4, 4)
    # The evaluate_tokenizer job scores the export the same way.
    again = evaluate.run(config, str(tmp_path))
    np.testing.assert_allclose(again["psnr"], metrics["psnr"], rtol=1e-5)
    assert (tmp_path / "eval_tokenizer" / "reconstructions.gif").exists()
    # A clip length the tokenizer cannot take is refused before any work.
    config.data.num_frames = 8
    with pytest.raises(Exception, match=r"1 \+ 4k frames"):
        train.train_and_evaluate(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoints").exists()


# ----- dead-code restarts -------------------------------------------------------------------------------------------

def test_dead_code_restart_reseeds_only_codes_unused_long_enough_from_the_batch_latents():
    from par_jax.tokenizer import train

    emb = jnp.arange(12.0).reshape(4, 3)
    params = {"quantize": {"embedding": emb}, "decoder": {"w": jnp.ones(2)}}
    latent = 100 + jnp.arange(2 * 3 * 3.0).reshape(2, 3, 3)  # 6 latents of dim 3, all far from the codebook
    hist = jnp.array([5, 0, 0, 1])
    age = jnp.array([7, 2, 0, 9])  # code 1 reaches 3 unused steps now, code 2 only 1
    new, new_age, n = train.restart_dead_codes(params, age, hist, latent, jax.random.key(0), after=3)
    new_emb = np.asarray(new["quantize"]["embedding"])
    assert int(n) == 1 and new_age.tolist() == [0, 0, 1, 0]
    np.testing.assert_array_equal(new_emb[[0, 2, 3]], np.asarray(emb)[[0, 2, 3]])
    assert any(np.array_equal(new_emb[1], row) for row in np.asarray(latent).reshape(-1, 3))
    assert new["decoder"] is params["decoder"]


def test_inflate_init_starts_every_causal_kernel_on_its_newest_frames_only():
    def kernels(cfg):
        m = video_vq.VideoVQModel(cfg, rngs=nnx.Rngs(0))
        return {m.encoder.conv_in: 1, m.encoder.conv_blocks[0].downsample.conv: 2,
                m.decoder.conv_blocks[0].res[0].conv1: 1}

    for conv, live in kernels(tiny()).items():
        k = np.abs(np.asarray(conv.kernel[...])).sum(axis=(1, 2, 3, 4))
        assert (k[:-live] == 0).all() and (k[-live:] > 0).all(), k
    for conv in kernels(tiny(inflate_init=False)):  # the old init: random on every frame
        assert (np.abs(np.asarray(conv.kernel[...])).sum(axis=(1, 2, 3, 4)) > 0).all()
