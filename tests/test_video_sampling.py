"""Video through the decoder (issue 18 item 4): a (t, h, w) model trains a few steps on video codes through the real
trainer entry, and the sample job decodes its tokens through the video tokenizer into clips, an animated GIF grid
(one row per class) and a PNG frame strip; a tokenizer that cannot decode the model's grid is refused before
anything is sampled."""

import os
import types

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import par
from par_jax import tokenizer as tokenizer_lib
from par_jax.core import checkpoint as ckpt_lib
from par_jax.data import codes as codes_lib
from par_jax.model import from_config_dict
from par_jax.sampling import job
from par_jax.utils import images as images_lib

FRAMES, SIZE, GRID, VOCAB, CLASSES = 5, 16, (2, 4, 4), 32, 10


@pytest.fixture(scope="module")
def video_tok(tmp_path_factory):
    cfg = tokenizer_lib.video_vq_config("video", frame_size=SIZE, num_frames=FRAMES, base_channels=8,
                                        channel_mult=(1, 2, 2), z_channels=8, codebook_size=VOCAB, codebook_dim=4)
    path = tmp_path_factory.mktemp("video_tok") / "tokenizer"
    ckpt_lib.save_params(path, tokenizer_lib.VideoVQModel(cfg, rngs=nnx.Rngs(0)))
    return os.fspath(path), tokenizer_lib.load(path)


def video_codes(directory, tok, count=12):
    """Codes as extract_video_codes records them: each class a fixed (t, h, w) grid, a few tokens changed."""
    rng = np.random.default_rng(0)
    grids = rng.integers(0, VOCAB, (CLASSES, *GRID))

    def records():
        for i in range(count):
            label = i % CLASSES
            noisy = np.where(rng.random(GRID) < 0.1, rng.integers(0, VOCAB, GRID), grids[label])
            yield noisy[None], label

    return codes_lib.write_codes(str(directory), records(), grid_shape=GRID, num_views=1, vocab_size=VOCAB,
                                 num_classes=CLASSES, views="clip", image_size=SIZE, num_frames=FRAMES,
                                 source="moving_synthetic", tokenizer="tiny video",
                                 extra={"frame_stride": 1, "tokenizer_fingerprint": tokenizer_lib.fingerprint(tok)})


def make_config(codes_dir, tok_path, grid=GRID):
    config = par.get_config("size=tiny,runlocal")
    config.model.update(grid_shape=grid, vocab_size=VOCAB, num_classes=CLASSES, n=4)
    config.data.update(source="codes", codes_dir=str(codes_dir), read_threads=1, prefetch=2, tokenizer=tok_path)
    config.optimizer.update(warmup_steps=1)
    config.train.update(batch_size=4, num_steps=3, log_every_steps=1, checkpoint_every_steps=3,
                        async_checkpoints=False, sample_every_steps=0, peak_flops=1e11)
    config.sample.update(num_images=4, batch_size=4, labels="1,2", seed=0)
    return config


