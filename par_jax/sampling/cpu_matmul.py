"""A decoding step's weight matmuls as a CPU kernel (cpu_matmul.cc), called through `jax.ffi`.

The sampler multiplies a few rows by every weight matrix at every step. Packed once into panels of 32 columns
(`pack`, at `Backend.prepare`), each matrix is streamed from memory about once per step by the kernel, which runs
register tiles of up to 8 rows x 32 columns on every core: up to 128 rows one panel per task, more in tasks of 128 rows
by 4 panels that keep their rows in L2 (docs/benchmarks.md has the paired timings against XLA:CPU's dots and against
NumPy's BLAS; `python -m par_jax.bench.matmul` measures the kernel alone). Built like the attention kernel (cpu_attention.build: on first use, with the system's C++ compiler,
cached by a hash of the source). Float32 only; `PANEL_MATMUL` is what `Backend` hands to `ColumnBlocks`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from par_jax.sampling import cpu_attention

TARGET = "par_decode_matmul"
PANEL = 32  # columns per panel (cpu_matmul.cc kNr)
_SOURCE = Path(__file__).with_name("cpu_matmul.cc")


def unavailable_reason() -> str | None:
    return cpu_attention.load_kernel(_SOURCE, "ParDecodeMatmul", TARGET)


def available() -> bool:
    return unavailable_reason() is None


def pack(w):
    """(K, N) float32 -> (ceil(N / 32), K, 32) panels, the last one zero-padded."""
    k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, panels * PANEL - n)))
    return w.reshape(k, panels, PANEL).transpose(1, 0, 2)


def matmul(x, panels, cols: int):
    """x (M, K) float32 times the packed matrix: (M, cols), cols the matrix's own width (padding dropped)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU matmul kernel is unavailable: {reason}")
    if x.dtype != jnp.float32 or panels.dtype != jnp.float32:
        raise TypeError(f"the CPU matmul kernel takes float32, got x {x.dtype}, weights {panels.dtype}")
    shape = jax.ShapeDtypeStruct((x.shape[0], panels.shape[0] * PANEL), jnp.float32)
    y = jax.ffi.ffi_call(TARGET, shape)(x, panels)
    return y if y.shape[1] == cols else y[:, :cols]


@dataclasses.dataclass(frozen=True)
class PanelMatmul:
    """The kernel as `ColumnBlocks` uses it: pack a (K, N) matrix once, multiply by it at every step."""

    def pack(self, w):
        return pack(w)

    def matmul(self, x, packed, cols: int):
        return matmul(x, packed, cols)


PANEL_MATMUL = PanelMatmul()
