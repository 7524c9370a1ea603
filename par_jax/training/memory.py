r"""Per-device memory of the train step, checked before renting hardware.

Two methods, and every report says which one it used:

  compiled  the real train step, lowered and compiled ahead of time for the target's devices: for a Cloud TPU
            topology this works offline on any machine with libtpu installed (`pip install "jax[tpu]"`, no TPU
            needed); XLA's own memory analysis of the compiled program is the answer.
  estimate  from abstract shapes when no compiler for the target is at hand: parameters, AdamW moments, gradients
            (and EMA, and the gradient accumulator) sharded by the mesh rules, plus the activations the backward
            pass keeps, read from JAX's own residuals of the loss at the per-device batch (with the configured
            remat policy), plus one layer's working set and the logits' gradient. Within 15% of the compiled
            figures where both exist (docs/tpu.md); it assumes activations split along the batch axes.

  python -m par_jax.training.memory --config=configs/par.py:size=XL --accelerator=v5p-64 [--method=estimate]
  python -m par_jax.training.memory --config=configs/par.py --table   # docs/tpu.md's table (XL, XXL, 3B)

Compiling for a TPU topology on a machine that is not a TPU VM needs `offline_tpu_env(acc)` in the environment
before the first TPU use (else libtpu probes the GCE metadata server and the TPU driver); the command line sets it
before it touches a device; library callers set it themselves (the library functions never write os.environ).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import math
import os
import re
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from par_jax.model import ModelConfig, ParTransformer, from_config_dict
from par_jax.core import mesh as mesh_lib
from par_jax.core import sharding as sharding_lib

GiB = 2**30


# ----- accelerators -----

@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A slice of devices: `name` as the cloud spells it (v5p-64) or a GPU count (h100-80gb-x16)."""
    name: str
    platform: str              # "tpu" | "gpu"
    num_devices: int           # JAX devices (TPU chips with megacore, or GPUs)
    hbm_bytes: int             # per device
    topology: Optional[str] = None     # jax.experimental.topologies name, e.g. "v5p:2x4x4"
    chip_config: str = "default"