def test_video_model_trains_on_codes_and_samples_clips_gif_and_strip(video_tok, tmp_path):
    from par_jax.training import train
    tok_path, tok = video_tok
    video_codes(tmp_path / "codes", tok)
    config = make_config(tmp_path / "codes", tok_path)
    metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(metrics["loss"]) and metrics["loss"] < 2 * np.log(VOCAB)
    assert ckpt_lib.resolve(str(tmp_path / "run"), what="par_jax checkpoint").directory.exists()

    out = job.run(config, str(tmp_path / "run"))  # the decoder from its checkpoint, the tokenizer from data.tokenizer
    folder = os.path.dirname(out["npz"])
    assert sorted(os.listdir(folder)) == ["frames.png", "grid.gif", "samples.npz", "settings.json"]
    with np.load(out["npz"]) as f:
        tokens, clips, labels = f["tokens"], f["arr_0"], f["arr_1"]
    assert tokens.shape == (4, *GRID) and clips.shape == (4, FRAMES, SIZE, SIZE, 3) and clips.dtype == np.uint8
    assert labels.tolist() == [1, 1, 2, 2] and tokens.max() < VOCAB
    # The clips are the tokenizer's decoding of the sampled tokens.
    decoded = images_lib.to_uint8(tok.decode(tokens))
    assert np.abs(decoded.astype(int) - clips).max() <= 1
    # The GIF plays every frame of a grid with a row per class (2 rows of 2 clips, 2 px gaps), upscaled whole.
    with Image.open(out["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames == FRAMES and gif.info.get("loop") == 0
        width, height = gif.size
    grid_side = 2 * SIZE + 3 * 2
    assert width == height and width % grid_side == 0 and width >= 128
    # The strip: the first clip of each grid row (one per class), its frames left to right.
    with Image.open(out["png"]) as strip:
        assert out["png"].endswith("frames.png") and strip.width > FRAMES * SIZE and strip.height > 2 * SIZE
        assert strip.width / strip.height == pytest.approx((FRAMES * 64 + (FRAMES + 1) * 2) / (2 * 64 + 3 * 2))
    # A finished job reads its outputs back instead of sampling again.
    again = job.run(config, str(tmp_path / "run"))
    np.testing.assert_array_equal(again["clips"], clips)
    assert again["gif"] == out["gif"] and again["images"] is None


def test_a_tokenizer_that_cannot_decode_the_grid_is_refused_before_sampling(video_tok, tmp_path, monkeypatch):
    tok_path, tok = video_tok

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(job, "Sampler", no_sampling)

    def run(grid, tokenizer, **data):
        config = make_config("", "", grid=grid)
        config.data.update(source="synthetic", **data)
        model = types.SimpleNamespace(config=from_config_dict(config.model))  # the check runs before any sampling
        return job.run(config, str(tmp_path / "x".join(map(str, grid))), model=model, tokenizer=tokenizer)

    # An image tokenizer (abstract weights: it is refused before it computes anything).
    image_tok = nnx.eval_shape(lambda: tokenizer_lib.VQModel(tokenizer_lib.VQConfig(
        image_size=SIZE, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=8,
        codebook_size=16, codebook_dim=4, num_groups=4), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"generates 2x4x4 video grids but the tokenizer is an image tokenizer"):
        run(GRID, image_tok)
    with pytest.raises(ValueError, match=r"generates 4x4 image grids but the tokenizer is a video tokenizer"):
        run((4, 4), tok)
    # The tokenizer's latent shape for the training clips (here its own 5 frames of 16 px) must be the grid.
    with pytest.raises(ValueError, match=r"turns 5 frames of 16 px \(from the tokenizer's own num_frames / "
                                         r"frame_size\) into 2x4x4 codes but the model generates 3x4x4 grids"):
        run((3, 4, 4), tok)
    with pytest.raises(ValueError, match=r"turns 9 frames of 16 px \(from config.data.num_frames / frame_size\) "
                                         r"into 3x4x4 codes but the model generates 2x4x4 grids"):
        run(GRID, tok, video_source="moving_synthetic", num_frames=9, frame_size=SIZE)
    with pytest.raises(ValueError, match=r"cannot take the clips \(8 frames of 16 px.*1 \+ 4k frames"):
        run(GRID, tok, video_source="moving_synthetic", num_frames=8, frame_size=SIZE)
    job.check_tokenizer(tok, GRID, make_config("", ""))  # the right pairing passes


def test_bench_sample_reads_video_grids_and_refuses_others():
    from par_jax.bench import sample as bench_sample
    from par_jax.core import config_args
    args = bench_sample.settings_from_flags(config_args.parse_flags(["bench", "--grid=5x16x16"],
                                                                    bench_sample.define_flags))
    assert args.grid == (5, 16, 16)
    for bad in ("5x16x16x2", "0x8x8"):
        with pytest.raises(config_args.UsageError, match=r"HxW .* or TxHxW for video .*every size positive"):
            bench_sample.settings_from_flags(config_args.parse_flags(["bench", f"--grid={bad}"],
                                                                     bench_sample.define_flags))


def test_training_plugins_on_a_video_model_write_a_gif_and_video_metrics(video_tok, tmp_path):
    """The loop's `samples` plug-in writes an animated GIF for a (t, h, w) decoder, and its `eval` plug-in scores
    clips with a video network against clips of a video source."""
    from par_jax.evaluation import video_classifier
    from par_jax.training import train
    tok_path, tok = video_tok
    video_codes(tmp_path / "codes", tok)
    classifier = tmp_path / "classifier"
    video_classifier.save(classifier, video_classifier.VideoClassifier(rngs=nnx.Rngs(0)), {"test_accuracy": 0.0})
    config = make_config(tmp_path / "codes", tok_path)
    config.train.update(sample_every_steps=3, sample_num_images=4)
    config.eval.update(feature_network="video_classifier", classifier=str(classifier), reference="moving_synthetic",
                       reference_split="test", reference_count=8, resolution=0, batch_size=4,
                       metrics="fvd,class_consistency", fid_min_samples=2)
    config.evals.eval = dict(every_steps=3, num_samples=4)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    from par_jax.demo import read_scalar_curve  # the loop writes its plug-ins' results to TensorBoard
    steps, distance = read_scalar_curve(str(tmp_path / "run"), "eval/eval/fd_video_classifier")
    assert steps.tolist() == [3] and np.isfinite(distance[0])
    _, consistency = read_scalar_curve(str(tmp_path / "run"), "eval/eval/class_consistency")
    assert 0 <= consistency[0] <= 1
    with Image.open(tmp_path / "run" / "samples" / "step_00000003.gif") as gif:
        assert gif.n_frames == FRAMES
