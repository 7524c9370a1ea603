"""Multi-host training on one machine: two processes on 127.0.0.1 joined by jax.distributed (CPU, 2 devices each),
running the real entry point `python -m par_jax.main` with the tiny model on a mesh whose FSDP axis spans both
processes (every parameter is split over the two processes).

The run is preempted (SIGTERM to one process: both agree on a step, save it from every process and exit), restarted,
hard-killed (SIGKILL to both) after its next regular checkpoint, and restarted again to the end. Its final
parameters must equal a single process with 4 devices that feeds the same global batches: process 0's batch from
data shard 0 of 2 stacked on process 1's batch from shard 1 (so the two processes read disjoint shards). Only
process 0 writes metrics; every log line names its process.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from par_jax.core import distributed
from par_jax.model import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "tests", "multihost_subprocess.py")
NUM_STEPS, EVERY = 24, 4
FLAGS = [
    "--config.model.grid_shape=(4, 4)", "--config.model.vocab_size=64", "--config.model.num_classes=4",
    "--config.data.synthetic_count=256", "--config.data.read_threads=1", "--config.data.prefetch=4",
    "--config.train.batch_size=8", f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every_steps=2",
    f"--config.train.checkpoint_every_steps={EVERY}", "--config.train.peak_flops=1e12",
    "--config.optimizer.warmup_steps=3", "--config.mesh.data=1", "--config.mesh.fsdp=4",
]
# Floating-point tolerance: the gradient all-reduce sums over processes through gloo, in its own order
# (measured differences: up to 2e-7 on parameters of size ~0.1 after 24 steps).
RTOL, ATOL = 1e-5, 1e-6


def _env(cache_dir, devices, **extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
                JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, cache_dir, logs):
    """Both processes of the job, each with its log file (the test reads logs, never pipes, so nothing blocks)."""
    port, procs = _free_port(), []
    for i in range(2):
        env = _env(cache_dir, 2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        log = open(os.path.join(logs, f"{len(os.listdir(logs))}_process{i}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "par_jax.main", "--config=configs/par.py:runlocal",
                                        f"--workdir={workdir}", *FLAGS], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, timeout=240):
    out = []
    for proc, log in procs:
        proc.wait(timeout=timeout)
        log.close()
        out.append((proc.returncode, open(log.name).read()))
    return out


def _steps(workdir):
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def _wait_for_checkpoint(procs, workdir, step, timeout=240):
    target, deadline = os.path.join(workdir, "checkpoints", str(step)), time.monotonic() + timeout
    while not os.path.isdir(target):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            for p, _ in procs:
                p.kill()
            logs = _wait(procs)
            raise AssertionError(f"the job never saved step {step}:\n" + "\n".join(t[-3000:] for _, t in logs))
        time.sleep(0.02)


SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("env, method", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}, "env"),
    ({**SLURM_STEP, "SLURM_NTASKS": "16"}, "slurm"),
    ({**SLURM_STEP, "SLURM_NTASKS": "1"}, None),           # a one-task step runs alone
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None),  # the batch script itself, outside `srun`
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),      # GKE TPU pods
])
def test_how_a_process_joins_a_job(env, method):
    assert distributed.detect(env) == method


def test_an_incomplete_coordinator_setting_names_what_is_missing():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
        distributed.detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})


def test_log_lines_name_their_process():
    import logging  # noqa: PLC0415
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "step %d done", (5,), None)
    prefix = distributed._ProcessPrefix("[process 3/16] ")
    assert prefix.filter(record) and prefix.filter(record)  # a second handler must not prefix twice
    assert record.getMessage() == "[process 3/16] step 5 done"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Started first, it runs while the multi-process job does."""
    out = tmp_path_factory.mktemp("reference") / "params.npz"
    proc = subprocess.Popen([sys.executable, REFERENCE, "reference", str(out), "2", *FLAGS], cwd=REPO,
                            env=_env(str(tmp_path_factory.mktemp("ref_cache")), 4), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    yield proc, out


@pytest.mark.slow  # three launches of two processes: about a minute on a quiet 2-core machine, more when shared
def test_two_processes_preempted_killed_and_resumed_match_one_process(tmp_path, reference):
    workdir, logs, cache = str(tmp_path / "run"), str(tmp_path / "logs"), str(tmp_path / "cache")
    os.makedirs(logs)

    # 1. Preemption notice to one worker only (SIGTERM to process 1) once the first regular checkpoint exists: JAX's
    #    preemption service tells the other, and both save one agreed step and exit.
    procs = _launch(workdir, cache, logs)
    writers = {procs[0][0].pid}
    _wait_for_checkpoint(procs, workdir, EVERY)
    procs[1][0].send_signal(signal.SIGTERM)
    first = _wait(procs)
    for i, (code, log) in enumerate(first):
        assert code == 0, log[-4000:]
        assert "preempted: saved step" in log, log[-4000:]
        assert f"[process {i}/2] process {i} of 2 (env), 2 local / 4 global devices" in log
    preempted_at = _steps(workdir)[-1]
    assert EVERY <= preempted_at < NUM_STEPS, _steps(workdir)
    assert all(f"preempted: saved step {preempted_at}," in log for _, log in first)

    # 2. A hard kill of both, after the resumed job has written its next regular checkpoint.
    next_save = (preempted_at // EVERY + 1) * EVERY
    procs = _launch(workdir, cache, logs)
    writers.add(procs[0][0].pid)
    _wait_for_checkpoint(procs, workdir, next_save)
    for p, _ in procs:
        p.kill()
    second = _wait(procs)
    assert [code for code, _ in second] == [-signal.SIGKILL] * 2
    assert all(f"resumed from step {preempted_at}" in log for _, log in second)

    # 3. Restart and finish.
    killed_at = _steps(workdir)[-1]
    assert killed_at < NUM_STEPS, "killed too late: the job had already finished"
    procs = _launch(workdir, cache, logs)
    writers.add(procs[0][0].pid)
    third = _wait(procs)
    for code, log in third:
        assert code == 0, log[-4000:]
        assert f"resumed from step {killed_at}" in log, log[-3000:]

    # Only process 0 writes metrics: one TensorBoard file per launch, named with its process id.
    events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    assert {int(re.search(r"\.(\d+)\.\d+\.v2$", f).group(1)) for f in events} == writers, events

    proc, out = reference
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-4000:]
    want = np.load(out)
    got = checkpoint.params_of(checkpoint.load_params(os.path.join(workdir, "checkpoints", str(NUM_STEPS))))
    leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    assert len(leaves) == len([k for k in want if k.startswith("params")])
    for path, x in leaves:
        np.testing.assert_allclose(np.asarray(x), want["params" + jax.tree_util.keystr(path)], rtol=RTOL, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))
