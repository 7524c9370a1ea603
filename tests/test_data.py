"""par_jax.data: views, image sources, code records, extraction and the grain training pipeline (CPU, small)."""

import gzip
import os
import subprocess
import sys
import types

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx
from PIL import Image

from configs import par
from par_jax.data import codes as codes_lib
from par_jax.data import extract, pipeline, sources, views

# ----------------------------------------------------------------------------------------------------------------
# Views


def coordinate_image(h, w):
    """uint8 image whose pixel (y, x) holds (y, x, 7): every crop says where it came from."""
    y, x = np.mgrid[:h, :w]
    return np.stack([y, x, np.full_like(y, 7)], -1).astype(np.uint8)


def test_ten_crop_geometry():
    h, w, s = 50, 61, 32
    crops = views.ten_crop(coordinate_image(h, w), s)
    assert len(crops) == 10 and all(c.shape == (s, s, 3) for c in crops)
    top, left = round((h - s) / 2), round((w - s) / 2)
    corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), (top, left)]
    for crop, (y0, x0) in zip(crops[:5], corners):
        assert (crop[0, 0, 0], crop[0, 0, 1]) == (y0, x0)
        assert (crop[-1, -1, 0], crop[-1, -1, 1]) == (y0 + s - 1, x0 + s - 1)
    # The last five are the five crops of the mirrored image: top-left of the mirror = mirrored top-right, etc.
    for flipped, original in zip(crops[5:9], [crops[1], crops[0], crops[3], crops[2]]):
        np.testing.assert_array_equal(flipped, original[:, ::-1])
    # The mirror's centre crop starts `left` columns from the mirror's left edge: original columns
    # [w - left - s, w - left) = [15, 47) here, one off the unflipped centre [14, 46) (torchvision rounds 14.5 to 14).
    image = coordinate_image(h, w)
    np.testing.assert_array_equal(crops[9], image[top:top + s, w - left - s:w - left][:, ::-1])
    assert crops[9][0, -1, 1] == 15 and crops[4][0, 0, 1] == 14


def test_center_crop_keeps_the_middle_and_ten_crop_views():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100, 0] = 255   # left half red
    image[:, 100:, 2] = 255   # right half blue
    crop = views.center_crop(image, 35)
    assert crop.shape == (35, 35, 3)
    # The square centre crop spans original columns 50..150: red on its left, blue on its right.
    assert crop[:, :12, 0].min() > 200 and crop[:, :12, 2].max() < 50
    assert crop[:, -12:, 2].min() > 200 and crop[:, -12:, 0].max() < 50
    stacked = views.make_views(image, "ten_crop", 32, crop_ratio=1.1)  # crop 35 then 32x32 crops
    assert stacked.shape == (10, 32, 32, 3) and stacked.dtype == np.uint8
    np.testing.assert_array_equal(stacked[4], views.five_crop(crop, 32)[4])
    assert views.num_views("ten_crop") == 10 and views.eval_view("ten_crop") == 4
    # Big photos are box-halved first: a 512px constant image stays exactly constant at 64px.
    const = np.full((512, 640, 3), 93, np.uint8)
    assert (views.center_crop(const, 64) == 93).all()


def test_pad_and_resize_views():
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 3), np.uint8)
    padded = views.make_views(image, "pad", 32, flip_views=True)
    assert padded.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(padded[0, 2:30, 2:30], image)
    assert padded[0, :2].max() == 0 and padded[0, :, 30:].max() == 0
    np.testing.assert_array_equal(padded[1], padded[0][:, ::-1])
    assert views.make_views(image, "resize", 16).shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="cannot pad a 28x28 image to 16x16"):
        views.make_views(image, "pad", 16)
    with pytest.raises(ValueError, match="unknown view kind"):
        views.make_views(image, "nine_crop", 16)


# ----------------------------------------------------------------------------------------------------------------
# Image sources


def write_idx(path, array):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def test_idx_reader_and_fashion_mnist_files(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 28, 28), np.uint8)
    labels = np.array([9, 0, 3, 3, 1, 2], np.uint8)
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), labels)
    wide = rng.integers(-5, 5, (3, 4), np.int32)
    write_idx(str(tmp_path / "wide-idx2"), wide)
    np.testing.assert_array_equal(sources.read_idx(str(tmp_path / "wide-idx2")), wide)

    src = sources.make_image_source(f"fashion_mnist:{tmp_path}", split="test")
    assert len(src) == 6 and src.num_classes == 10 and src.class_names[9] == "Ankle boot"
    image, label = src[2]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and label == 3
    np.testing.assert_array_equal(image[..., 1], images[2])

    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
        data = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-10])
    with pytest.raises(sources.DataSourceError, match="truncated or damaged"):
        sources.fashion_mnist_files("test", str(tmp_path))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(sources.DataSourceError, match="not an idx file"):
        sources.read_idx(str(tmp_path / "bad"))


