"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform

import jax


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
