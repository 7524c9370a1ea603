"""Video codes (issue 18): (t, h, w) codes metadata and records, old image metadata still loading, clips encoded by a
video tokenizer into a codes directory (the same codes as `tok.encode` of the same clips), the clear errors when clips
and tokenizer or model do not fit (before any clip is encoded), and the trainer refusing codes of another grid
before its first step."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from configs import par
from par_jax import tokenizer as tokenizer_lib
from par_jax.core import checkpoint as ckpt_lib
from par_jax.core.config_args import UsageError
from par_jax.data import codes as codes_lib
from par_jax.data import extract, pipeline, video
from par_jax.tokenizer import extract as extract_job

FRAMES, SIZE, GRID = 5, 16, (2, 4, 4)  # 5 frames of 16 px -> 2 latent frames of 4x4 codes


def tiny_video_config(**overrides):
    return tokenizer_lib.video_vq_config("video", **{**dict(
        frame_size=SIZE, num_frames=FRAMES, base_channels=8, channel_mult=(1, 2, 2), z_channels=8, codebook_size=32,
        codebook_dim=4), **overrides})


@pytest.fixture(scope="module")
def video_tok(tmp_path_factory):
    """A random-weight causal 3D tokenizer, saved as a checkpoint and loaded back the way the jobs load it."""
    model = tokenizer_lib.VideoVQModel(tiny_video_config(), rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("video_tok") / "tokenizer"
    ckpt_lib.save_params(path, model)
    return os.fspath(path), tokenizer_lib.load(path)


def clip_source(count=5, **kw):
    return video.make_video_source("moving_synthetic", num_frames=kw.pop("num_frames", FRAMES),
                                   frame_size=kw.pop("frame_size", SIZE), count=count, **kw)


# ----------------------------------------------------------------------------------------------------------------
# The format


def test_video_metadata_and_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    records = [(rng.integers(0, 300, (1, *GRID)), int(rng.integers(3))) for _ in range(7)]
    meta = codes_lib.write_codes(str(tmp_path), iter(records), grid_shape=GRID, num_views=1, vocab_size=300,
                                 num_classes=3, records_per_shard=3, views="clip", image_size=SIZE,
                                 num_frames=FRAMES, source="moving_synthetic", extra={"frame_stride": 2})
    assert meta.grid_shape == GRID and meta.tokens_per_view == 32 and meta.is_video and meta.grid_text == "2x4x4"
    assert meta.dtype == "uint16" and meta.record_nbytes == 8 + 32 * 2
    again = codes_lib.CodesMetadata.load(str(tmp_path))
    assert again == meta and again.num_frames == FRAMES and again.extra == {"frame_stride": 2}
    source = codes_lib.CodesSource(str(tmp_path))
    for i, (codes, label) in enumerate(records):
        np.testing.assert_array_equal(source[i]["codes"], codes)
        assert source[i]["codes"].shape == (1, *GRID) and source[i]["label"] == label
    assert codes_lib.verify_codes(str(tmp_path)) == meta
    # The training input flattens a (t, h, w) view in raster order (frame, row, column).
    config = make_config(tmp_path, grid_shape=GRID, vocab_size=300, num_classes=3)
    batch = next(iter(pipeline.make_train_loader(config, global_batch_size=7)))
    by_label = sorted(batch["tokens"].tolist())
    assert by_label == sorted(np.stack([c.reshape(-1) for c, _ in records]).tolist())


def test_image_metadata_written_before_video_still_loads(tmp_path):
    # metadata.json as the image-only version wrote it: no num_frames field, a 2D grid.
    old = {"format": "par_jax.codes", "version": 1, "grid_shape": [16, 16], "num_views": 10, "vocab_size": 16384,
           "num_classes": 1000, "count": 3, "shards": [{"file": "codes-00000-00000.array_record", "count": 3}],
           "tokenizer": "vq16", "views": "ten_crop", "eval_view": 4, "image_size": 256, "source": "imagenet",
           "class_names": [], "dtype": "uint16", "extra": {"crop_ratio": 1.1}}
    (tmp_path / "metadata.json").write_text(json.dumps(old))
    meta = codes_lib.CodesMetadata.load(str(tmp_path))
    assert meta.grid_shape == (16, 16) and meta.tokens_per_view == 256 and not meta.is_video
    assert meta.num_frames == 0 and meta.record_nbytes == 8 + 10 * 256 * 2 and meta.grid_text == "16x16"
    with pytest.raises(ValueError, match=r"neither \(h, w\) for images nor \(t, h, w\) for video"):
        codes_lib.CodesMetadata(grid_shape=(2, 2, 2, 2), num_views=1, vocab_size=8, num_classes=2, count=0,
                                shards=())
    with pytest.raises(ValueError, match=r"num_frames 17 needs a \(t, h, w\) grid_shape"):
        codes_lib.CodesMetadata(grid_shape=(8, 8), num_views=1, vocab_size=8, num_classes=2, count=0, shards=(),
                                num_frames=17)


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def assert_codes_of(tok, clips, codes) -> bool:
    """`codes` are `tok.encode(clips)`: equal, except where two codebook entries are as near as float rounding can
    tell (XLA's CPU convolutions round differently for other batch sizes, and random weights make such ties); there
    the stored code must still be a nearest one."""
    x = clips.astype(np.float32) / 127.5 - 1
    expected = np.asarray(tok.encode(x))
    differ = expected != codes
    assert differ.mean() <= 0.05, f"{differ.sum()} of {differ.size} codes differ from tok.encode"
    if differ.any():
        z = np.asarray(tok.encode_latent(x))
        book = np.asarray(tok.quantize.codebook())
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
        book = book / np.linalg.norm(book, axis=-1, keepdims=True)
        sims = z @ book.T  # the quantizer's cosine lookup
        chosen = np.take_along_axis(sims, codes[..., None].astype(np.int64), -1)[..., 0]
        assert np.all(chosen[differ] >= sims.max(-1)[differ] - 1e-4), "a stored code is not a nearest code"
    return True


def test_clips_extracted_equal_the_tokenizers_codes(video_tok, tmp_path):
    path, tok = video_tok
    source = clip_source(5)
    meta = extract.extract_video_codes(tok, source, str(tmp_path), batch_size=2, records_per_shard=3,
                                       tokenizer_id=path, tokenizer_fingerprint=tokenizer_lib.fingerprint(tok),
                                       source_spec="moving_synthetic", expected_grid_shape=GRID, log_every_s=0)
    assert meta.grid_shape == GRID and meta.num_views == 1 and meta.views == "clip" and meta.count == 5
    assert meta.num_frames == FRAMES and meta.image_size == SIZE and meta.source == "moving_synthetic"
    assert meta.extra["frame_stride"] == 1 and meta.extra["tokenizer_fingerprint"] == tokenizer_lib.fingerprint(tok)
    assert [c for _, c in meta.shards] == [3, 2] and meta.vocab_size == 32 and meta.num_classes == source.num_classes
    clips = np.stack([source[i][0] for i in range(5)])
    codes = codes_lib.CodesSource(str(tmp_path))
    got = np.stack([codes[i]["codes"][0] for i in range(5)])
    assert_codes_of(tok, clips, got)
    assert [int(codes[i]["label"]) for i in range(5)] == [source[i][1] for i in range(5)]
    # The codes name their tokenizer: decoding with it passes the check, with another it does not.
    tokenizer_lib.check_codes_tokenizer(tok, str(tmp_path))
    # A rerun with the same settings finds every shard complete and encodes nothing; other settings are refused.
    stamps = [(tmp_path / f).stat().st_mtime_ns for f, _ in meta.shards]
    kwargs = dict(batch_size=2, records_per_shard=3, tokenizer_id=path, source_spec="moving_synthetic",
                  tokenizer_fingerprint=tokenizer_lib.fingerprint(tok), log_every_s=0)
    assert extract.extract_video_codes(tok, source, str(tmp_path), **kwargs) == meta
    assert [(tmp_path / f).stat().st_mtime_ns for f, _ in meta.shards] == stamps
    with pytest.raises(ValueError, match="holds codes from another extraction"):
        extract.extract_video_codes(tok, source, str(tmp_path), **{**kwargs, "frame_stride": 2})


def test_clips_that_do_not_fit_the_tokenizer_fail_before_encoding(video_tok, tmp_path):
    _, tok = video_tok
    out = str(tmp_path / "codes")
    with pytest.raises(ValueError, match=r"6 frames of 16x16\) do not fit the tokenizer: .*1 \+ 4k frames"):
        extract.extract_video_codes(tok, clip_source(2, num_frames=6), out)
    with pytest.raises(ValueError, match=r"24x24 frames but the tokenizer was built for 16x16"):
        extract.extract_video_codes(tok, clip_source(2, frame_size=24), out)
    with pytest.raises(ValueError, match=r"into 2x4x4 codes but the model expects \(3, 4, 4\)"):
        extract.extract_video_codes(tok, clip_source(2), out, expected_grid_shape=(3, 4, 4))
    # An image tokenizer (abstract weights: it is refused before it computes anything).
    image_tok = nnx.eval_shape(lambda: tokenizer_lib.VQModel(tokenizer_lib.VQConfig(
        image_size=SIZE, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=8,
        codebook_size=16, codebook_dim=4, num_groups=4), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs a video tokenizer, but this one is an image tokenizer"):
        extract.extract_video_codes(image_tok, clip_source(2), out)

    class Liar:
        """A source whose clips are not what it says."""
        name, num_classes, class_names, num_frames, frame_size = "liar", 2, ("a", "b"), FRAMES, SIZE

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.zeros((FRAMES - 1, SIZE, SIZE, 3), np.uint8), 0

    with pytest.raises(ValueError, match=r"clip 0 of liar is uint8 \(4, 16, 16, 3\), but the source says"):
        extract.extract_video_codes(tok, Liar(), out)
    assert not os.path.exists(out)  # nothing was written by any of them


# ----------------------------------------------------------------------------------------------------------------
# The extract_codes job on clips, and the trainer's check of the codes against the model


def make_config(codes_dir="", *, grid_shape=GRID, vocab_size=32, num_classes=10, **data):
    config = par.get_config("size=tiny,runlocal")
    config.model.update(grid_shape=grid_shape, vocab_size=vocab_size, num_classes=num_classes, n=4)
    config.data.update(source="codes", codes_dir=str(codes_dir), read_threads=1, prefetch=2)
    config.data.update(data)
    return config


def video_job_config(codes_dir, tok_path, **data):
    return make_config(codes_dir, video_source="moving_synthetic", num_frames=FRAMES, frame_size=SIZE,
                       frame_stride=1, video_count=4, tokenizer=tok_path, extract_batch_size=2,
                       records_per_shard=10, extract_workers=1, **data)


def test_extract_codes_job_on_clips_then_the_grid_checked_before_training(video_tok, tmp_path):
    path, tok = video_tok
    config = video_job_config(tmp_path / "codes", path)
    with pytest.raises(UsageError, match=r"into 2x4x4 codes but config.model.grid_shape is \(5, 4, 4\)"):
        config.model.grid_shape = (5, 4, 4)
        extract_job.run(config, str(tmp_path))
    config.data.num_frames = 7
    with pytest.raises(UsageError, match=r"data.num_frames=7 / data.frame_size=16 do not fit .*1 \+ 4k"):
        extract_job.run(config, str(tmp_path))
    config = video_job_config(tmp_path / "codes", path)
    meta = extract_job.run(config, str(tmp_path))
    assert meta.count == 4 and meta.grid_shape == GRID and meta.source == "moving_synthetic"
    assert meta.tokenizer == path and meta.num_frames == FRAMES
    clip, label = clip_source(4, seed=0)[3]
    record = codes_lib.CodesSource(str(tmp_path / "codes"))[3]
    assert_codes_of(tok, clip[None], record["codes"][:1]) and record["label"] == label
    batch = next(iter(pipeline.make_train_loader(config, global_batch_size=2)))
    assert batch["tokens"].shape == (2, 32) and batch["tokens"].max() < 32

    # A model of another grid is refused with both grids named, before the trainer builds anything.
    from par_jax.training import train
    for grid, hint in (((8, 8), r"video codes need a model with a \(t, h, w\) grid_shape"),
                       ((3, 4, 4), "extract codes with the model's num_frames and frame_size")):
        config.model.grid_shape = grid
        with pytest.raises(UsageError, match=rf"codes in .*codes do not fit the model: the codes are 2x4x4 token "
                                             rf"grids but config.model.grid_shape is \({grid[0]}, .*{hint}"):
            train.train_and_evaluate(config, str(tmp_path / "train"))
        assert not (tmp_path / "train" / "checkpoints").exists()
    # And the phase the demo runs takes the same video fields (the first 3 clips here).
    config = video_job_config(tmp_path / "phase_codes", path)
    from par_jax import phases
    result = phases.extract_codes(config, max_images=3)
    assert result["clips"] == 3 and codes_lib.CodesMetadata.load(str(tmp_path / "phase_codes")).count == 3
