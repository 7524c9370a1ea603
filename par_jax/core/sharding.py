"""Logical axis names -> mesh axes, and the shardings of everything training holds.

Every parameter of the decoder names its axes (`layers`, `vocab`, `embed`, `classes`, `heads`, `head_dim`, `mlp`,
`norm`, or None). A rule maps each logical name to zero, one or several mesh axes; the rules come from
`config.mesh.rules`, so one model runs data-parallel, FSDP or tensor-parallel by config alone.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from par_jax.core import mesh as mesh_lib

# FSDP over `embed` plus tensor parallelism over heads / MLP / vocabulary (the MaxText layout). Values are mesh
# axes; "" means replicated; several axes are comma-separated ("data,fsdp").
DEFAULT_RULES = {
    "batch": "data,fsdp",
    "layers": "",
    "vocab": "tensor",
    "embed": "fsdp",
    "classes": "",
    "heads": "tensor",
    "head_dim": "",
    "mlp": "tensor",
    "norm": "",
}

Rules = dict[str, tuple[str, ...]]


def rules_from_config(rules: Mapping[str, str] | None = None) -> Rules:
    """Parse `config.mesh.rules` ({logical name: "axis" | "axis1,axis2" | ""}) into {name: (mesh axes...)}."""
    merged = dict(DEFAULT_RULES)
    merged.update(dict(rules or {}))
    out: Rules = {}
    for name, value in merged.items():
        if name not in DEFAULT_RULES:
            raise ValueError(f"unknown logical axis {name!r} in mesh.rules; known: {sorted(DEFAULT_RULES)}.")
        if isinstance(value, (list, tuple)):
            axes = tuple(value)
        else:
            axes = tuple(a.strip() for a in str(value or "").split(",") if a.strip())
        bad = [a for a in axes if a not in mesh_lib.AXES]
        if bad:
            raise ValueError(f"mesh.rules.{name}={value!r} names unknown mesh axes {bad}; "
                             f"mesh axes are {mesh_lib.AXES}.")
        out[name] = axes
    return out


def logical_to_mesh(logical: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules: Rules,
                    what: str = "") -> P:
    """Mesh PartitionSpec for one array with logical axis names `logical`.

    A mesh axis is used at most once per array; a dimension that the chosen mesh axes do not divide is replicated
    (and logged) rather than failing, so small tables (e.g. 1001 classes) stay valid on any mesh.
    """
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and dim % size:
            logging.info("sharding: %s axis %r (size %d) is not divisible by mesh axes %s (%d); replicated.",
                         what, name, dim, axes, size)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def logical_specs(model_state: nnx.State) -> dict:
    """Pure dict of logical-name tuples, one per parameter, from the `out_sharding` metadata of an (abstract) model."""
    def names(v):
        names = v.get_metadata().get("out_sharding")
        return tuple(names) if names is not None else (None,) * v.value.ndim
    return nnx.to_pure_dict(jax.tree.map(names, model_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(abstract_params: Any, specs: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings for a pure-dict params tree given its logical specs (same structure)."""
    def one(path, x, names):
        return NamedSharding(mesh, logical_to_mesh(names, x.shape, mesh, rules, jax.tree_util.keystr(path)))
    return jax.tree_util.tree_map_with_path(one, abstract_params, specs)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes, the rest replicated."""
    axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def is_logical_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)