def test_fashion_mnist_falls_back_to_files_then_says_how_to_get_it(tmp_path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    write_idx(str(idx_dir / "train-images-idx3-ubyte.gz"), np.zeros((2, 28, 28), np.uint8))
    write_idx(str(idx_dir / "train-labels-idx1-ubyte.gz"), np.array([4, 5], np.uint8))
    # tfds has no prepared copy in this (empty) data_dir and may not download: the idx files are used.
    src = sources.fashion_mnist("train", data_dir=str(tmp_path / "tfds"), download=False, directory=str(idx_dir))
    assert isinstance(src, sources.IdxSource) and len(src) == 2 and src[1][1] == 5
    with pytest.raises(sources.DataSourceError, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist("train", data_dir=str(tmp_path / "tfds"), directory=str(tmp_path / "nothing"))


@pytest.mark.skipif(not os.path.exists(sources.DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist absent")
def test_real_fashion_mnist_files():
    src = sources.fashion_mnist_files("test")
    assert len(src) == 10_000
    image, label = src[0]
    assert image.shape == (28, 28, 3) and label == 9  # the first test image is an ankle boot
    labels = np.array([src[i][1] for i in range(len(src))])
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


def test_tfds_source_reads_a_data_source_and_explains_a_missing_one(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        src = sources.make_image_source("tfds:fashion_mnist", split="train", data_dir=str(tmp_path))
        assert len(src) == 5 and src.num_classes == 10
        image, label = src[3]
        assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and 0 <= label < 10
    with pytest.raises(sources.DataSourceError, match="tfds build mnist --file_format=array_record"):
        sources.make_image_source("tfds:mnist", data_dir=str(tmp_path))


def test_folder_source(tmp_path):
    rng = np.random.default_rng(2)
    written = {}
    for cls, n in (("zebra", 2), ("aardvark", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            image = rng.integers(0, 256, (10 + i, 12, 3), np.uint8)
            Image.fromarray(image).save(tmp_path / cls / f"{i}.png")
            written[(cls, i)] = image
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    src = sources.make_image_source(f"folder:{tmp_path}")
    assert src.class_names == ("aardvark", "zebra") and len(src) == 5
    assert [src[i][1] for i in range(5)] == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(src[4][0], written[("zebra", 1)])
    (tmp_path / "zebra" / "2.png").write_bytes(b"not a png")
    with pytest.raises(sources.DataSourceError, match="cannot decode image .*2.png"):
        sources.FolderSource(str(tmp_path))[5]
    with pytest.raises(sources.DataSourceError, match="no class subfolders"):
        sources.FolderSource(str(tmp_path / ".cache"))


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def pool_encode(images):
    """A fake tokenizer: the top-left pixel's red value of every 8x8 patch, over 4 (64 codes). Exact in float32."""
    pixels = jnp.round((images[:, ::8, ::8, 0] + 1) * 127.5).astype(jnp.int32)
    return pixels // 4


def extract_small(out_dir, source, **kw):
    args = dict(image_size=16, views="ten_crop", batch_size=3, records_per_shard=5, vocab_size=64,
                tokenizer_id="pool8", log_every_s=0)
    return extract.extract_codes(pool_encode, source, str(out_dir), **{**args, **kw})


def test_extract_codes_writes_every_view_of_every_image(tmp_path):
    source = sources.SyntheticImages(11, size=24, num_classes=3)
    meta = extract_small(tmp_path, source)
    assert meta.count == 11 and meta.num_views == 10 and meta.grid_shape == (2, 2) and meta.eval_view == 4
    assert [c for _, c in meta.shards] == [5, 5, 1] and meta.tokenizer == "pool8" and meta.num_classes == 3
    codes = codes_lib.CodesSource(str(tmp_path))
    for i in range(len(source)):
        image, label = source[i]
        expected = pool_encode(views.make_views(image, "ten_crop", 16).astype(np.float32) / 127.5 - 1)
        np.testing.assert_array_equal(codes[i]["codes"], expected)
        assert codes[i]["label"] == label
    assert codes_lib.verify_codes(str(tmp_path)) == meta


def test_extract_codes_resumes_and_refuses_other_settings(tmp_path):
    source = sources.SyntheticImages(11, size=24, num_classes=3)
    extract_small(tmp_path, source)
    first = [codes_lib.CodesSource(str(tmp_path))[i]["codes"].copy() for i in range(11)]
    kept = tmp_path / codes_lib.shard_name(0, 0)
    kept_mtime = kept.stat().st_mtime_ns
    os.remove(tmp_path / codes_lib.shard_name(0, 1))
    extract_small(tmp_path, source)
    assert kept.stat().st_mtime_ns == kept_mtime  # complete shards are not redone
    again = codes_lib.CodesSource(str(tmp_path))
    for i in range(11):
        np.testing.assert_array_equal(again[i]["codes"], first[i])
    with pytest.raises(ValueError, match="holds codes from another extraction"):
        extract_small(tmp_path, source, image_size=24, vocab_size=64)


def test_extract_codes_split_over_processes_matches_one_process(tmp_path):
    source = sources.SyntheticImages(9, size=20, num_classes=4)
    one = extract_small(tmp_path / "one", source, views="center")
    # Emulated processes: the others first, process 0 last (it merges the parts into metadata.json).
    assert extract_small(tmp_path / "three", source, views="center", process_index=2, process_count=3) is None
    assert extract_small(tmp_path / "three", source, views="center", process_index=1, process_count=3) is None
    three = extract_small(tmp_path / "three", source, views="center", process_index=0, process_count=3)
    assert three.count == one.count == 9 and len(three.shards) == 3
    a, b = codes_lib.CodesSource(str(tmp_path / "one")), codes_lib.CodesSource(str(tmp_path / "three"))
    for i in range(9):
        np.testing.assert_array_equal(a[i]["codes"], b[i]["codes"])
        assert a[i]["label"] == b[i]["label"]


def test_extract_codes_checks_the_grid_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"into 2x2 codes but the model expects \(4, 4\)"):
        extract_small(tmp_path, sources.SyntheticImages(3, size=20), expected_grid_shape=(4, 4))
    assert not (tmp_path / codes_lib.shard_name(0, 0)).exists()


# ----------------------------------------------------------------------------------------------------------------
# Records written directly, then read through the training pipeline


def identity_records(count, num_views, num_classes=7):
    """Record i, view v holds tokens [i % 50, v, i // 50, label]: every loader output names its record and view."""
    for i in range(count):
        label = (3 * i) % num_classes
        yield np.array([[[i % 50, v], [i // 50, label]] for v in range(num_views)]), label


def make_config(codes_dir="", **data):
    config = par.get_config("size=tiny,runlocal")
    config.model.grid_shape, config.model.vocab_size, config.model.num_classes = (2, 2), 64, 7
    config.data.source = "codes"
    config.data.codes_dir = str(codes_dir)
    config.data.read_threads = 2
    config.data.prefetch = 4
    config.data.update(data)
    return config


def write_identity_codes(directory, count=40, num_views=10, records_per_shard=16):
    return codes_lib.write_codes(str(directory), identity_records(count, num_views), grid_shape=(2, 2),
                                 num_views=num_views, vocab_size=64, num_classes=7,
                                 records_per_shard=records_per_shard, tokenizer="test",
                                 eval_view=4 if num_views == 10 else 0)


def decode_batch(batch):
    tokens = batch["tokens"]
    return tokens[:, 0] + 50 * tokens[:, 2], tokens[:, 1]  # record index, view


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def identity_codes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("identity_codes")
    write_identity_codes(directory)
    return directory


def test_loader_batches_shapes_labels_and_random_views(identity_codes):
    loader = pipeline.make_train_loader(make_config(identity_codes), global_batch_size=8)
    batches = take(iter(loader), 10)  # two epochs of 40 records
    for batch in batches:
        assert batch["tokens"].shape == (8, 4) and batch["tokens"].dtype == np.int32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"], batch["tokens"][:, 3])
    index, view = map(np.concatenate, zip(*map(decode_batch, batches)))
    np.testing.assert_array_equal(np.sort(index[:40]), np.arange(40))  # an epoch visits every record once
    np.testing.assert_array_equal(np.sort(index[40:]), np.arange(40))
    assert not np.array_equal(index[:40], index[40:])                    # reshuffled each epoch
    assert not np.array_equal(index[:40], np.arange(40))                 # shuffled at all
    assert len(set(view.tolist())) >= 8                                  # views drawn at random from all 10
    assert view.min() >= 0 and view.max() < 10


def test_loader_shards_are_disjoint_and_cover_the_data(identity_codes):
    for process_count in (2, 3):
        per_process = 40 // process_count
        seen = []
        for p in range(process_count):
            loader = pipeline.make_train_loader(make_config(identity_codes), global_batch_size=2 * process_count,
                                                process_index=p, process_count=process_count)
            batches = take(iter(loader), -(-per_process // 2))
            index = np.concatenate([decode_batch(b)[0] for b in batches])[:per_process]
            assert len(set(index.tolist())) == per_process
            seen.append(set(index.tolist()))
        assert set.union(*seen) == set(range(per_process * process_count))
        assert sum(map(len, seen)) == per_process * process_count  # disjoint


def test_loader_state_restores_exactly(identity_codes, tmp_path):
    config = make_config(identity_codes)
    it = iter(pipeline.make_train_loader(config, global_batch_size=4))
    take(it, 7)
    state = it.get_state()
    expected = take(it, 12)  # crosses an epoch boundary
    resumed = iter(pipeline.make_train_loader(config, global_batch_size=4))
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 12)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["label"], b["label"])

    # Through grain's orbax checkpoint handler, as training saves it.
    handler = grain.checkpoint.CheckpointHandler()
    fresh = iter(pipeline.make_train_loader(config, global_batch_size=4))
    take(fresh, 7)
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(fresh))
    restored = handler.restore(epath.Path(tmp_path),
                               args=grain.checkpoint.CheckpointRestore(iter(pipeline.make_train_loader(
                                   config, global_batch_size=4))))
    np.testing.assert_array_equal(next(restored)["tokens"], expected[0]["tokens"])

    # Another seed gives another stream; the same seed the same one.
    other = take(iter(pipeline.make_train_loader(make_config(identity_codes, seed=1), global_batch_size=4)), 3)
    same = take(iter(pipeline.make_train_loader(config, global_batch_size=4)), 3)
    first = take(iter(pipeline.make_train_loader(config, global_batch_size=4)), 3)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, same))
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


def test_eval_loader_is_one_ordered_padded_pass(identity_codes):
    batches = list(pipeline.make_eval_loader(make_config(identity_codes), global_batch_size=6, process_index=1,
                                             process_count=2))
    assert len(batches) == 7 and all(b["tokens"].shape == (3, 4) for b in batches)  # 20 records, 3 per batch
    mask = np.concatenate([b["mask"] for b in batches])
    index, view = map(np.concatenate, zip(*map(decode_batch, batches)))
    np.testing.assert_array_equal(index[mask], np.arange(20, 40))
    assert (view == 4).all() and mask.sum() == 20


def test_synthetic_codes_have_learnable_structure():
    config = make_config(source="synthetic", synthetic_count=64, synthetic_views=2, synthetic_noise=0.25)
    config.model.grid_shape, config.model.vocab_size = (4, 4), 512
    batch = next(iter(pipeline.make_train_loader(config, global_batch_size=64)))
    assert batch["tokens"].shape == (64, 16) and batch["tokens"].max() < 512 and batch["label"].max() < 7
    source = pipeline.make_codes_source(config)
    grids = source._grids.reshape(7, -1)
    flipped = source._grids[:, :, ::-1].reshape(7, -1)
    # Most tokens equal the class grid (or its mirror): a model conditioned on the label can learn them.
    match = np.maximum((batch["tokens"] == grids[batch["label"]]).mean(1),
                       (batch["tokens"] == flipped[batch["label"]]).mean(1))
    assert 0.6 < match.mean() < 0.9
    again = next(iter(pipeline.make_train_loader(config, global_batch_size=64)))
    np.testing.assert_array_equal(batch["tokens"], again["tokens"])


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_damaged_shard_names_file_and_record(tmp_path, monkeypatch):
    write_identity_codes(tmp_path, count=20, records_per_shard=10)
    path = tmp_path / codes_lib.shard_name(0, 1)
    data = bytearray(path.read_bytes())
    data[150] ^= 0xFF  # inside the first record of shard 1 (its chunk's hash no longer matches)
    path.write_bytes(bytes(data))
    source = codes_lib.CodesSource(str(tmp_path))
    source[3]  # shard 0 is fine
    with pytest.raises(codes_lib.CorruptRecordError, match=rf"{path.name}, record 0 \(global index 10\)"):
        source[10]
    # Small codes are verified whole when the train loader is made: the run stops before its first step.
    with pytest.raises(codes_lib.CorruptRecordError, match=path.name):
        pipeline.make_train_loader(make_config(tmp_path), global_batch_size=20)
    # Codes too large to verify at start: the bad record is still named when it is read.
    monkeypatch.setattr(codes_lib, "VERIFY_AT_START_BYTES", 0)
    loader = pipeline.make_train_loader(make_config(tmp_path), global_batch_size=20)
    with pytest.raises(codes_lib.CorruptRecordError, match=path.name):
        next(iter(loader))
    # The ahead-of-time pass names the file too, and exits non-zero.
    proc = subprocess.run([sys.executable, "-m", "par_jax.data.verify", f"--codes_dir={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and path.name in proc.stderr, proc.stderr[-2000:]


def test_mismatched_record_names_file_and_record(tmp_path):
    write_identity_codes(tmp_path, count=6, num_views=2, records_per_shard=6)
    from array_record.python import array_record_module
    path = str(tmp_path / codes_lib.shard_name(0, 0))
    good = codes_lib.CodesSource(str(tmp_path))._records[0]
    writer = array_record_module.ArrayRecordWriter(path, codes_lib.WRITER_OPTIONS)
    for i in range(6):
        # record 3: 3 views instead of 2; record 5: a code outside the vocabulary
        raw = good + good[8:16] if i == 3 else good[:8] + np.full(8, 99, "<u2").tobytes() if i == 5 else good
        writer.write(raw)
    writer.close()
    source = codes_lib.CodesSource(str(tmp_path))
    with pytest.raises(codes_lib.CorruptRecordError, match=r"record 3 .*has 32 bytes but the metadata .* needs 24"):
        source[3]
    with pytest.raises(codes_lib.CorruptRecordError, match=r"record 5 .*outside the vocabulary \[0, 64\)"):
        source[5]
    with pytest.raises(codes_lib.CorruptRecordError, match=r"record 3 "):
        codes_lib.verify_codes(str(tmp_path))


def test_truncated_or_missing_shards_and_wrong_model_fail_early(tmp_path):
    write_identity_codes(tmp_path, count=20, records_per_shard=10)
    with pytest.raises(ValueError, match=r"2x2 token grids but config.model.grid_shape is \(4, 4\)"):
        config = make_config(tmp_path)
        config.model.grid_shape = (4, 4)
        pipeline.make_train_loader(config, global_batch_size=4)
    with pytest.raises(ValueError, match="global batch size 5 must be a positive multiple of the number of proc"):
        pipeline.make_train_loader(make_config(tmp_path), global_batch_size=5, process_index=0, process_count=2)
    path = tmp_path / codes_lib.shard_name(0, 1)
    codes_lib.write_codes(str(tmp_path / "short"), identity_records(7, 10), grid_shape=(2, 2), num_views=10,
                          vocab_size=64, num_classes=7)
    path.write_bytes((tmp_path / "short" / codes_lib.shard_name(0, 0)).read_bytes())
    with pytest.raises(codes_lib.CorruptRecordError, match=rf"{path.name} holds 7 records but metadata.json says 10"):
        codes_lib.CodesSource(str(tmp_path))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        codes_lib.CodesSource(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="extract_codes"):
        pipeline.make_train_loader(make_config(tmp_path / "nowhere"), global_batch_size=4)


def test_loader_with_worker_processes_gives_the_same_stream_and_restores(identity_codes):
    reference = take(iter(pipeline.make_train_loader(make_config(identity_codes), global_batch_size=4)), 11)
    config = make_config(identity_codes, worker_count=2)
    it = iter(pipeline.make_train_loader(config, global_batch_size=4))
    take(it, 5)
    state = it.get_state()
    expected = take(it, 6)
    resumed = iter(pipeline.make_train_loader(config, global_batch_size=4))
    resumed.set_state(state)
    got = take(resumed, 6)
    for a, b, c in zip(reference[5:], expected, got):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["tokens"], c["tokens"])
    del it, resumed  # stop the worker processes now, not at interpreter exit


# ----------------------------------------------------------------------------------------------------------------
# Extraction with an nnx tokenizer, batch-sharded over 8 simulated devices (in a subprocess)


class PatchTokenizer(nnx.Module):
    """A stand-in VQ tokenizer: 4x4 patches -> linear scores over 16 codes -> argmax. Dropout checks eval mode."""

    def __init__(self, rngs):
        self.config = types.SimpleNamespace(codebook_size=16, in_channels=3)
        self.proj = nnx.Conv(3, 16, (4, 4), strides=4, rngs=rngs)
        self.dropout = nnx.Dropout(0.9, rngs=rngs)

    def encode(self, images):
        return jnp.argmax(self.dropout(self.proj(images)), -1).astype(jnp.int32)


SHARDED_EXTRACT = """
import sys, jax, numpy as np
from flax import nnx
sys.path[:0] = [{root!r}, {tests!r}]
from test_data import PatchTokenizer
from par_jax.data import extract, sources
assert jax.local_device_count() == 8
model = PatchTokenizer(nnx.Rngs(0))
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
out = extract._Encoder(model, mesh, 3)(np.zeros((16, 16, 16, 3), np.uint8))
assert len(out.sharding.device_set) == 8 and out.shape == (16, 4, 4), out.sharding
extract.extract_codes(model, sources.SyntheticImages(7, size=20, num_classes=3), {out_dir!r}, image_size=16,
                      batch_size=3, records_per_shard=4, tokenizer_id="patch", log_every_s=0)
print("ok")
"""


def test_extract_codes_with_an_nnx_tokenizer_on_8_devices(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SHARDED_EXTRACT.format(root=root, tests=os.path.join(root, "tests"), out_dir=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    model = PatchTokenizer(nnx.Rngs(0))
    model.eval()
    source = sources.SyntheticImages(7, size=20, num_classes=3)
    codes = codes_lib.CodesSource(str(tmp_path))
    assert codes.metadata.vocab_size == 16 and codes.metadata.grid_shape == (4, 4) and len(codes) == 7
    for i in range(7):
        image, label = source[i]
        expected = model.encode(views.make_views(image, "ten_crop", 16).astype(np.float32) / 127.5 - 1)
        np.testing.assert_array_equal(codes[i]["codes"], expected)
        assert codes[i]["label"] == label


def test_extract_codes_job_feeds_the_train_loader(tmp_path, monkeypatch):
    import par_jax.tokenizer
    from par_jax.tokenizer import extract as extract_job
    loaded = []
    monkeypatch.setattr(par_jax.tokenizer, "load", lambda path: loaded.append(path) or PatchTokenizer(nnx.Rngs(0)),
                        raising=False)
    monkeypatch.setattr(par_jax.tokenizer, "fingerprint", lambda model: "f00d")
    config = make_config(tmp_path / "codes", image_source="synthetic", synthetic_count=6, image_size=16,
                         views="center", flip_views=True, extract_batch_size=4, records_per_shard=4)
    config.model.grid_shape, config.model.num_classes = (4, 4), 10
    with pytest.raises(ValueError, match="needs --config.data.tokenizer=PATH"):
        extract_job.run(config, str(tmp_path))
    config.data.tokenizer = "/somewhere/tokenizer"
    meta = extract_job.run(config, str(tmp_path))
    assert loaded == ["/somewhere/tokenizer"] and meta.tokenizer == "/somewhere/tokenizer"
    assert meta.extra["tokenizer_fingerprint"] == "f00d"  # decoding checks it (test_tokenizer.py)
    assert meta.count == 6 and meta.num_views == 2 and meta.grid_shape == (4, 4) and len(meta.shards) == 2
    assert pipeline.num_records(config) == 6
    batch = next(iter(pipeline.make_train_loader(config, global_batch_size=4)))
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].max() < 16 and batch["label"].max() < 10
    config.model.grid_shape = (2, 2)
    with pytest.raises(ValueError, match=r"into 4x4 codes but the model expects \(2, 2\)"):
        extract_job.run(config, str(tmp_path / "other"))


def test_codes_directories_must_be_local_paths():
    from par_jax.data import codes as codes_lib
    with pytest.raises(ValueError, match="is a URL.*gcsfuse"):
        codes_lib.write_codes("gs://bucket/codes", [], grid_shape=(2, 2), num_views=1, vocab_size=8, num_classes=2)
    with pytest.raises(ValueError, match="is a URL"):
        codes_lib.CodesSource("gs://bucket/codes")
