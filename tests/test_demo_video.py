"""The video demo's quick variant end to end through the real entry point (configs/demo_video.py:quick), and a second
run that reuses the first run's tokenizer, codes and classifier (config.demo.shared_dir) to train another decoder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *extra, check=True):
    cmd = [sys.executable, "-m", "par_jax.main", *extra, f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
def test_quick_video_demo_end_to_end_then_a_second_decoder_on_its_shared_phases(tmp_path):
    first = tmp_path / "video"
    out = _run(first, "--config=configs/demo_video.py:quick").stdout
    for i, phase in enumerate(("tokenizer", "codes", "par", "samples", "classifier", "eval", "report"), 1):
        assert f"[demo {i}/7] {phase}" in out
    results = json.loads((first / "summary.json").read_text())["results"]
    assert results["codes"]["clips"] == 64
    meta = json.loads((first / "codes" / "metadata.json").read_text())
    assert meta["grid_shape"] == [5, 8, 8] and meta["num_frames"] == 17  # 17 frames of 32 px -> 5x8x8 codes
    assert results["par"]["step"] == 6 and np.isfinite(results["par"]["loss"])
    ev = results["eval"]
    for key in ("fd_video_classifier", "precision", "recall", "class_consistency"):
        assert np.isfinite(ev[key]), key
    assert "fid" not in ev and "fvd" not in ev  # the classifier's distance is never reported as FID or FVD

    with np.load(first / results["samples"]["npz"]) as f:
        clips, labels = f["arr_0"], f["arr_1"]
    assert clips.shape == (10, 17, 32, 32, 3) and clips.dtype == np.uint8
    assert sorted(labels.tolist()) == list(range(10))  # a row per class
    gif = Image.open(first / "report" / "samples.gif")
    assert gif.n_frames == 17  # decoded through the causal tokenizer: 5 latent frames -> 17 frames
    strip = np.asarray(Image.open(first / "report" / "samples.png"))
    assert strip.ndim == 3 and strip.std() > 0

    # Another seed's decoder on the first run's tokenizer, codes and classifier: those phases are not run again.
    second = tmp_path / "video_seed1"
    out = _run(second, "--config=configs/demo_video.py:quick,seed=1", f"--config.demo.shared_dir={first}").stdout
    assert "[demo 1/7]" not in out and "[demo 2/7]" not in out and "[demo 5/7]" not in out
    assert "[demo 3/7] par" in out and "[demo 6/7] eval" in out
    again = json.loads((second / "summary.json").read_text())["results"]
    assert again["tokenizer"]["shared_from"] == str(first)
    assert not (second / "tokenizer").exists() and not (second / "codes").exists()
    with np.load(second / again["samples"]["npz"]) as f:
        assert f["arr_0"].shape == clips.shape and not np.array_equal(f["arr_0"], clips)  # another decoder


def test_shared_dir_must_hold_finished_phases(tmp_path):
    (tmp_path / "unfinished" / "tokenizer").mkdir(parents=True)
    proc = _run(tmp_path / "run", "--config=configs/demo_video.py:quick",
                f"--config.demo.shared_dir={tmp_path / 'unfinished'}", check=False)
    assert proc.returncode != 0
    assert "has no finished tokenizer phase" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "par").exists()  # refused before any training


def _fake_run(root, n, seed, fd, loss, **changes):
    """A finished demo run's two records, as the demo writes them (summary.json, par/config.json)."""
    config = {"seed": seed, "arg": f"n={n},seed={seed}", "model": {"n": n, "grid_shape": [5, 8, 8], "dim": 128},
              "train": {"num_steps": 800}, "data": {"codes_dir": "shared/codes"}, **changes}
    run = root / f"n{n}_seed{seed}"
    (run / "par").mkdir(parents=True)
    (run / "par" / "config.json").write_text(json.dumps(config))
    results = {"eval": {"fd_video_classifier": fd, "class_consistency": 0.3, "precision": 0.8, "recall": 0.1},
               "par": {"loss": loss}}
    (run / "summary.json").write_text(json.dumps({"results": results}))
    return str(run)


