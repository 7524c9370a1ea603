"""Writers against an object store: `gs://` paths served by an in-memory fsspec filesystem (epath's fsspec backend,
the one it uses for gs:// without TensorFlow), so every file a job writes must go through epath to land there. A
file written with `os.makedirs` / `open` would appear as a local folder named `gs:` instead, which the tests also
check is absent."""

import io
import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from par_jax.core import paths


def _fake_gcs_class():
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]
    return FakeGCS


_FAKE_GCS = []  # one class for the session: epath caches the filesystem instance it gets for a scheme


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """gs://... in memory; returns the store {path: file}. The working directory is tmp_path, so a write that
    bypasses epath shows up as tmp_path/gs:."""
    fsspec = pytest.importorskip("fsspec")
    from etils.epath import gpath

    if not _FAKE_GCS:
        _FAKE_GCS.append(_fake_gcs_class())
    fake = _FAKE_GCS[0]
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, fake, clobber=True)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    monkeypatch.chdir(tmp_path)
    fake.store.clear()
    fake.pseudo_dirs[:] = [""]
    yield Store(fake.store)
    assert not os.path.exists(tmp_path / "gs:"), "something wrote gs:// paths to the local disk"
    fake.store.clear()


class Store:
    """The fake bucket's files as {path: bytes} (a view of the in-memory filesystem)."""

    def __init__(self, files):
        self.files = files

    def __getitem__(self, key):
        return self.files[key].getvalue()

    def __iter__(self):
        return iter(self.files)

    def __repr__(self):
        return f"Store({sorted(self.files)})"


def _files(store, prefix):
    return sorted(k.split(prefix, 1)[1] for k in store if prefix in k)


def test_path_helpers_on_an_object_store(bucket):
    root = "gs://bucket/run"
    assert str(paths.as_path(root)) == root and paths.is_remote(root) and not paths.is_remote("rel/dir")
    assert str(paths.as_path("rel/dir")) == os.path.abspath("rel/dir")
    paths.write_json(f"{root}/a/b/record.json", {"x": [1, 2]})
    assert paths.read_json(f"{root}/a/b/record.json") == {"x": [1, 2]} and paths.exists(f"{root}/a/b")
    paths.check_writable(f"{root}/out", "output folder")
    paths.write_bytes(f"{root}/out/.tmp", b"data")
    paths.replace(f"{root}/out/.tmp", f"{root}/out/final")
    assert paths.read_bytes(f"{root}/out/final") == b"data" and not paths.exists(f"{root}/out/.tmp")
    paths.remove(f"{root}/a")
    assert not paths.exists(f"{root}/a/b/record.json")
    assert _files(bucket, "bucket/run/") == ["out/final"]


def test_png_and_npz_writers_on_an_object_store(bucket):
    from par_jax.evaluation import npz
    from par_jax.utils import images

    picture = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    written = images.save_png("gs://bucket/run/pictures/grid.png", picture)
    assert written == "gs://bucket/run/pictures/grid.png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(bucket[written]))), picture)

    data = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    path = "gs://bucket/run/eval/samples.npz"
    with npz.NpzWriter(path, 5, (4, 4, 3)) as writer:
        writer.write(data[:3], [0, 1, 2])
        writer.write(data[3:], [3, 4])
    assert npz.read_header(path) == ((5, 4, 4, 3), np.uint8)
    np.testing.assert_array_equal(np.concatenate(list(npz.iter_batches(path, 2))), data)
    with np.load(io.BytesIO(bucket[path])) as f:
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4]


def _tiny_tokenizer(directory):
    from par_jax import tokenizer as tokenizer_lib
    from par_jax.tokenizer import train as tokenizer_train
    cfg = tokenizer_lib.vq_config("fmnist", base_channels=8, z_channels=8, codebook_size=64, num_groups=4,
                                  num_res_blocks=1, attn_levels=())
    return cfg, str(tokenizer_train.export(directory, tokenizer_lib.VQModel(cfg, rngs=nnx.Rngs(0))))


def _tiny_decoder(grid_shape):
    from par_jax.model import ParTransformer, model_config
    cfg = model_config("tiny", vocab_size=64, num_classes=10, grid_shape=grid_shape, n=4, dtype="float32")
    return ParTransformer(cfg, rngs=nnx.Rngs(1))


def test_sample_job_writes_and_resumes_on_an_object_store(bucket, tmp_path):
    from configs import par
    from par_jax.sampling import job
    vq_cfg, tokenizer = _tiny_tokenizer(tmp_path)
    model = _tiny_decoder(vq_cfg.grid_shape)
    config = par.get_config("runlocal")
    config.model.update(vocab_size=64, num_classes=10, grid_shape=vq_cfg.grid_shape)
    config.sample.update({"num_images": 6, "batch_size": 4, "tokenizer": tokenizer})
    out = job.run(config, "gs://bucket/run", model=model)
    assert out["npz"].startswith("gs://bucket/run/samples/n4_")
    folder = out["npz"].rsplit("/", 1)[0].split("gs://", 1)[1] + "/"
    assert _files(bucket, folder) == ["grid.png", "samples.npz", "settings.json"]
    with np.load(io.BytesIO(bucket["gs://" + folder + "samples.npz"])) as f:
        assert f["arr_0"].shape == (6, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert job.run(config, "gs://bucket/run", model=model)["labels"].tolist() == out["labels"].tolist()


def test_sample_grid_plugin_writes_to_an_object_store(bucket, tmp_path):
    from configs import par
    from par_jax.evaluation import grids
    vq_cfg, tokenizer = _tiny_tokenizer(tmp_path)
    model = _tiny_decoder(vq_cfg.grid_shape)
    config = par.get_config("runlocal")
    config.data.tokenizer = tokenizer
    config.train.sample_num_images = 5

    class Writer:
        images = {}

        def write_images(self, step, images):
            self.images[step] = images

    grid = grids.SampleGrid(config)
    assert grid(model, config, step=12, workdir="gs://bucket/run", writer=Writer()) == {}
    png = bucket["gs://bucket/run/samples/step_00000012.png"]
    picture = np.asarray(Image.open(io.BytesIO(png)))
    assert picture.shape == Writer.images[12]["samples"].shape[1:] and picture.std() > 0
    # Five 32x32 samples in 2 rows of 3, 2-pixel borders.
    assert picture.shape == (2 * 34 + 2, 3 * 34 + 2, 3)


def test_tokenizer_evaluation_writes_to_an_object_store(bucket, tmp_path, monkeypatch):
    from configs import vq
    from par_jax.tokenizer import evaluate, train
    _, tokenizer = _tiny_tokenizer(tmp_path)
    config = vq.get_config("fmnist")
    config.eval.tokenizer = tokenizer
    images = np.zeros((2, 32, 32, 3), np.float32)
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: ({"mse": 0.5, "psnr": 9.0}, images, images))
    metrics = evaluate.run(config, "gs://bucket/vq")
    assert json.loads(bucket["gs://bucket/vq/eval_tokenizer/metrics.json"])["mse"] == metrics["mse"] == 0.5
    assert Image.open(io.BytesIO(bucket["gs://bucket/vq/eval_tokenizer/reconstructions.png"])).size[0] > 0
