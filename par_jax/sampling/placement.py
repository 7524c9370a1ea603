"""Where the sampler's arrays live on a device mesh: parameters, prepared weights, the batch and the KV cache.

The sampler runs on a mesh of this process's own devices (with several processes, each samples its own labels; see
par_jax/evaluation/generate.py) with the trainer's axes (`data`, `fsdp`, `tensor`, par_jax/core/mesh.py) and its
logical rules (par_jax/core/sharding.py): every parameter and prepared weight is split as its logical names say
(heads, MLP units and vocabulary over `tensor`, the model dimension over `fsdp` by default), the batch over the
batch axes, and the KV cache over the batch and, where they divide, its heads over the heads' axes. A mesh whose
model axes have size one (the default when no mesh is given) replicates the weights.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
from flax import nnx
from jax.sharding import NamedSharding

from par_jax.core import config_args, sharding
from par_jax.core import mesh as mesh_lib
from par_jax.model import ParTransformer
from par_jax.model.config import ModelConfig


def local_mesh(mesh_config: Optional[Mapping[str, Any]] = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over this process's devices, sized like `config.mesh` (default: all on `data`).

    A size that does not fit this process's device count is a UsageError: the sampler's mesh spans one process's
    devices, so give sizes for one host (or -1 to fill), e.g. --config.mesh.data=1 --config.mesh.tensor=-1.
    """
    devices = jax.local_devices()
    sizes = {"data": -1} if mesh_config is None else {a: int(mesh_config.get(a, 1)) for a in mesh_lib.AXES}
    try:
        return mesh_lib.create_mesh(sizes, devices)
    except ValueError as e:
        raise config_args.UsageError(
            f"the sampler's mesh spans this process's {len(devices)} devices, and config.mesh {sizes} does not fit "
            f"them ({e}); give one host's sizes, e.g. --config.mesh.data=1 --config.mesh.fsdp=1 "
            f"--config.mesh.tensor=-1.") from None


def from_config(config) -> tuple[jax.sharding.Mesh, sharding.Rules]:
    """The sample and evaluate jobs' mesh and rules: `local_mesh(config.mesh)` and `config.mesh.rules`."""
    mesh_config = config.get("mesh")
    return local_mesh(mesh_config), sharding.rules_from_config(mesh_config.get("rules") if mesh_config else None)


def check_mesh(mesh: jax.sharding.Mesh) -> None:
    """A clear error for a mesh the sampler cannot use."""
    if tuple(mesh.axis_names) != mesh_lib.AXES:
        raise ValueError(f"the sampler's mesh must have the axes {mesh_lib.AXES} (par_jax.core.mesh.create_mesh or "
                         f"placement.local_mesh), got {tuple(mesh.axis_names)}.")
    others = sorted({d.process_index for d in mesh.devices.flat} - {jax.process_index()})
    if others:
        raise ValueError(f"the sampler's mesh holds devices of processes {others}; it must span this process's own "
                         f"devices (each process samples its own labels): build it with placement.local_mesh.")


def batch_shards(mesh: jax.sharding.Mesh, rules: sharding.Rules) -> int:
    """How many ways the batch is split (the sizes of its rule's mesh axes)."""
    return math.prod(mesh.shape[a] for a in rules["batch"])


def variable_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> nnx.State:
    """`state` with a NamedSharding in place of every variable's value, from its logical names (`out_sharding`)."""
    def one(path, var):
        shape = var.get_value().shape
        names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec = sharding.logical_to_mesh(tuple(names), shape, mesh, rules, jax.tree_util.keystr(path))
        return var.replace(NamedSharding(mesh, spec))
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shards_weights(state: nnx.State, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> bool:
    """Whether the rules split any parameter of `state` over this mesh (else every weight is replicated)."""
    specs = jax.tree.leaves(variable_shardings(state, mesh, rules))
    return any(axis is not None for s in specs for axis in s.spec)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> dict:
    """Pure dict of NamedShardings for a model's parameters (`model.checkpoint.load_params(..., shardings=)`), so
    a large model is restored straight into its shards instead of whole onto one device."""
    abstract = nnx.state(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.to_pure_dict(variable_shardings(abstract, mesh, rules))


def cache_sharding(mesh: jax.sharding.Mesh, rules: sharding.Rules, shape: tuple[int, ...],
                   seq_last: bool) -> NamedSharding:
    """One layer's KV cache, (B, heads, head_dim, S) with seq_last else (B, S, heads, head_dim): the batch over the
    batch axes, heads over the heads' axes where they divide (else replicated)."""
    names = ("batch", "heads", "head_dim", None) if seq_last else ("batch", None, "heads", "head_dim")
    return NamedSharding(mesh, sharding.logical_to_mesh(names, shape, mesh, rules, "KV cache"))
