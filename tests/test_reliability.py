"""Runs that never lose work and never mislead (docs/reliability.md), each through the real entry point
(`python -m par_jax.main`, the decoder's train job on configs/par.py:runlocal shrunk to a 4x4 grid, 30 steps, a
checkpoint every 10):

- a checkpoint save that fails (the disk is full) stops the run at once with one short message naming the step, the
  path and the cause, exit status non-zero, no traceback;
- a damaged newest checkpoint is moved aside (not deleted) with a warning naming it, and the rerun resumes from the
  step before it and finishes, ending bit-identical to the undamaged run;
- the temporary folder of a save cut off by SIGKILL is removed by the next run;
- a second run on a workdir in use refuses at once, naming the first run's host and pid, and changes nothing.

The processes share a persistent compilation cache (the train step compiles once for the module). The full disk is a
small tmpfs mounted over WORKDIR/checkpoints (root with mount rights); a user without root gets a read-only folder
instead, which fails a save the same way.
"""

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from par_jax.model import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 30
TINY_FLAGS = [
    "--config.model.grid_shape=(4, 4)", "--config.model.vocab_size=64", "--config.model.num_classes=4",
    "--config.data.synthetic_count=256", "--config.data.read_threads=1", "--config.data.prefetch=4",
    "--config.train.batch_size=8", f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every_steps=5",
    "--config.train.checkpoint_every_steps=10", "--config.optimizer.warmup_steps=5",
    "--config.train.peak_flops=1e11", "--config.train.sample_every_steps=0",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _env(cache_dir):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0", PYTHONPATH=REPO,
                JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2")


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "par_jax.main", "--config=configs/par.py:runlocal", f"--workdir={workdir}",
            *TINY_FLAGS, *extra]


def _run(cmd, cache_dir, timeout=300):
    return subprocess.run(cmd, cwd=REPO, env=_env(cache_dir), capture_output=True, text=True, timeout=timeout)


def _tail(text, n=25):
    """The last `n` lines of a process's output, for assertion messages."""
    lines = text.splitlines()
    return f"[{len(lines)} lines, the last {min(n, len(lines))}:]\n" + "\n".join(lines[-n:])


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _params(step_dir):
    return jax.tree.leaves(checkpoint.params_of(checkpoint.load_params(str(step_dir))))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A finished 30-step run with checkpoints 10, 20 and 30 (tests copy it, never change it)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    proc = _run(_cmd(workdir), cache_dir)
    assert proc.returncode == 0, _tail(proc.stderr)
    assert _steps(workdir) == [10, 20, 30]
    return workdir


# ----- a failed save -----

def _disk_bytes(folder):
    """What the files of `folder` take on a tmpfs (whole 4 KiB pages)."""
    return sum(math.ceil(os.path.getsize(os.path.join(root, f)) / 4096) * 4096
               for root, _, files in os.walk(folder) for f in files)


@contextlib.contextmanager
def _full_after(checkpoints, step_dir):
    """`checkpoints` holding a copy of `step_dir` and no room for the next checkpoint; yields a pattern for the
    cause a failed save must name."""
    os.makedirs(checkpoints)
    if os.geteuid() != 0:  # a read-only folder stops anyone but root
        shutil.copytree(step_dir, os.path.join(checkpoints, os.path.basename(step_dir)))
        os.chmod(checkpoints, 0o555)
        try:
            yield r"Permission denied|PERMISSION_DENIED|EACCES"
        finally:
            os.chmod(checkpoints, 0o755)
        return
    size = _disk_bytes(step_dir) * 3 // 2  # one checkpoint and half of another
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(checkpoints)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one failed here ({mount.stderr.strip()})")
    try:
        shutil.copytree(step_dir, os.path.join(checkpoints, os.path.basename(step_dir)))
        yield r"No space left|RESOURCE_EXHAUSTED|ENOSPC"
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=False)


def test_failed_save_stops_the_run_at_once_with_one_message(tmp_path, cache_dir, finished_run):
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(finished_run / "config.json", workdir)
    checkpoints = workdir / "checkpoints"
    with _full_after(checkpoints, finished_run / "checkpoints" / "10") as cause:
        proc = _run(_cmd(workdir), cache_dir)  # resumes from step 10; the save of step 20 finds no room
        assert _steps(workdir) == [10], "the previous checkpoint must be kept"
    assert proc.returncode > 0, (proc.returncode, _tail(proc.stderr))
    lines = proc.stderr.splitlines()
    # The last word is one message naming the failed step, where it was written and why.
    final = lines[-1] if lines else ""
    assert "step 20" in final and str(checkpoints) in final, _tail(proc.stderr)
    assert re.search(cause, final), final
    # At once: the failure is named for step 20, found by the check after every step (asynchronous writes fail
    # while training goes on, so how many steps that is depends on the machine's load), not by the step-30 save.
    # Short and clean: no traceback, no noise from threads dying at interpreter shutdown.
    meta_path_noise, tracebacks = "sys.meta_path is None" in proc.stdout + proc.stderr, proc.stderr.count("Traceback")
    assert not meta_path_noise, _tail(proc.stdout + proc.stderr)
    assert tracebacks == 0, f"{tracebacks} tracebacks; " + _tail(proc.stderr)
    assert len(lines) < 40, _tail(proc.stderr)


