"""What every benchmark shares: its experiment config (--config, as every job takes it) and what it records about
the machine it ran on."""

from __future__ import annotations

import os
import platform

import jax
from absl import flags

from par_jax.core import config_args

# The benchmarks run from a checkout; without --config they use its configs/par.py.
CHECKOUT_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "configs")


def define_config(fv: flags.FlagValues, argv, default: str) -> None:
    """--config=FILE.py[:ARGS] (default: `default` in the checkout's configs/, e.g. "par.py:res=256")."""
    config_args.define_config(fv, argv, f"Experiment config, e.g. configs/par.py:size=B (default: the checkout's "
                              f"configs/{default}). --config.FIELD=VALUE overrides apply to every row.")


def arg_keys(arg: str) -> set[str]:
    """The keys named in a config argument string: 'size=B,runlocal' -> {'size', 'runlocal'}."""
    return {item.partition("=")[0].strip() for item in arg.split(",") if item.strip()}


def experiment_spec(fv: flags.FlagValues, default: str) -> tuple[str, str, dict]:
    """(config file, its argument string, the --config.FIELD overrides) of --config, or of the default."""
    from ml_collections.config_flags import config_flags  # noqa: PLC0415

    if fv["config"].value is None:
        file, _, arg = os.path.join(CHECKOUT_CONFIGS, default).partition(":")
        return file, arg, {}
    file, _, arg = config_flags.get_config_filename(fv["config"]).partition(":")
    return file, arg, dict(fv["config"].override_values)


def describe(spec: tuple[str, str, dict]) -> str:
    """The config as a command line would name it (checkout paths relative to the checkout), for benchmark JSON."""
    file, arg, overrides = spec
    root = os.path.dirname(CHECKOUT_CONFIGS)
    if os.path.abspath(file).startswith(root + os.sep):
        file = os.path.relpath(os.path.abspath(file), root)
    return f"{file}:{arg}" if arg else file


def experiment(spec: tuple[str, str, dict], *extra: str):
    """The config of `spec` with more arguments appended (a later key wins), and the overrides applied."""
    file, arg, overrides = spec
    config = config_args.load_config(f"{file}:{','.join(a for a in (arg, *extra) if a)}")
    config.update_from_flattened_dict(overrides)
    return config


def machine() -> dict:
    """CPU model and core count, jax backend and version, device count, load average at the start."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__, "loadavg_start": loadavg()}


# Memory bandwidth per chip in bytes/s (vendor figures), matched in order by case-insensitive substring of
# `device.device_kind` (more specific names first: an "H100 PCIe" is not an SXM H100).
DEVICE_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("TPU v6 lite", 1.64e12), ("TPU v5 lite", 0.819e12), ("TPU v5", 2.765e12), ("TPU v4", 1.2e12),
)


def table_bandwidth(device_kind: str) -> float | None:
    """The vendor memory bandwidth (bytes/s) of a known accelerator; None for CPUs and unknown devices."""
    for key, bandwidth in DEVICE_BANDWIDTH:
        if key.lower() in device_kind.lower():
            return bandwidth
    return None


def loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests so far (Linux /proc/stat, all CPUs), or None elsewhere.

    On a shared VM a run during which this grows was slowed by neighbours; benchmarks record it per timed run.
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