# Per JAX device: v4 and v5p run one device per chip (megacore); v5e and v6e have one TensorCore per chip.
TPU_CHIPS = {  # prefix -> (topology name, cores per chip in the accelerator type name, 3D torus, HBM GiB per chip)
    "v4": ("v4", 2, True, 32),
    "v5p": ("v5p", 2, True, 95),
    "v5litepod": ("v5e", 1, False, 16),
    "v5e": ("v5e", 1, False, 16),
    "v6e": ("v6e", 1, False, 32),
}
GPUS = {"a100-40gb": 40e9, "a100-80gb": 80e9, "h100-80gb": 80e9, "h200": 141e9}


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The standard slice shape for a chip count: v4/v5p grow 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 ...,
    v5e/v6e grow 1x1 -> 1x2 -> 2x2 -> 2x4 -> 4x4 ..."""
    shape = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    while math.prod(shape) < chips:
        i = max(j for j, s in enumerate(shape) if s == min(shape))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise ValueError(f"{chips} chips do not form a standard slice (a power of two, at least 4 for v4/v5p).")
    return tuple(shape)


def accelerator(name: str) -> Accelerator:
    """'v5p-64', 'v4-32', 'v5litepod-16', 'v6e-64', or '<gpu>-x<count>' such as 'h100-80gb-x16'."""
    prefix, _, count = name.rpartition("-")
    if prefix in TPU_CHIPS and count.isdigit():
        topo_name, cores_per_chip, is_3d, hbm = TPU_CHIPS[prefix]
        chips = int(count) // cores_per_chip
        shape = _torus(chips, 3 if is_3d else 2)
        return Accelerator(name, "tpu", chips, hbm * GiB, f"{topo_name}:{'x'.join(map(str, shape))}",
                           "megacore" if cores_per_chip == 2 else "default")
    gpu, _, n = name.rpartition("-x")
    if gpu in GPUS and n.isdigit():
        return Accelerator(name, "gpu", int(n), int(GPUS[gpu]))
    raise ValueError(f"unknown accelerator {name!r}: use a Cloud TPU type ({', '.join(p + '-N' for p in TPU_CHIPS)}, "
                     f"N = the number in the type's name) or GPU-xCOUNT with GPU in {sorted(GPUS)}.")


# ----- the report -----

@dataclasses.dataclass
class MemoryReport:
    method: str                # "compiled" | "estimate"
    model: str
    accelerator: str
    mesh: dict
    global_batch: int
    device_batch: int          # per device and per micro-step
    remat: str
    hbm: int
    total: int                 # peak bytes per device
    parts: dict                # bytes per device by kind (estimate: params, optimizer, ...; compiled: XLA's split)
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    def line(self) -> str:
        unit, scale = ("GiB", GiB) if self.total >= GiB / 10 else ("MiB", 2**20)
        parts = ", ".join(f"{k} {v / scale:.2f}" for k, v in self.parts.items())
        return (f"{self.model} on {self.accelerator} (mesh {self.mesh}), batch {self.global_batch} "
                f"({self.device_batch}/device), remat={self.remat}: {self.total / scale:.2f} {unit} of "
                f"{self.hbm / GiB:.0f} GiB per device [{self.method}; {unit}: {parts}] -> "
                f"{'fits' if self.fits else 'DOES NOT FIT'}" + (f" ({self.note})" if self.note else ""))


# ----- estimate from abstract shapes -----

def _abstract_model(cfg: ModelConfig):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))
    params = state.filter(nnx.Param)
    return graphdef, params


def shard_factors(cfg: ModelConfig, mesh_shape: Mapping[str, int], rules) -> dict:
    """{parameter path: how many ways its array is split on the mesh}, following the training sharding rules."""
    _, params = _abstract_model(cfg)
    specs = sharding_lib.logical_specs(params)
    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape[a] for a in mesh_lib.AXES), mesh_lib.AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.AXES))
    out = {}
    for (path, x), (_, names) in zip(_flat(nnx.to_pure_dict(params)), _flat(specs, is_leaf=sharding_lib.is_logical_names)):
        spec = sharding_lib.logical_to_mesh(names, x.shape, mesh, rules)
        axes = [a for s in spec if s for a in ((s,) if isinstance(s, str) else s)]
        out[path] = (x.shape, x.dtype, math.prod(mesh_shape[a] for a in axes))
    return out


def _flat(tree, is_leaf=None):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


@functools.lru_cache(maxsize=16)
def loss_residuals(cfg: ModelConfig, batch: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """(shape, bytes per element) of each array the backward pass of the training loss keeps for a batch of `batch` (JAX's residuals
    of the loss under jax.vjp, after the configured remat policy; the parameters themselves excluded)."""
    graphdef, params = _abstract_model(cfg)

    def residuals(params, tokens, labels, key):
        def loss(p):
            return nnx.merge(graphdef, p)(tokens, labels, rng=key, return_logits=False)[0]
        _, vjp = jax.vjp(loss, params)
        inputs = jax.tree.leaves(params) + [tokens, labels, key]
        return [r for r in jax.tree.leaves(vjp) if not any(r is i for i in inputs)]

    tokens = jax.ShapeDtypeStruct((batch, cfg.num_tokens), jnp.int32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    out = jax.eval_shape(residuals, params, tokens, labels, key)
    return tuple((tuple(r.shape), _itemsize(r.dtype)) for r in out)


def _itemsize(dtype) -> int:
    return 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else jnp.dtype(dtype).itemsize  # threefry: 2 x u32


def estimate(cfg: ModelConfig, mesh_shape: Mapping[str, int], rules, *, global_batch: int, grad_accum: int = 1,
             ema: bool = False, hbm: int = 0, accelerator_name: str = "", model_name: str = "") -> MemoryReport:
    """Per-device memory of one train step from abstract shapes (see the module docstring)."""
    mesh_shape = {a: int(mesh_shape[a]) for a in mesh_lib.AXES}
    batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
    if global_batch % (batch_shards * grad_accum):
        raise ValueError(f"global batch {global_batch} does not split into {grad_accum} micro-steps over "
                         f"{batch_shards} batch shards (data x fsdp).")
    device_batch = global_batch // (batch_shards * grad_accum)
    factors = shard_factors(cfg, mesh_shape, rules)
    params = sum(math.prod(s) * jnp.dtype(d).itemsize // f for s, d, f in factors.values())
    by_shape = {s: f for s, _, f in factors.values()}
    tensor_dims = {cfg.num_heads, cfg.mlp_hidden, cfg.vocab_size}

    def device_bytes(shape, itemsize):
        # A residual shaped like a parameter (its compute-dtype copy) is split like it; activations are already
        # per device along the batch, and split by `tensor` along heads, MLP units or vocabulary.
        size = math.prod(shape) * itemsize
        if shape in by_shape:
            return size // by_shape[shape]
        t = mesh_shape["tensor"]
        return size // t if t > 1 and any(d in tensor_dims and d % t == 0 for d in shape) else size

    kept = sum(device_bytes(s, d) for s, d in loss_residuals(cfg, device_batch))
    # On top of what is kept: the backward pass of a layer needs that layer's full set of intermediates at once
    # (recomputed under remat), and the loss head's backward pass the gradient of the float32 logits (the largest
    # array outside the layers).
    unsaved = loss_residuals(cfg.replace(remat="none"), device_batch)
    in_layers = [cfg.scan_layers and s[:1] == (cfg.num_layers,) for s, _ in unsaved]
    stacked = [r for r, inside in zip(unsaved, in_layers) if inside] if cfg.scan_layers else unsaved
    layer = sum(device_bytes(s, d) for s, d in stacked) // cfg.num_layers
    logits = max((device_bytes(s, d) for (s, d), inside in zip(unsaved, in_layers) if not inside), default=0)
    parts = {"params": params, "optimizer": 2 * params, "gradients": params * (2 if grad_accum > 1 else 1)}
    if ema:
        parts["ema"] = params
    parts["activations"] = kept + layer + logits
    return MemoryReport("estimate", model_name or f"{cfg.num_layers}x{cfg.dim}", accelerator_name, mesh_shape,
                        global_batch, device_batch, cfg.remat, hbm, sum(parts.values()), parts)


# ----- compiled ahead of time -----

def tpu_compiler_available() -> bool:
    """libtpu is installed: XLA can compile for any Cloud TPU topology here, with or without a TPU attached."""
    return importlib.util.find_spec("libtpu") is not None


def offline_tpu_env(acc: Accelerator) -> dict[str, str]:
    """The environment libtpu needs to compile for `acc` on a machine that is not a TPU VM (without it libtpu probes
    the GCE metadata server and the TPU driver). Set it before the first TPU use, e.g. in a subprocess's env."""
    return {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": acc.name, "TPU_WORKER_HOSTNAMES": "localhost"}


def target_devices(acc: Accelerator) -> list:
    """Devices to compile for: a TPU topology's (offline, through libtpu), or this machine's own."""
    if acc.platform == "tpu":
        if not tpu_compiler_available():
            raise RuntimeError(f"compiling for {acc.name} needs libtpu (pip install 'jax[tpu]'; no TPU needed); "
                               f"or use --method=estimate.")
        missing = sorted(set(offline_tpu_env(acc)) - set(os.environ))
        if missing:
            raise RuntimeError(f"compiling for {acc.name} offline needs {', '.join(missing)} in the environment "
                               f"before the first TPU use: memory.offline_tpu_env(acc) gives the values "
                               f"(python -m par_jax.training.memory sets them).")
        from jax.experimental import topologies  # noqa: PLC0415
        return list(topologies.get_topology_desc(platform="tpu", topology_name=acc.topology,
                                                 chip_config_name=acc.chip_config).devices)
    devices = [d for d in jax.devices() if d.platform == acc.platform]
    if len(devices) != acc.num_devices:
        raise RuntimeError(f"compiling for {acc.name} needs {acc.num_devices} {acc.platform} devices here; found "
                           f"{len(devices)}. Use --method=estimate.")
    return devices


_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def oom_temporaries(error: Exception) -> Optional[int]:
    """The bytes of temporaries XLA said a program needs, from its out-of-memory compile error (on TPU:
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (60.31G) exceeds
    available HBM (15.75G)."); None for any other error."""
    found = _OOM.search(str(error))
    if "RESOURCE_EXHAUSTED" not in str(error) or not found:
        return None
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " "))


