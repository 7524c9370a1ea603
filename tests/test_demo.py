"""The README's first command, shrunk: the demo pipeline end to end in its quick variant (tiny sizes, few steps).

Runs the real entry point in a subprocess, exactly as a newcomer would, then checks what it promises to leave behind
and that a second run reuses the finished phases instead of redoing them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *extra):
    # A relative --workdir, as in the README (main resolves it against the cwd).
    rel = os.path.relpath(workdir, ROOT)
    cmd = [sys.executable, "-m", "par_jax.main", "--config=configs/demo.py:quick", f"--workdir={rel}", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
def test_quick_demo_runs_end_to_end_and_resumes(tmp_path):
    workdir = tmp_path / "demo"
    out = _run(workdir)
    for i, phase in enumerate(("tokenizer", "codes", "par", "samples", "classifier", "eval", "report"), 1):
        assert f"[demo {i}/7] {phase}" in out
    assert "PAR demo finished" in out

    summary = json.loads((workdir / "summary.json").read_text())
    results = summary["results"]
    assert results["codes"]["images"] == 512
    assert results["par"]["step"] == 20 and np.isfinite(results["par"]["loss"])
    assert results["tokenizer"]["mse"] < 0.2  # 30 steps already beat predicting grey (MSE ~0.5 in [-1, 1])
    ev = results["eval"]
    for key in ("fid", "inception_score", "precision", "recall", "class_consistency"):
        assert np.isfinite(ev[key]), key
    assert 0.0 <= ev["class_consistency"] <= 1.0

    grid = np.asarray(Image.open(workdir / results["samples"]["png"]))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0  # real pictures, not a blank canvas
    with np.load(workdir / results["samples"]["npz"]) as f:
        assert f["arr_0"].shape == (20, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert sorted(set(f["arr_1"].tolist())) == list(range(10))  # a row per class
    assert os.path.exists(results["report"]["loss_png"])

    again = _run(workdir)
    assert "tokenizer: done before" in again and "eval: done before" in again
    assert json.loads((workdir / "summary.json").read_text())["wall_seconds_this_run"] < 60
