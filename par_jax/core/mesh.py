"""The device mesh: axes `data`, `fsdp` and `tensor`, sized by config (`-1` takes the devices left over).

`data` replicates parameters and splits the batch; `fsdp` splits the batch and shards parameters (and optimizer
state) over their `embed` axis; `tensor` shards heads, MLP hidden units and the vocabulary. Which logical parameter
axis goes to which mesh axis is decided by the rules in `par_jax.core.sharding`, not here.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax

AXES = ("data", "fsdp", "tensor")
# Axes over which the batch is split (activations' leading dimension).
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Resolve sizes for (data, fsdp, tensor), at most one of them -1, to a shape whose product is `num_devices`."""
    if not isinstance(sizes, (list, tuple)):  # a mapping or a ConfigDict (config.mesh)
        sizes = dict(sizes)
        unknown = sorted(set(sizes) - set(AXES) - {"rules"})
        if unknown:
            raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {AXES}.")
        sizes = [int(sizes.get(a, 1)) for a in AXES]
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(AXES):
        raise ValueError(f"mesh needs {len(AXES)} sizes for {AXES}, got {sizes}.")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} must be positive, with at most one -1 (fill).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by "
                             f"{known}, so -1 cannot fill the rest.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are "
                         f"available; set one axis to -1 to fill the rest.")
    return tuple(sizes)


def create_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over all devices (or `devices`) from `config.mesh` (`data`, `fsdp`, `tensor` sizes).

    Axes are Auto: the decoder's ops carry no sharding annotations, so the compiler propagates shardings from the
    parameters and the batch (the MaxText default), and the same model code runs on any mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def num_batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