def compiled(config, acc: Accelerator, devices: Optional[list] = None) -> MemoryReport:
    """Compile the real train step (par_jax.training.train) for `acc`'s devices and read XLA's memory analysis.
    A program too big for the device fails to compile; the report then carries XLA's figure for the temporaries."""
    from par_jax.core import optim
    from par_jax.training import train  # noqa: PLC0415 (the train loop pulls in the input pipeline)
    devices = target_devices(acc) if devices is None else devices
    mesh = mesh_lib.create_mesh(config.mesh, devices=devices)
    trainer = train.make_trainer(config, mesh, optim.learning_rate_schedule(config.optimizer, 1000, 10))
    global_batch, accum = int(config.train.batch_size), int(config.train.grad_accum_steps)
    device_batch = global_batch // (mesh_lib.num_batch_shards(mesh) * accum)
    report = functools.partial(MemoryReport, "compiled", str(config.model.get("size", "")), acc.name,
                               dict(mesh.shape), global_batch, device_batch, str(config.model.remat), acc.hbm_bytes)
    # Lowered as the train loop lowers it (every array carries its sharding; no context mesh).
    lowered = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch(global_batch))
    try:
        stats = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        temp = oom_temporaries(e)
        if temp is None:
            raise
        return report(temp, {"temporaries": temp}, note="does not compile: XLA ran out of device memory")
    parts = {"arguments": stats.argument_size_in_bytes,
             "outputs": stats.output_size_in_bytes - stats.alias_size_in_bytes,  # donated state is reused
             "temporaries": stats.temp_size_in_bytes, "code": stats.generated_code_size_in_bytes}
    return report(sum(parts.values()), parts)