# ----- a damaged checkpoint -----

def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(tmp_path, cache_dir,
                                                                                finished_run):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    newest = workdir / "checkpoints" / str(NUM_STEPS)
    files = [os.path.join(root, f) for root, _, names in os.walk(newest / "params") for f in names]
    victim = max(files, key=os.path.getsize)  # the parameter data
    size = os.path.getsize(victim)
    os.truncate(victim, size // 2)

    proc = _run(_cmd(workdir), cache_dir)
    assert proc.returncode == 0, _tail(proc.stderr)
    warnings = [line for line in proc.stderr.splitlines()
                if f"step {NUM_STEPS}" in line and "damaged" in line and "moved aside" in line]
    assert len(warnings) == 1, _tail(proc.stderr)
    assert "resumed from step 20" in proc.stderr
    # Moved aside, not deleted: the damaged step is kept as it was, under a name that is no step.
    aside = [d for d in os.listdir(workdir / "checkpoints") if d.startswith(f"{NUM_STEPS}.damaged-")]
    assert len(aside) == 1 and aside[0] in warnings[0], (aside, warnings)
    moved = os.path.join(workdir, "checkpoints", aside[0], os.path.relpath(victim, newest))
    assert os.path.getsize(moved) == size // 2
    # The run finished from step 20: its new step 30 is the undamaged run's, bit for bit.
    assert _steps(workdir) == [10, 20, 30]
    for want, got in zip(_params(finished_run / "checkpoints" / str(NUM_STEPS)), _params(newest), strict=True):
        np.testing.assert_array_equal(want, got)


def test_orphaned_temporary_folder_of_a_killed_save_is_removed(tmp_path, cache_dir, finished_run):
    """A SIGKILL during a save (say a preemption save at step 25) leaves `25.orbax-checkpoint-tmp`; the next run on
    the workdir removes it and keeps every finished step."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    orphan = workdir / "checkpoints" / "25.orbax-checkpoint-tmp"
    shutil.copytree(workdir / "checkpoints" / "20", orphan)
    proc = _run(_cmd(workdir), cache_dir)  # nothing left to train: the run only opens its checkpoints
    assert proc.returncode == 0, _tail(proc.stderr)
    assert not orphan.exists(), sorted(os.listdir(workdir / "checkpoints"))
    assert _steps(workdir) == [10, 20, 30]


# ----- two runs on one workdir -----

def test_second_run_on_a_workdir_in_use_refuses_at_once(tmp_path, cache_dir):
    workdir = tmp_path / "shared"
    first = subprocess.Popen(_cmd(workdir, "--config.optimizer.lr=1e-3"), cwd=REPO, env=_env(cache_dir),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started = lambda: (workdir / "LOCK").exists() and (workdir / "config.json").exists()  # noqa: E731
        deadline = time.monotonic() + 240
        while not started() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (workdir / "LOCK").exists(), "the first run never wrote WORKDIR/LOCK"
        assert (workdir / "config.json").exists(), "the first run never wrote its config.json"
        first.send_signal(signal.SIGSTOP)  # keep it holding the workdir, whatever its speed
        config_before = (workdir / "config.json").read_bytes()
        files_before = sorted(os.listdir(workdir))

        second = _run(_cmd(workdir, "--config.optimizer.lr=5e-4"), cache_dir, timeout=120)

        assert second.returncode > 0, _tail(second.stderr)
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr, _tail(second.stderr)
        assert "LOCK" in second.stderr  # how to take over a stale lock
        tracebacks = second.stderr.count("Traceback")
        assert tracebacks == 0, f"{tracebacks} tracebacks; " + _tail(second.stderr)
        compiled = "compiled" in second.stderr
        assert not compiled, "refused only after compiling: " + _tail(second.stderr)  # at once, before any work
        assert (workdir / "config.json").read_bytes() == config_before  # the first run's settings stand
        assert sorted(os.listdir(workdir)) == files_before
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, _tail(stderr)  # the first run is unharmed and finishes
    assert _steps(workdir)[-1] == NUM_STEPS
    assert not (workdir / "LOCK").exists(), "a finished run releases its workdir"
