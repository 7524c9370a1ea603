"""How the sampler runs the model's cached path on this machine: weight layout, attention, KV-cache layout.

The math is the model's (par_jax/model/transformer.py, `ParTransformer.step`); a `Backend` only picks options of it,
measured on a 2-core Xeon (XLA:CPU, size B, docs/benchmarks.md):
- weights prepared once (`prepare`): one buffer per layer (a `scan` over stacked layers slices every matrix out of
  its stack at every step, which XLA:CPU materialises as a copy: 2x the time per step), matrices in the compute
  dtype as `ColumnBlocks` of `block_cols` columns on CPU (1.4-2.5x faster 2 to 32-row matmuls), whole (0: the
  parameter's own shape, so a sharded parameter stays sharded alike) on accelerators and on meshes that split weights;
- the KV cache (B, heads, head_dim, S) on CPU (`seq_last`; 2x faster than (B, S, heads, head_dim) there; keys as
  (.., S, head_dim) were 10-35% slower for 4 to 16 queries), the training layout (B, S, heads, head_dim) on
  accelerators;
- attention over the cache by XLA's ops ("xla") or, in float32 on one CPU device, by the C++ kernel of
  cpu_attention.py ("cpu_kernel"): XLA:CPU runs it on one thread at ~3-7 GB/s, the kernel on every core (2-3x faster
  at 4-16 queries; the whole sampler 0.83-0.93x the time).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from par_jax.core import sharding
from par_jax.model import ParTransformer
from par_jax.model.transformer import ColumnBlocks
from par_jax.sampling import cpu_attention, cpu_matmul, placement

ATTENTION = ("xla", "cpu_kernel")   # how a step attends over the cache: XLA's ops, or cpu_attention.cc
MATMUL = ("xla", "cpu_kernel")      # how a step multiplies by the weights: XLA's dots, or cpu_matmul.cc
CPU_BLOCK_COLS = 256                # fastest of 128/256/512/1024 on XLA:CPU
_KERNEL_MISSING = "it is unavailable: "
_KERNELS = {"attention": cpu_attention, "matmul": cpu_matmul}  # the CPU kernel behind each "cpu_kernel" choice


def _platform() -> str:
    return jax.default_backend()  # one seam: tests run the accelerator choices on the CPU


def _cpu_kernel_unavailable(dtype, num_devices: int, kernel=cpu_attention) -> str | None:
    """Why a CPU kernel (the module cpu_attention or cpu_matmul) cannot run here, or None. The build is tried last
    (only where it would be used)."""
    if _platform() != "cpu":
        return f"it runs on the CPU backend only (this is {_platform()})"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it takes float32 models, this one computes in {jnp.dtype(dtype)}"
    if num_devices != 1:
        return f"it needs one device (the batch is sharded over {num_devices})"
    if not kernel.available():
        return _KERNEL_MISSING + kernel.unavailable_reason()
    return None


def _check(what: str, choice: str, dtype, num_devices: int) -> None:
    """A clear error for an attention or matmul choice (`what`) that cannot run here."""
    options = ATTENTION if what == "attention" else MATMUL
    if choice not in options:
        raise ValueError(f"{what} must be one of {options}, got {choice!r}.")
    reason = _cpu_kernel_unavailable(dtype, num_devices, _KERNELS[what]) if choice == "cpu_kernel" else None
    if reason:
        raise ValueError(f"{what}='cpu_kernel' cannot run here: {reason}; use {what}='xla'.")


def check_attention(attention: str, dtype, num_devices: int) -> None:
    """A clear error for an attention choice that cannot run here."""
    _check("attention", attention, dtype, num_devices)


def default_block_cols() -> int:
    """Column-block width for the current backend: CPU_BLOCK_COLS on CPU, whole matrices (0) on accelerators.

    Also for 2-row steps (n=1, batch 1, guided), although the weight matmuls alone run faster on whole matrices
    there: the whole sampler was 4-10% slower with them (paired runs, docs/benchmarks.md).
    """
    return CPU_BLOCK_COLS if _platform() == "cpu" else 0


def check_matmul(matmul: str, dtype, num_devices: int) -> None:
    """A clear error for a matmul choice that cannot run here."""
    _check("matmul", matmul, dtype, num_devices)


def _choose(what: str, asked: Optional[str], dtype, num_devices: int) -> tuple[str, str]:
    """(choice, why) for attention or matmul (`what`): `asked` if it can run here (else a clear error), by default
    "cpu_kernel" where that kernel applies and builds, else "xla"; a default is logged once per process (a warning
    where only the missing kernel made it "xla")."""
    if asked is not None:
        _check(what, asked, dtype, num_devices)
        return asked, "asked for"
    reason = _cpu_kernel_unavailable(dtype, num_devices, _KERNELS[what])
    choice = "xla" if reason else "cpu_kernel"
    why = (f"default; cpu_kernel not used: {reason}" if reason
           else "default: CPU backend, float32, one device, kernel built")
    _log_choice(what, choice, why, bool(reason) and reason.startswith(_KERNEL_MISSING))
    return choice, why


@functools.cache
def _log_choice(what: str, choice: str, why: str, warn: bool) -> None:
    (logging.warning if warn else logging.info)("sampler %s: %s (%s)", what, choice, why)


@dataclasses.dataclass(frozen=True)
class Backend:
    """The sampler's options for the model's cached path (hashable: part of a jit static argument).

    attention   one of ATTENTION; attention_why says how it was chosen (the default depends on the machine).
    block_cols  matrices as column blocks of this width; 0 = whole matrices (with matmul="xla").
    seq_last    KV cache stored (B, heads, head_dim, S) instead of (B, S, heads, head_dim).
    matmul      one of MATMUL; "cpu_kernel" packs every matrix once for cpu_matmul.cc (block_cols is then unused);
                matmul_why says how it was chosen.
    """
    attention: str
    block_cols: int
    seq_last: bool
    attention_why: str = ""
    matmul: str = "xla"
    matmul_why: str = ""

    @classmethod
    def choose(cls, dtype, num_devices: int, attention: Optional[str] = None,
               block_cols: Optional[int] = None, matmul: Optional[str] = None) -> "Backend":
        """This machine's backend; attention/block_cols given override the defaults (a clear error if impossible).

        Default attention: "cpu_kernel" where it applies (CPU backend, float32, one device: with several, XLA shards
        the batch and cannot split a custom call) and builds (a C++ compiler), else "xla". The choice and its reason
        are logged once per process (a warning where only the missing kernel made it "xla") and kept in
        `attention_why`. The matmul kernel is chosen the same way (`matmul_why`; not where block_cols is given, a
        layout for XLA's dots): on this project's 2-core CPU the sampler ran in 0.40x / 0.65x the time with it at
        n = 4 / 16 (paired runs), and a compiled sampler's first call no longer builds XLA's dot runtimes
        (docs/benchmarks.md).
        """
        attention, why = _choose("attention", attention, dtype, num_devices)
        if matmul is None and block_cols is not None:  # column blocks are a layout for XLA's dots
            matmul, matmul_why = "xla", "block_cols given: XLA's dots on column blocks"
        else:
            matmul, matmul_why = _choose("matmul", matmul, dtype, num_devices)
        return cls(attention=attention, block_cols=default_block_cols() if block_cols is None else int(block_cols),
                   seq_last=_platform() == "cpu", attention_why=why, matmul=matmul, matmul_why=matmul_why)

    def describe(self) -> dict:
        """What the sampler runs, for logs and benchmark records."""
        return {"attention": self.attention, "attention_why": self.attention_why, "matmul": self.matmul,
                "matmul_why": self.matmul_why, "block_cols": self.block_cols,
                "kv_cache": "(B, heads, head_dim, S)" if self.seq_last else "(B, S, heads, head_dim)"}

    @property
    def _kernel(self):
        return cpu_matmul.PANEL_MATMUL if self.matmul == "cpu_kernel" else None

    def init_cache(self, model: ParTransformer, rows: int, length: int):
        kernel = cpu_attention.attend if self.attention == "cpu_kernel" else None
        return model.init_cache(rows, length, seq_last=self.seq_last, kernel=kernel)

    def prepare(self, model: ParTransformer, mesh: Optional[jax.sharding.Mesh] = None,
                rules: Optional[sharding.Rules] = None) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, state) of the model as the sampler runs it, compiled and run once. About one more copy of the
        matrices, in the compute dtype.

        With a mesh the parameters are placed as their logical names and `rules` say (placement.py) and the prepared
        weights are born split the same way (whole matrices keep the parameter's shape, so its sharding carries over);
        column blocks and kernel-packed matrices are replicated (the Sampler uses them only where the rules split no
        weight).
        """
        graphdef, state = nnx.split(model)
        flat = _flat_model(model.config)
        if mesh is None:
            return nnx.graphdef(flat), _prepare_jit(graphdef, state, block_cols=self.block_cols,
                                                     kernel=self._kernel)
        state = jax.device_put(state, placement.variable_shardings(state, mesh, rules))
        out = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if self.block_cols or self._kernel
               else placement.variable_shardings(nnx.state(flat, nnx.Param), mesh, rules))
        prepare = jax.jit(_prepare, static_argnames=("graphdef", "block_cols", "kernel"),
                          out_shardings=out)
        return nnx.graphdef(flat), prepare(graphdef, state, block_cols=self.block_cols, kernel=self._kernel)

    def prepare_abstract(self, cfg) -> tuple[nnx.GraphDef, nnx.State]:
        """What `prepare` gives for a model of `cfg`, as shapes only (no array is made): for compiling the sampler
        ahead of time for devices this machine does not have."""
        graphdef, state = nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))
        prepare = functools.partial(_prepare_jit, graphdef, block_cols=self.block_cols, kernel=self._kernel)
        return nnx.graphdef(_flat_model(cfg)), jax.eval_shape(prepare, state)


def _flat_model(cfg):
    """The abstract model with one buffer per layer (no scan, no remat: this is inference)."""
    return nnx.eval_shape(lambda: ParTransformer(cfg.replace(scan_layers=False, remat="none"), rngs=nnx.Rngs(0)))


def _prepare(graphdef, state, *, block_cols, kernel=None):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if cfg.scan_layers:
        params["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.num_layers)}
    out = nnx.state(_flat_model(cfg), nnx.Param)
    nnx.replace_by_pure_dict(out, params)

    def to_blocks(var):  # every matrix, whichever layer it belongs to
        fan_in_axes = var.get_metadata().get("fan_in_axes")
        if fan_in_axes and (block_cols or kernel):
            var = var.replace(ColumnBlocks.of(var.get_value(), fan_in_axes, cfg.dtype, block_cols, kernel))
        elif fan_in_axes:  # whole: the parameter's own shape (and so its sharding), in the compute dtype
            var = var.replace(var.get_value().astype(cfg.dtype))
        return var
    return jax.tree.map(to_blocks, out, is_leaf=lambda x: isinstance(x, nnx.Variable))


_prepare_jit = jax.jit(_prepare, static_argnames=("graphdef", "block_cols", "kernel"))