# ----- from an experiment config -----

def check(config, accelerator_name: str, method: str = "auto") -> MemoryReport:
    """Per-device memory of `config`'s train step on `accelerator_name`, compiled when possible ("auto")."""
    acc = accelerator(accelerator_name)
    if method == "auto":
        method = "compiled" if acc.platform == "tpu" and tpu_compiler_available() else "estimate"
    if method == "compiled":
        return compiled(config, acc)
    if method != "estimate":
        raise ValueError(f"unknown method {method!r}; choose auto, compiled or estimate.")
    cfg = from_config_dict(config.model)
    mesh_shape = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(config.mesh, acc.num_devices)))
    return estimate(cfg, mesh_shape, sharding_lib.rules_from_config(config.mesh.get("rules")),
                    global_batch=int(config.train.batch_size), grad_accum=int(config.train.grad_accum_steps),
                    ema=float(config.optimizer.ema_decay) > 0, hbm=acc.hbm_bytes,
                    accelerator_name=acc.name, model_name=str(config.model.get("size", "")))


# ----- the docs table and the command line -----

# (size, devices): PAR-XL on 16 devices, XXL and 3B on 32 and 64 (LlamaGen trained them on 16 and 32 A100s).
TABLE_ROWS = (("XL", 16), ("XXL", 32), ("XXL", 64), ("3B", 32), ("3B", 64))
# Per-device memory depends on the mesh and batch, not the chip: one compile (for v5p, the largest HBM, so that
# the program compiles) answers for every device with the same count; these columns say where it fits.
TABLE_HBM = (("v5e", 16), ("v4 / v6e", 32), ("A100 / H100 80 GB", 74.5), ("v5p", 95))


def table(make_config, methods=("estimate", "compiled"), remats=("none", "full"), rows=TABLE_ROWS,
          log=print) -> list[dict]:
    """Per-device memory of PAR-XL, XXL and 3B (n=4, 384 px, bfloat16) at their paper batch sizes;
    `make_config(size)` builds the experiment config of a size (the command line: its --config file). Each
    compiled figure records the libtpu version and the date it was compiled with."""
    out = []
    for size, devices in rows:
        for remat in remats:
            config = make_config(size)
            config.model.remat = remat
            row = {"size": size, "devices": devices, "remat": remat}
            for method in methods:
                if method == "compiled" and not tpu_compiler_available():
                    continue
                r = check(config, f"v5p-{2 * devices}", method)
                log(r.line())
                row.update(batch=r.global_batch, device_batch=r.device_batch, mesh=r.mesh)
                row[method] = {"gib": r.total / GiB, "note": r.note, "parts_gib": {k: v / GiB for k, v in r.parts.items()}}
                if method == "compiled":
                    row[method].update(libtpu=libtpu_version(), date=datetime.date.today().isoformat())
            out.append(row)
    return out


def libtpu_version() -> str:
    from importlib import metadata  # noqa: PLC0415
    return metadata.version("libtpu") if tpu_compiler_available() else ""


