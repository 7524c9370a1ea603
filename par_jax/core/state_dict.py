"""State dicts (names -> arrays) in files: reading and writing `.pt`, `.safetensors` and `.npz`.

`.safetensors` needs only the `safetensors` package and `.npz` only NumPy. `.pt`/`.pth`/`.bin`/`.ckpt` files need
PyTorch, an optional extra (`pip install -e ".[torch]"`, pinned to a CPU build); it is imported only when such a file
is read or written. Every array comes back as a NumPy array; bfloat16 tensors are widened to float32 (NumPy has no
bfloat16).

A file that cannot be read raises `StateDictFileError`, whose message starts with the file's path and says what is
wrong: empty, truncated or damaged, not a file of the format its name says, or (a `.pt` file) holding pickled Python
objects besides tensors, which only `trust_pickle=True` loads because unpickling can run code. A damaged file is
never reported as one that needs trust: the structure of a `.pt` file (its zip archive and checksums, its pickle
opcodes) is checked before its failure is blamed on what it holds.
"""

from __future__ import annotations

import argparse
import os
import pickletools
import re
import zipfile
from typing import Any, Mapping, Optional

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
NPZ_SUFFIXES = (".npz",)
# Where training scripts of the PyTorch release (and the usual tools) keep the weights inside a checkpoint file.
WRAPPER_KEYS = ("model", "module", "state_dict")
# Prefixes added by DistributedDataParallel / DeepSpeed ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A file written by torch.save before torch 1.6 (not a zip archive) starts with this pickle of its magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
# After the magic number: pickles of the protocol version, the system info, the object, and the storage keys.
_LEGACY_TORCH_PICKLES = 4
_FETCH_AGAIN = "download, copy or save it again"
_EMPTY = "is empty (0 bytes): the download or copy did not complete"


class StateDictFileError(ValueError):
    """A file that cannot be read as a state dict. `path` is the file, `problem` what is wrong with it."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}")


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


# ----- what is wrong with a .pt file that torch.load could not read -----

def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200].rstrip(".")


def _pickle_problem(data) -> Optional[str]:
    """Why the bytes are not one well-formed pickle (truncated, unknown opcode), or None."""
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception as e:  # noqa: BLE001 (genops raises ValueError, EOFError, struct errors...)
        return _first_line(e)
    return None


def _zip_torch_problem(path: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [i for i in z.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
            if not pickles:
                return "is a zip archive but not a PyTorch checkpoint (it has no data.pkl)"
            data = z.read(pickles[0])  # checks its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if not zipfile.is_zipfile(path):
            return "is truncated: it starts as a zip archive but its end (the zip directory) is missing"
        return f"is damaged: its zip archive cannot be read ({_first_line(e)})"
    if (problem := _pickle_problem(data)) is not None:
        return f"is damaged: the pickle inside its zip archive is malformed ({problem})"
    return None


def _legacy_torch_problem(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
        if head != _LEGACY_TORCH_MAGIC:
            if _LEGACY_TORCH_MAGIC.startswith(head):
                return f"is truncated: it ends after {len(head)} bytes"
            return (f"is not a PyTorch checkpoint, or is damaged: it is neither a zip archive nor a legacy torch.save "
                    f"file (it starts with {head[:8]!r})")
        for _ in range(_LEGACY_TORCH_PICKLES):
            if (problem := _pickle_problem(f)) is not None:
                return f"is truncated or damaged: its pickle is malformed at byte {f.tell()} ({problem})"
    return None


def torch_file_problem(path: str) -> Optional[str]:
    """What makes a `.pt` file unreadable (empty, truncated, damaged, another format), or None if its structure (zip
    archive, checksum and pickle opcodes; for a legacy file its pickles) is sound."""
    if os.path.getsize(path) == 0:
        return _EMPTY
    with open(path, "rb") as f:
        head = f.read(4)
    return _zip_torch_problem(path) if head.startswith(b"PK") else _legacy_torch_problem(path)


def _unsupported_globals(e: BaseException) -> list[str]:
    """The classes or functions that torch's weights-only unpickler refused, from its error message."""
    return sorted(set(re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))))


