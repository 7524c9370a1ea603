"""Process start-up: multi-host JAX and keeping TensorFlow (used only for data and CLU writers) off accelerators."""

import os

import jax
from absl import logging


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


def initialize() -> None:
    """Initialise jax.distributed when this process is one of several; a no-op for a single process.

    Cloud TPU pods are detected by JAX itself; elsewhere (GPU clusters, local tests) the coordinator comes from
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or SLURM's variables, which JAX reads).
    """
    _hide_accelerators_from_tensorflow()
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    elif "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1 or "TPU_WORKER_HOSTNAMES" in env:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
