"""The `sample` job (par_jax.sampling.job): outputs from a checkpoint, the output folder checked before any sampling,
batches written as they complete, an interrupted run resumed (finished batches skipped), a rerun with other
settings refused."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from par_jax.model import ParTransformer, model_config
from par_jax.sampling import SampleSettings, job, sample

VOCAB, CLASSES = 64, 10


@pytest.fixture(scope="module")
def model4():
    cfg = model_config("tiny", n=4, grid_shape=(8, 8), vocab_size=VOCAB, num_classes=CLASSES, dtype="float32",
                       init_std=0.2)
    model = ParTransformer(cfg, rngs=nnx.Rngs(0))
    model.output[...] = jax.random.normal(jax.random.key(1), model.output.shape) * 0.2
    return model


def _sample_config(**sample_fields):
    from configs import par
    config = par.get_config("runlocal,size=tiny,n=4,res=128")
    config.model.update(vocab_size=VOCAB, num_classes=CLASSES, grid_shape=(8, 8), init_std=0.2)
    config.sample.update({"num_images": 6, "batch_size": 4, "guidance": 1.5, **sample_fields})
    return config


class _CountingSampler(job.Sampler):
    """The real sampler, counting calls; raises at call number `fail_at` (an interruption)."""
    calls, fail_at = 0, None

    def __call__(self, labels, key):
        type(self).calls += 1
        if type(self).calls == type(self).fail_at:
            raise KeyboardInterrupt("interrupted")
        return super().__call__(labels, key)


@pytest.fixture
def counting(monkeypatch):
    _CountingSampler.calls, _CountingSampler.fail_at = 0, None
    monkeypatch.setattr(job, "Sampler", _CountingSampler)
    return _CountingSampler


def test_sample_job_writes_npz_and_png_from_a_checkpoint(model4, tmp_path):
    from par_jax.model.checkpoint import save_params
    save_params(tmp_path / "ckpt", model4)
    config = _sample_config(checkpoint=os.fspath(tmp_path / "ckpt"), labels="2,3")
    out = job.run(config, os.fspath(tmp_path / "work"))
    with np.load(out["npz"]) as f:
        assert f["tokens"].shape == (6, 8, 8) and f["arr_1"].tolist() == [2, 2, 2, 3, 3, 3]
        tokens = f["tokens"]
    assert os.path.getsize(out["png"]) > 0
    folder = os.path.dirname(out["npz"])
    assert sorted(os.listdir(folder)) == ["grid.png", "samples.npz", "settings.json"]  # batch files removed
    recorded = json.loads(open(os.path.join(folder, "settings.json")).read())
    assert recorded["checkpoint"].startswith(os.fspath(tmp_path / "ckpt")) and recorded["batch_size"] == 4
    assert recorded["sampling"]["guidance"] == 1.5 and recorded["labels"] == "2,3"
    # The same settings through the library give the same first batch (seed -> fold_in(batch index)).
    first = sample(model4, np.array([2, 2, 2, 3]), jax.random.fold_in(jax.random.key(0), 0),
                   SampleSettings(guidance=1.5))
    np.testing.assert_array_equal(tokens[:4].reshape(4, -1), np.asarray(first))


def test_sample_job_rejects_a_model_built_for_another_grid(model4, tmp_path):
    config = _sample_config()
    config.model.grid_shape = (16, 16)
    with pytest.raises(ValueError, match="grid"):
        job.run(config, os.fspath(tmp_path), model=model4)
    config = _sample_config(top_p=2.0)
    with pytest.raises(ValueError, match="top_p"):
        job.run(config, os.fspath(tmp_path), model=model4)


def test_an_unwritable_output_folder_fails_before_sampling(model4, tmp_path, counting):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the workdir should be")
    with pytest.raises(PermissionError, match="cannot write the sample output folder .*not_a_folder/work/samples/n4_.*Not a directory"):
        job.run(_sample_config(), os.fspath(blocker / "work"), model=model4)
    assert counting.calls == 0


def test_an_interrupted_run_resumes_and_skips_the_written_batches(model4, tmp_path, counting, caplog):
    config = _sample_config(num_images=10, batch_size=4)  # 3 batches
    whole = job.run(config, os.fspath(tmp_path / "once"), model=model4)
    assert counting.calls == 3

    counting.calls, counting.fail_at = 0, 3  # dies while drawing the third batch
    workdir = os.fspath(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        job.run(config, workdir, model=model4)
    folder = os.path.join(workdir, "samples", os.path.basename(os.path.dirname(whole["npz"])))
    assert sorted(os.listdir(os.path.join(folder, "batches"))) == ["batch_00000.npz", "batch_00001.npz"]
    assert not os.path.exists(os.path.join(folder, "samples.npz"))

    counting.calls, counting.fail_at = 0, None
    with caplog.at_level("INFO"):
        again = job.run(config, workdir, model=model4)
    assert counting.calls == 1  # only the missing batch
    assert "2 of 3 batches already written, skipping them" in caplog.text
    np.testing.assert_array_equal(again["tokens"], whole["tokens"])  # same samples as one uninterrupted run
    np.testing.assert_array_equal(again["labels"], whole["labels"])

    # A finished job is not sampled again.
    counting.calls = 0
    third = job.run(config, workdir, model=model4)
    assert counting.calls == 0
    np.testing.assert_array_equal(third["tokens"], whole["tokens"])


def test_a_rerun_with_other_settings_is_refused(model4, tmp_path, counting):
    workdir = os.fspath(tmp_path / "work")
    counting.fail_at = 2
    with pytest.raises(KeyboardInterrupt):
        job.run(_sample_config(num_images=10, batch_size=4), workdir, model=model4)
    counting.calls, counting.fail_at = 0, None
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 4 there, 5 now; num_images: 10 there, 12 "
                                         r"now\).*delete that folder"):
        job.run(_sample_config(num_images=12, batch_size=5), workdir, model=model4)
    assert counting.calls == 0


def test_sample_folder_names_every_setting_that_changes_samples():
    from configs import par
    sc = par.get_config("size=tiny,n=4,runlocal").sample
    cfg = model_config("tiny", n=4, grid_shape=(8, 8))
    base = job._run_name(sc, cfg)
    names = {base}
    for field, value in [("guidance", 3.0), ("temperature", 0.5), ("seed", 1), ("top_k", 5), ("top_p", 0.9),
                         ("guidance_schedule", "linear"), ("guidance_stop_step", 10)]:
        changed = sc.copy_and_resolve_references()
        changed[field] = value
        names.add(job._run_name(changed, cfg))
    assert len(names) == 8, names
