"""Process start-up: joining a multi-process JAX job, naming the process in logs, keeping TensorFlow (used only for
data and CLU writers) off the accelerators.

A process finds its peers in the first of these that applies:
  env    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID are set: by hand,
         in local tests, and on clusters JAX does not know (optionally JAX_LOCAL_DEVICE_IDS, read by JAX).
  slurm  inside an `srun` step of more than one task: JAX reads SLURM's variables and gives each task the GPU
         numbered by its SLURM_LOCALID (launch/slurm.sh starts one task per GPU).
  tpu    a Cloud TPU VM (libtpu installed and TPU chips attached): JAX asks the TPU metadata server for the other
         workers; one process per host, all started by launch/tpu.sh.
Otherwise the process runs alone and nothing is initialised.
"""

from __future__ import annotations

import glob
import importlib.util
import logging as std_logging
import os
from typing import Mapping, Optional

import jax
from absl import logging

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _hide_accelerators_from_tensorflow():
    try:
        import tensorflow as tf  # noqa: PLC0415
    except ImportError:
        return
    tf.config.set_visible_devices([], "GPU")
    try:
        tf.config.set_visible_devices([], "TPU")
    except (ValueError, RuntimeError):
        pass


def _on_cloud_tpu_vm() -> bool:
    # TPU chips appear as /dev/accel* (v2-v4) or VFIO groups (v5e, v5p, v6e); libtpu is what JAX would drive them with.
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def detect(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """How this process joins a multi-process job: "env", "slurm", "tpu", or None (it runs alone)."""
    env = os.environ if env is None else env
    given = [v for v in ENV_VARS if env.get(v)]
    if given:
        missing = [v for v in ENV_VARS if v not in given]
        if missing:
            raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} missing: a multi-process job needs all "
                             f"of {', '.join(ENV_VARS)} (process 0's host:port, the process count, this process's "
                             f"id from 0).")
        return "env"
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")) \
            and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "TPU_WORKER_HOSTNAMES" in env or _on_cloud_tpu_vm():  # the first is set on GKE, the second is a TPU VM
        return "tpu"
    return None


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


class _ProcessPrefix(std_logging.Filter):
    """Starts every log message with the process that wrote it, so merged logs of a pod stay readable."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        if not getattr(record, "process_prefixed", False):
            record.msg = f"{self.prefix}{record.msg}"
            record.process_prefixed = True
        return True


def initialize() -> Optional[str]:
    """Initialise jax.distributed when this process is one of several (see the module docstring); a no-op for a
    single process. Call before anything touches a device. Returns the method used, or None."""
    _hide_accelerators_from_tensorflow()
    method = detect()
    if method and not jax.distributed.is_initialized():
        if method == "env":
            num, index = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
            if not 0 <= index < num:
                raise ValueError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={num}).")
            jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                       num_processes=num, process_id=index)
        else:
            jax.distributed.initialize()
    handler = logging.get_absl_handler()
    if jax.process_count() > 1 and not any(isinstance(f, _ProcessPrefix) for f in handler.filters):
        handler.addFilter(_ProcessPrefix(f"[process {jax.process_index()}/{jax.process_count()}] "))
    logging.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(), jax.process_count(),
                 method or "single process", jax.local_device_count(), jax.device_count())
    return method
