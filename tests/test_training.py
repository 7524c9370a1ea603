"""The train loop end to end, each run in a fresh process (tests/training_subprocess.py or `python -m par_jax.main`):

- the same train steps on meshes (8,1,1), (2,4,1), (2,2,2) of 8 simulated devices match one device;
- a run preempted (SIGTERM: it saves and exits), restarted, killed with SIGKILL part-way and restarted again
  from its workdir ends bit-identical to an uninterrupted run (model, optimizer, step and data iterator restored);
- a short run on synthetic codes lowers the loss and writes a sample grid;
- a corrupt batch that makes the loss NaN stops the run with the promised message, keeping a restorable checkpoint.

The processes share a persistent compilation cache, so the train step of the tiny model compiles once for the
single-device runs, and they compile at XLA's lowest backend optimisation level (faster to build, same numerics
within each test).
"""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from par_jax.model import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "training_subprocess.py")
# The tiny test model and a short schedule, as command-line overrides of configs/par.py:runlocal (see TINY in
# training_subprocess.py): 30 steps of batch 8, a checkpoint every 10 steps, logs every 5.
TINY_FLAGS = [
    "--config.model.grid_shape=(4, 4)", "--config.model.vocab_size=64", "--config.model.num_classes=4",
    "--config.data.synthetic_count=256", "--config.data.read_threads=1", "--config.data.prefetch=4",
    "--config.train.batch_size=8", "--config.train.num_steps=30", "--config.train.log_every_steps=5",
    "--config.train.checkpoint_every_steps=10", "--config.optimizer.warmup_steps=5",
    "--config.train.peak_flops=1e11",  # skip measuring the CPU's matmul peak for MFU at every start
]
NUM_STEPS = 30


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _env(cache_dir, devices=1):
    flags = "--xla_backend_optimization_level=0"
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=REPO,
                JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """An (untrained) small VQ tokenizer for 16x16 images = 4x4 codes, saved like a trained one: sample grids need
    one to turn sampled codes into pixels."""
    from par_jax import tokenizer  # noqa: PLC0415
    cfg = tokenizer.vq_config("fmnist", image_size=16, codebook_size=64)  # the model's vocabulary (TINY)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: tokenizer.VQModel(cfg, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(tokenizer.VQModel(cfg, rngs=nnx.Rngs(0)))[1])()
    directory = tmp_path_factory.mktemp("tokenizer") / "export"
    checkpoint.save_params(directory, nnx.merge(graphdef, state))
    return str(directory)


def _train_cmd(workdir, tokenizer_dir):
    """The tiny run, drawing a sample grid of 4 images at its last step."""
    return [sys.executable, "-m", "par_jax.main", "--config=configs/par.py:runlocal", f"--workdir={workdir}",
            *TINY_FLAGS, f"--config.data.tokenizer={tokenizer_dir}", f"--config.train.sample_every_steps={NUM_STEPS}",
            "--config.train.sample_num_images=4"]


def _run(cmd, cache_dir, devices=1, timeout=600):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(cache_dir, devices), capture_output=True, text=True,
                          timeout=timeout)
    return proc


def _final_params(workdir, step=NUM_STEPS):
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    assert os.path.isdir(step_dir), f"no checkpoint for step {step} in {workdir}"
    return checkpoint.params_of(checkpoint.load_params(step_dir))


def _losses(workdir):
    """{step: train/loss} from the run's TensorBoard events."""
    events = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(events[0], size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir, tokenizer_dir):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = _run(_train_cmd(workdir, tokenizer_dir), cache_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_same_steps_on_every_mesh_match_one_device(tmp_path, cache_dir):
    proc = _run([sys.executable, WORKER, "meshes", str(tmp_path)], cache_dir, devices=8)
    assert proc.returncode == 0, proc.stderr[-4000:]
    load = lambda name: dict(np.load(tmp_path / f"{name}.npz"))  # noqa: E731
    # Tolerance: float32 reductions run in a different order on each mesh; after 4 AdamW steps (lr 1e-3) every
    # parameter agrees to 1e-5 absolute (they are ~0.02 in size) and the losses to 1e-5 relative.
    for reference, others in (("1x1x1", ("8x1x1", "2x4x1", "2x2x2")),
                              ("1x1x1_nodropout", ("2x2x2_accum2_nodropout",))):
        ref = load(reference)
        assert int(ref["step"]) == 4
        assert len(set(np.round(ref["losses"], 5))) > 1, "the loss never changed: the steps did not train"
        for name in others:
            got = load(name)
            assert got.keys() == ref.keys()
            np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=name)
            for key in ref:
                if key.startswith(("params", "ema")):
                    np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-5, err_msg=f"{name} {key}")
    # Dropout is on in the first group and off in the second: the per-step keys really change the computation.
    assert not np.allclose(load("1x1x1")["losses"], load("1x1x1_nodropout")["losses"], rtol=1e-6)


