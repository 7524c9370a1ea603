"""A decoding step's attention over the KV cache as a CPU kernel (cpu_attention.cc), called through `jax.ffi`.

XLA:CPU runs this attention as batched small matrix products on one thread (~3 GB/s of cache read on the 2-core
Xeon of docs/benchmarks.md, about a quarter of the sampler's time at 16 tokens per step). The kernel spreads the
(row, head) pairs over XLA's intra-op threads; up to 4 queries per step it streams the key rows past score rows held in
L1, with more it puts up to 16 queries in the lanes of one vector, so both products run as whole-vector FMAs on the
cache read in place.

The kernel is compiled on first use with the system's C++ compiler (`CXX`, else g++/c++/clang++) for this machine's
CPU (-march=native) and cached under `$PAR_JAX_CACHE` (default ~/.cache/par_jax) by a hash of the source, the flags,
the compiler, the jaxlib version and the CPU. Without a compiler (or if the build fails) `available()` is False with
the reason in `unavailable_reason()`, and the sampler uses XLA's attention: same results, slower.
Float32 only; the sampler uses it on the CPU backend with one device (backend.Backend.choose), as the
`kernel` of the model's `KVCache` in its (B, heads, head_dim, S) layout.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

TARGET = "par_decode_attention"
_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", "-fno-math-errno"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("PAR_JAX_CACHE", Path.home() / ".cache" / "par_jax")) / "kernels"


def _library_path(cxx: str, source: Path) -> Path:
    import jaxlib
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(_FLAGS).encode(), cxx.encode(), jaxlib.__version__.encode(),
                 _cpu_id().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build(source: Path = _SOURCE) -> Path:
    """Compile a kernel source of this folder (default: this one), or find it already compiled; raises RuntimeError
    saying why it could not. cpu_matmul.py builds its kernel through here too."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++: apt-get install g++)")
    lib = _library_path(cxx, source)
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary file and rename: concurrent processes (pytest -n) never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


@functools.cache
def load_kernel(source: Path, symbol: str, target: str) -> str | None:
    """Build and load `source`, and register its handler `symbol` as the FFI target `target`, once per process;
    returns why it is unavailable, or None."""
    if os.environ.get("PAR_JAX_NO_CPU_KERNELS"):
        return "disabled by PAR_JAX_NO_CPU_KERNELS"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(source)))
    except (RuntimeError, OSError) as e:
        return str(e)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def _load() -> str | None:
    return load_kernel(_SOURCE, "ParDecodeAttention", TARGET)


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(D), masked) v for one sampling step, float32 (the model's `attend` with seq_last).

    q (R, Q, H, D); k, v (R, H, D, S) (the sampler's cache layout); mask (Q, S) bool -> (R, Q, H, D).
    """
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the CPU attention kernel is unavailable: {reason}")
    if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
        raise TypeError(f"the CPU attention kernel takes float32, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(q, k, v, mask.astype(bool))
