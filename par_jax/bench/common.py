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