def _load_torch(path: str, trust_pickle: bool):
    torch = import_torch()
    if (problem := torch_file_problem(path)) is not None:  # cheap: reads the pickle, not the tensors
        raise StateDictFileError(path, f"{problem}; {_FETCH_AGAIN}.")
    with open(path, "rb") as f:
        zip_format = f.read(2) == b"PK"
    try:
        if trust_pickle:
            # Files written by torch < 1.6 (not a zip archive) cannot be memory-mapped.
            return torch.load(path, map_location="cpu", mmap=zip_format, weights_only=False)
        # The release's training checkpoints also pickle their argparse.Namespace of arguments: allow that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", mmap=zip_format, weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises anything from RuntimeError to EOFError)
        refused = [] if trust_pickle else _unsupported_globals(e)
        if refused:
            raise StateDictFileError(
                path, f"holds Python objects besides tensors ({', '.join(refused)}), which are not loaded by default "
                "because unpickling can run arbitrary code. Its pickle is well formed: this is what the file holds, "
                "not damage. If you trust its source, pass "
                "trust_pickle=True (--trust_pickle).") from e
        if isinstance(e, (ImportError, AttributeError)):  # unpickling looked up a class this code base lacks
            raise StateDictFileError(
                path, f"pickles objects of Python code that is not importable here ({_first_line(e)}). Load it where "
                "that code is and save the weights alone: torch.save(model.state_dict(), path).") from e
        if re.search(r"EOF|corrupt|truncat|invalid load key", str(e), re.IGNORECASE):
            raise StateDictFileError(
                path, f"is damaged or truncated: torch.load failed with {type(e).__name__}: {_first_line(e)}; "
                f"{_FETCH_AGAIN}.") from e
        raise StateDictFileError(
            path, f"could not be read by torch.load (torch {torch.__version__}), although its structure is sound "
            f"({type(e).__name__}: {_first_line(e)}).") from e


# ----- .safetensors and .npz -----

def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy  # noqa: PLC0415

    try:
        try:
            return safetensors.numpy.load_file(path)
        except KeyError:
            # safetensors' NumPy API has no bfloat16: read through its JAX API and widen to float32.
            import safetensors.flax  # noqa: PLC0415

            return {k: np.asarray(v.astype(np.float32) if v.dtype.name == "bfloat16" else v)
                    for k, v in safetensors.flax.load_file(path).items()}
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError, ValueError from the header's JSON)
        if isinstance(e, OSError) and not os.path.isfile(path):
            raise
        raise StateDictFileError(path, f"is truncated, damaged or not a .safetensors file ({_first_line(e)}); "
                                       f"{_FETCH_AGAIN}.") from e


def _load_npz(path: str) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # numpy would try it as a pickle, and then advise allow_pickle
        with open(path, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"
        raise StateDictFileError(path, "is a single .npy array, not a .npz archive of named arrays." if npy else
                                 f"is truncated, damaged or not a .npz file (not a readable zip archive); "
                                 f"{_FETCH_AGAIN}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}  # reads (and checks the CRC-32 of) every member
    except Exception as e:  # noqa: BLE001 (BadZipFile, EOFError, ValueError, OSError)
        if "allow_pickle" in str(e):
            raise StateDictFileError(path, "holds object (pickled) arrays; only plain numeric arrays are read from "
                                           ".npz files.") from e
        raise StateDictFileError(path, f"is truncated, damaged or not a .npz file ({_first_line(e)}); "
                                       f"{_FETCH_AGAIN}.") from e


def load_state_dict(path, key: Optional[str] = None, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read a state dict (names -> NumPy arrays) from a `.pt`-style, `.safetensors` or `.npz` file.

    key: the entry that holds the weights (e.g. "ema"); default: the file itself if it holds tensors at the top
    level, else "model", "module" or "state_dict". trust_pickle: let a `.pt` file unpickle arbitrary objects (only
    for files you trust). Raises FileNotFoundError, or StateDictFileError naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    lower = path.lower()
    readers = {SAFETENSORS_SUFFIXES: _load_safetensors, NPZ_SUFFIXES: _load_npz,
               TORCH_SUFFIXES: lambda p: _load_torch(p, trust_pickle)}
    reader = next((r for suffixes, r in readers.items() if lower.endswith(suffixes)), None)
    if reader is None:
        raise ValueError(f"cannot tell the format of {path}: expected a name ending in one of "
                         f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES + NPZ_SUFFIXES}.")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise StateDictFileError(path, f"{_EMPTY}; {_FETCH_AGAIN}.")
    return normalize(unwrap_checkpoint(reader(path), key))


def save_state_dict(state_dict: Mapping[str, Any], path) -> None:
    """Write a state dict as `.safetensors`, `.npz` or a `.pt` file of torch tensors (loadable with torch.load)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(as_numpy(v)) for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        import safetensors.numpy  # noqa: PLC0415

        safetensors.numpy.save_file(arrays, path)
    elif lower.endswith(NPZ_SUFFIXES):
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name of another case
            np.savez(f, **arrays)
    elif lower.endswith(TORCH_SUFFIXES):
        torch = import_torch()
        # torch wants writable buffers (arrays read from .safetensors are read-only views).
        torch.save({k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in arrays.items()}, path)
    else:
        raise ValueError(f"cannot tell the format to write from {path}: use a name ending in .safetensors, .npz "
                         "or .pt.")