def test_seed_table_groups_runs_by_n_with_intervals_and_refuses_mixed_protocols(tmp_path):
    from par_jax import demo, phases
    from par_jax.core.config_args import UsageError
    runs = [_fake_run(tmp_path, 4, s, fd, 2.8) for s, fd in ((0, 60.0), (1, 70.0), (2, 65.0))]
    runs.append(_fake_run(tmp_path, 16, 0, 80.0, 3.0))
    text, numbers = demo.seed_table(runs)
    four = numbers["by_n"][4]
    assert four["steps"] == 83 and four["seeds"] == [0, 1, 2] and numbers["by_n"][16]["steps"] == 35
    assert four["fd_video_classifier"] == phases.mean_interval([60.0, 70.0, 65.0])
    assert four["fd_video_classifier"]["half_width"] > 0 and numbers["by_n"][16]["loss"]["half_width"] is None
    assert "| 4 | 83 | 0, 1, 2 | 65 ± 12 |" in text and "| 16 | 35 | 0 | 80 |" in text
    # Another decoder width is another protocol: refused by name, not averaged.
    other = _fake_run(tmp_path / "other", 4, 3, 50.0, 2.5, model={"n": 4, "grid_shape": [5, 8, 8], "dim": 256})
    with pytest.raises(UsageError, match="model.dim: 128 -> 256"):
        demo.seed_table(runs + [other])
    with pytest.raises(UsageError, match="same seed"):
        demo.seed_table(runs + [_fake_run(tmp_path / "again", 4, 1, 61.0, 2.8)])
    with pytest.raises(UsageError, match="not a finished demo run"):
        demo.seed_table(runs + [str(tmp_path / "absent")])


def test_seed_table_pairs_runs_by_seed(tmp_path):
    from par_jax import demo, phases
    # Seeds shift both n alike: the unpaired intervals overlap, the per-seed differences (all +10 +- 1) do not.
    fd = {1: (50.0, 70.0, 60.0), 4: (61.0, 79.0, 70.0), 16: (62.0, 80.0)}
    runs = [_fake_run(tmp_path, n, s, v, 2.0 + n / 10) for n, values in fd.items() for s, v in enumerate(values)]
    text, numbers = demo.seed_table(runs)
    paired = numbers["paired"]
    assert set(paired) == {"4-1", "16-4", "16-1"}
    assert paired["4-1"]["seeds"] == [0, 1, 2] and paired["16-4"]["seeds"] == [0, 1]  # the seeds both n have
    assert paired["4-1"]["fd_video_classifier"] == {**phases.mean_interval([11.0, 9.0, 10.0]),
                                                    "paired_seeds": [0, 1, 2]}
    assert paired["16-1"]["fd_video_classifier"] == {**phases.mean_interval([12.0, 10.0]), "paired_seeds": [0, 1]}
    assert paired["4-1"]["loss"]["mean"] == pytest.approx(0.3)
    low, high = (numbers["by_n"][k]["fd_video_classifier"][e] for k, e in ((4, "low"), (1, "high")))
    assert low < high and paired["4-1"]["fd_video_classifier"]["low"] > 0  # unpaired overlap, paired resolved
    assert "| n = 4 minus n = 1 | 0, 1, 2 | +10 ± 2.5 |" in text
    # One seed in common is no interval: the pair is left out, not shown without one.
    single = [_fake_run(tmp_path / "single", n, 0, 60.0 + n, 2.0) for n in (1, 4)]
    assert demo.seed_table(single)[1]["paired"] == {} and "paired by seed" not in demo.seed_table(single)[0]


def test_seed_table_compares_shared_paths_resolved(tmp_path):
    from par_jax import demo
    codes = tmp_path / "codes"
    codes.mkdir()
    a = _fake_run(tmp_path, 4, 0, 60.0, 2.8, data={"codes_dir": str(codes)})
    b = _fake_run(tmp_path, 4, 1, 62.0, 2.8, data={"codes_dir": os.path.relpath(codes)})  # the same folder
    assert demo.seed_table([a, b])[1]["by_n"][4]["seeds"] == [0, 1]


def test_the_seed_argument_reaches_every_seed_of_the_decoder_run():
    """seed=k must change the decoder's initialisation (the train job reads config.par.seed), not only data order and
    sampling; the shared tokenizer, codes and classifier do not depend on it."""
    from par_jax.core import config_args
    zero = config_args.load_config(os.path.join(ROOT, "configs", "demo_video.py") + ":seed=0")
    two = config_args.load_config(os.path.join(ROOT, "configs", "demo_video.py") + ":seed=2")
    assert two.par.seed == 2 and zero.par.seed == 0
    assert (two.par.data.seed, two.par.sample.seed, two.par.eval.seed) == (2, 2, 2)
    assert two.tokenizer.to_dict() == zero.tokenizer.to_dict()