def test_short_run_lowers_the_loss_and_writes_a_sample_grid(uninterrupted):
    losses = _losses(uninterrupted)
    assert sorted(losses) == list(range(5, NUM_STEPS + 1, 5))
    first, last = losses[5], losses[NUM_STEPS]
    assert last < first - 0.3, f"loss went from {first:.3f} (step 5) to {last:.3f} (step {NUM_STEPS})"
    png = os.path.join(uninterrupted, "samples", f"step_{NUM_STEPS:08d}.png")
    grid = np.asarray(Image.open(png))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # 2x2 images of 16x16 with 2-pixel borders


def _start_and_wait_for(cmd, workdir, cache_dir, step):
    """Start a training process and return it once it has finished saving checkpoint `step`."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(cache_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    target, deadline = os.path.join(workdir, "checkpoints", str(step)), time.monotonic() + 300
    while not os.path.isdir(target) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not os.path.isdir(target):
        proc.kill()
        raise AssertionError(f"the run never saved step {step}: {proc.communicate()[1][-3000:]}")
    return proc


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_preempted_then_killed_run_resumes_to_identical_parameters(tmp_path, cache_dir, tokenizer_dir,
                                                                   uninterrupted):
    workdir = str(tmp_path / "interrupted")
    cmd = _train_cmd(workdir, tokenizer_dir)
    # 1. Preemption: SIGTERM after step 10 -> the run saves the step it is at and exits cleanly.
    proc = _start_and_wait_for(cmd, workdir, cache_dir, 10)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "preempted: saved step" in stderr
    preempted_at = _steps(workdir)[-1]
    assert 10 < preempted_at < NUM_STEPS, _steps(workdir)
    # 2. A hard kill (no chance to save) once the resumed run has written its next regular checkpoint.
    next_save = (preempted_at // 10 + 1) * 10
    proc = _start_and_wait_for(cmd, workdir, cache_dir, next_save)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    if next_save < NUM_STEPS:
        assert NUM_STEPS not in _steps(workdir), "killed too late to test resuming"
    # 3. Restart from the workdir and finish: parameters bit-identical to the uninterrupted run.
    resumed = _run(cmd, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from step {next_save}" in resumed.stderr or next_save == NUM_STEPS
    want, got = _final_params(uninterrupted), _final_params(workdir)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_nan_loss_stops_with_message_and_keeps_a_restorable_checkpoint(tmp_path, cache_dir):
    workdir = str(tmp_path / "poisoned")
    proc = _run([sys.executable, WORKER, "poisoned", workdir, "13", *TINY_FLAGS], cache_dir)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-4000:]
    message = proc.stdout
    assert "non-finite" in message and "loss" in message and "at step 13" in message
    assert "the last good checkpoint is step 10" in message and "resumes from it" in message
    assert _steps(workdir)[-1] == 10, _steps(workdir)  # nothing at or after the bad step was saved
    model = checkpoint.restore_model(workdir)
    leaves = jax.tree.leaves(checkpoint.params_of(model))
    assert leaves and all(np.isfinite(x).all() for x in leaves)


def test_a_non_finite_update_on_a_save_step_is_not_saved(tmp_path, cache_dir):
    """Loss and gradients of step 20 are finite, its update is not (a one-step learning rate of 1e30): the state that
    would be saved at step 20 is refused, and the error names the parameter norm and the last good checkpoint."""
    workdir = str(tmp_path / "huge_lr")
    proc = _run([sys.executable, WORKER, "huge_lr", workdir, "20", *TINY_FLAGS], cache_dir)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "param_norm" in proc.stdout and "at step 20" in proc.stdout, proc.stdout[-2000:]
    assert "the last good checkpoint is step 10" in proc.stdout
    assert _steps(workdir)[-1] == 10, _steps(workdir)
    leaves = jax.tree.leaves(checkpoint.params_of(checkpoint.restore_model(workdir)))
    assert leaves and all(np.isfinite(x).all() for x in leaves)


def test_sigterm_during_start_up_says_so_and_exits_143(tmp_path, cache_dir):
    """Before the loop takes SIGTERM over (imports, set-up, compilation) no step has run: the process logs one line
    and exits 128 + 15, instead of dying silently with -15."""
    workdir = str(tmp_path / "early")
    cmd = [sys.executable, "-m", "par_jax.main", "--config=configs/par.py:runlocal", f"--workdir={workdir}",
           *TINY_FLAGS]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stderr:  # "job train, workdir ..." is logged before the train job is even imported
        lines.append(line)
        if "job train, workdir" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    err = "".join(lines) + rest
    assert proc.returncode == 143, err[-3000:]
    assert "during start-up, before any training step" in err and "Traceback" not in err, err[-3000:]
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