def parse_rows(names: list[str]) -> tuple[tuple[str, int], ...]:
    """['XXL:32', '3B:64'] -> (('XXL', 32), ('3B', 64)), each one of TABLE_ROWS; [] -> TABLE_ROWS."""
    rows = []
    for name in names:
        size, _, devices = name.partition(":")
        row = (size, int(devices)) if devices.isdigit() else None
        if row not in TABLE_ROWS:
            known = ", ".join(f"{s}:{d}" for s, d in TABLE_ROWS)
            raise ValueError(f"unknown table row {name!r}: name rows as SIZE:DEVICES, from {known}.")
        rows.append(row)
    return tuple(rows) or TABLE_ROWS


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with the rows of the same (size, devices, remat) replaced by `new` ones, in TABLE_ROWS order."""
    def key(r):
        return r["size"], r["devices"], r["remat"]
    merged = {key(r): r for r in old} | {key(r): r for r in new}
    order = {row: i for i, row in enumerate(TABLE_ROWS)}
    return sorted(merged.values(), key=lambda r: (order.get((r["size"], r["devices"]), len(order)), r["remat"] != "none"))


def markdown(rows: list[dict]) -> str:
    hbm = " | ".join(f"{name} ({gib:g} GiB)" for name, gib in TABLE_HBM)
    lines = [f"| model | devices | batch (per device) | mesh (data, fsdp, tensor) | remat | estimate GiB | compiled GiB "
             f"| fits: {hbm} |", "|---" * 7 + "|" + "---|" * len(TABLE_HBM)]
    for r in rows:
        cells = []
        for method in ("estimate", "compiled"):
            m = r.get(method)
            cells.append("-" if m is None else f"{m['gib']:.1f}" + (" (OOM)" if m["note"] else ""))
        need = r.get("compiled", r.get("estimate"))["gib"]
        fits = ["yes" if need <= gib else "no" for _, gib in TABLE_HBM]
        mesh = ", ".join(str(r["mesh"][a]) for a in mesh_lib.AXES)
        lines.append(f"| PAR-{r['size']} | {r['devices']} | {r['batch']} ({r['device_batch']}) | {mesh} | "
                     f"{r['remat']} | {' | '.join(cells)} | {' | '.join(fits)} |")
    return "\n".join(lines)


def define_flags(fv, argv) -> None:
    from absl import flags  # noqa: PLC0415
    from par_jax.core import config_args  # noqa: PLC0415

    config_args.define_config(fv, argv, "Experiment config, e.g. configs/par.py:size=XL,n=4 (with --table: the "
                              "config file whose sizes make the table, e.g. configs/par.py).")
    flags.DEFINE_list("accelerator", ["v5p-64"], "Cloud TPU types (v5p-64, v4-32, v6e-16, ...) or GPU-xN.",
                      flag_values=fv)
    flags.DEFINE_enum("method", "auto", ["auto", "compiled", "estimate"],
                      "auto: compile for TPU topologies when libtpu is installed, else estimate.", flag_values=fv)
    flags.DEFINE_bool("table", False, "Print the XL / XXL / 3B table of docs/tpu.md.", flag_values=fv)
    flags.DEFINE_string("json_out", "", "With --table: also write the rows as JSON here (with --rows: the rows "
                        "computed replace theirs in the file, the others stay).", flag_values=fv)
    flags.DEFINE_list("rows", [], "With --table: only these rows, as SIZE:DEVICES (e.g. XXL:32,3B:64); default all.",
                      flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)


def main(argv=None) -> None:
    import json  # noqa: PLC0415
    from ml_collections.config_flags import config_flags  # noqa: PLC0415
    from par_jax.core import config_args  # noqa: PLC0415

    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    try:
        accelerators = [accelerator(name) for name in f.accelerator]
    except ValueError as e:
        raise config_args.UsageError(f"--accelerator: {e}") from None
    tpus = [a for a in accelerators if a.platform == "tpu"] or [accelerator("v5p-8")]
    if f.method != "estimate" and tpu_compiler_available():  # the command line is the edge: set before TPU use
        for var, value in offline_tpu_env(tpus[0]).items():
            os.environ.setdefault(var, value)
    try:
        table_rows = parse_rows(f.rows)
    except ValueError as e:
        raise config_args.UsageError(f"--rows: {e}") from None
    if f.table:
        file, _, arg = config_flags.get_config_filename(f["config"]).partition(":")
        module = config_args.load_module(file)
        rows = table(lambda size: module.get_config(",".join(filter(None, (arg, f"size={size}")))),
                     methods=("estimate", "compiled") if f.method in ("auto", "compiled") else ("estimate",),
                     rows=table_rows)
        if f.json_out:
            if f.rows and os.path.exists(f.json_out):
                with open(f.json_out) as fh:
                    rows = merge_rows(json.load(fh), rows)
            with open(f.json_out, "w") as fh:
                json.dump(rows, fh, indent=1)
        print(markdown(rows))
        return
    for acc in accelerators:
        print(check(f.config, acc.name, f.method).line())


if __name__ == "__main__":
    from par_jax.core import config_args
    config_args.run(main)
