"""Reading and writing PyTorch-style state dicts (names -> arrays) as `.pt` and `.safetensors` files.

`.safetensors` needs only the `safetensors` package. `.pt`/`.pth`/`.bin` files need PyTorch, an optional extra
(`pip install -e ".[torch]"`, pinned to a CPU build); it is imported only when such a file is read or written.
Every array comes back as a NumPy array; bfloat16 tensors are widened to float32 (NumPy has no bfloat16 and our
parameters are float32 anyway).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Optional

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Where training scripts of the PyTorch release (and the usual tools) keep the weights inside a checkpoint file.
WRAPPER_KEYS = ("model", "module", "state_dict")
# Prefixes added by DistributedDataParallel / DeepSpeed ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def import_torch():
    try:
        import torch  # noqa: PLC0415 (optional dependency, imported only when needed)
    except ImportError as e:
        raise ImportError(
            "Reading or writing .pt files needs PyTorch, which is an optional extra of par_jax. Install the pinned "
            "CPU build with `pip install -e \".[torch]\"` (torch==2.13.0), or convert the file to .safetensors "
            "elsewhere and pass that instead.") from e
    return torch


def _is_torch_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def as_numpy(x) -> np.ndarray:
    """A NumPy array from a NumPy/JAX array or a torch tensor (bfloat16 widened to float32)."""
    if _is_torch_tensor(x):
        torch = import_torch()
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":
        x = x.astype(np.float32)
    return x


def _is_array(x) -> bool:
    return _is_torch_tensor(x) or isinstance(x, np.ndarray) or (hasattr(x, "__array__") and hasattr(x, "shape"))


def unwrap_checkpoint(obj: Any, key: Optional[str] = None) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint object.

    `key` picks an entry explicitly (e.g. "ema"); otherwise a dict of arrays is taken as the state dict itself, and a
    dict without arrays at the top level is searched for "model", "module", "state_dict" in that order.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected the checkpoint to hold a dict of named tensors, found a {type(obj).__name__}. "
                         "If it stores a whole pickled nn.Module, save its state_dict() instead.")
    if key is not None:
        if key not in obj:
            raise KeyError(f"the checkpoint has no entry {key!r}; its top-level keys are {sorted(map(str, obj))}.")
        return obj[key]
    if any(_is_array(v) for v in obj.values()):
        return obj
    for k in WRAPPER_KEYS:
        if k in obj and isinstance(obj[k], Mapping):
            return obj[k]
    raise ValueError(f"found no state dict in the checkpoint: no tensors at the top level and none of the keys "
                     f"{WRAPPER_KEYS}. Top-level keys: {sorted(map(str, obj))}. Pick one with key=... (--key=...).")


def normalize(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """NumPy arrays, with wrapper prefixes shared by every key ("module.", "_orig_mod.") removed."""
    out = {str(k): v for k, v in state_dict.items()}
    for prefix in WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    bad = sorted(k for k, v in out.items() if not _is_array(v))
    if bad:
        raise ValueError(f"state dict entries must be arrays or tensors; these are not: {bad}.")
    return {k: as_numpy(v) for k, v in out.items()}


def _load_torch(path: str, trust_pickle: bool):
    torch = import_torch()

    def load(**kwargs):
        try:
            return torch.load(path, map_location="cpu", mmap=True, **kwargs)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files written by torch < 1.6 (not a zip archive) cannot be memory-mapped.
            return torch.load(path, map_location="cpu", **kwargs)

    if trust_pickle:
        return load(weights_only=False)
    # The release's training checkpoints also pickle their argparse.Namespace of arguments: allow just that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return load(weights_only=True)
        except Exception as e:
            if type(e).__name__ != "UnpicklingError":
                raise
            raise ValueError(
                f"{path} holds Python objects besides tensors, which are not loaded by default because unpickling "
                f"can run arbitrary code. If you trust the file, pass trust_pickle=True (--trust_pickle). "
                f"PyTorch said: {e}") from e


def load_state_dict(path: str, key: Optional[str] = None, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read a state dict (names -> NumPy arrays) from a `.pt`-style or `.safetensors` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        return normalize(unwrap_checkpoint(_load_safetensors(path), key))
    if lower.endswith(TORCH_SUFFIXES):
        return normalize(unwrap_checkpoint(_load_torch(path, trust_pickle), key))
    raise ValueError(f"cannot tell the format of {path}: expected a name ending in one of "
                     f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}.")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy  # noqa: PLC0415

    try:
        return safetensors.numpy.load_file(path)
    except KeyError:
        # safetensors' NumPy API has no bfloat16: read through its JAX API and widen to float32.
        import safetensors.flax  # noqa: PLC0415

        return {k: np.asarray(v.astype(np.float32) if v.dtype.name == "bfloat16" else v)
                for k, v in safetensors.flax.load_file(path).items()}


def save_state_dict(state_dict: Mapping[str, Any], path: str) -> None:
    """Write a state dict as `.safetensors` or as a `.pt` file of torch tensors (loadable with torch.load)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(as_numpy(v)) for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        import safetensors.numpy  # noqa: PLC0415

        safetensors.numpy.save_file(arrays, path)
    elif lower.endswith(TORCH_SUFFIXES):
        torch = import_torch()
        # torch wants writable buffers (arrays read from .safetensors are read-only views).
        torch.save({k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}, path)
    else:
        raise ValueError(f"cannot tell the format to write from {path}: use a name ending in .safetensors or .pt.")
