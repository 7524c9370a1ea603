"""The frozen feature networks (InceptionV3 for FID, I3D for FVD) filled from their PyTorch weight files.

Both name their variables so that an NNX path is the PyTorch key after one leaf rename (kernel -> weight, mean ->
running_mean, ...); each network gives only its array layout. Reading a file, checking it against the network (every
key and shape, one error that lists them all) and filling an abstractly built network live here once.
"""

from __future__ import annotations

import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax.core import paths

WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)
# NNX leaf name -> PyTorch state-dict leaf name.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_key(path) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join(parents + [_TORCH_LEAF[leaf]])


def torch_shapes(abstract: nnx.Module, torch_shape: Callable) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """((PyTorch key, PyTorch shape), ...) of an abstract network: what its weight file must hold."""
    flat = nnx.to_flat_state(nnx.state(abstract, WEIGHTS))
    return tuple((torch_key(path), tuple(torch_shape(tuple(v.shape)))) for path, v in flat)


def read_state_dict(path, *, not_found: str, convert_hint: str) -> dict[str, np.ndarray]:
    """A flat {key: array} from a PyTorch `.pt`/`.pth`, or a `.npz` / `.safetensors` file with the same keys.

    not_found: the error's advice when the file is missing; convert_hint: what to do without PyTorch installed.
    """
    path = os.fspath(path)
    if not paths.exists(path):
        raise FileNotFoundError(f"{not_found} (looked at {path!r}).")
    if path.endswith(".npz"):
        with paths.open_file(path, "rb") as raw, np.load(raw) as f:
            return {k: f[k] for k in f.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # noqa: PLC0415
        return load_file(path)
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs PyTorch (pip install torch==2.13.0), or {convert_hint}.") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def fill(abstract: nnx.Module, path_or_state, shapes: dict[str, tuple[int, ...]], from_torch_layout: Callable, *,
         read: Callable, what: str) -> nnx.Module:
    """`abstract` (built with nnx.eval_shape) with its weights from a file or an already-read {key: array}.

    BatchNorm `num_batches_tracked` counters are ignored and a DataParallel `module.` prefix is removed. Everything is
    checked before anything is converted: anything missing, unexpected or misshapen is one error naming the keys.
    """
    state = read(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else dict(path_or_state)
    state = {k.removeprefix("module."): np.asarray(v) for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    wrong = sorted(f"{k!r} has shape {tuple(state[k].shape)}, needs {shapes[k]}" for k in set(shapes) & set(state)
                   if tuple(state[k].shape) != shapes[k])
    if missing or extra or wrong:
        def few(keys):
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"
        raise ValueError(f"the weight file does not match {what}: {len(missing)} missing keys {few(missing)}, "
                         f"{len(extra)} unexpected keys {few(extra)}, {len(wrong)} misshapen {few(wrong)}.")
    graphdef, weights, rest = nnx.split(abstract, WEIGHTS, ...)
    flat = nnx.to_flat_state(weights)
    for path, variable in flat:
        variable.set_value(jnp.asarray(from_torch_layout(state[torch_key(path)].astype(np.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
