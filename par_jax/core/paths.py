"""One way to reach a path: every read and write of a workdir or an output goes through `etils.epath`, so local
folders and object stores (`gs://` on a pod) behave the same.

`os.makedirs`, `open` and `os.path.exists` on a workdir path silently treat `gs://bucket/run` as a local folder
named `gs:`; these helpers do not. Local paths are made absolute (orbax refuses relative ones; a relative path means
the working directory's). Writers create missing parent folders.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_remote(path) -> bool:
    """Whether `path` names an object store (`gs://...`, `s3://...`) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
    """`path` as an epath.Path: local paths made absolute, `scheme://` paths kept as they are."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def exists(path) -> bool:
    return as_path(path).exists()


def makedirs(path) -> epath.Path:
    """Create a folder (and its parents) if missing; returns it."""
    path = as_path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parent_made(path) -> epath.Path:
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_bytes(path, data: bytes) -> epath.Path:
    path = _parent_made(path)
    path.write_bytes(data)
    return path


def write_text(path, text: str) -> epath.Path:
    path = _parent_made(path)
    path.write_text(text)
    return path


def write_json(path, obj: Any, *, indent: int | None = 1) -> epath.Path:
    return write_text(path, json.dumps(obj, indent=indent))


def read_bytes(path) -> bytes:
    return as_path(path).read_bytes()


def read_text(path) -> str:
    return as_path(path).read_text()


def read_json(path) -> Any:
    return json.loads(read_text(path))


def open_file(path, mode: str = "rb"):
    """A file object (a context manager) for reading or writing; writing creates the parent folders."""
    path = _parent_made(path) if mode.startswith(("w", "a")) else as_path(path)
    return path.open(mode)


def replace(src, dst) -> epath.Path:
    """Move `src` to `dst`, replacing it (atomic on local filesystems: write to a temporary name, then replace)."""
    dst = as_path(dst)
    as_path(src).replace(dst)
    return dst


def remove(path) -> None:
    """Delete a file or a folder tree if it exists."""
    path = as_path(path)
    if path.is_dir():
        path.rmtree()
    elif path.exists():
        path.unlink()


def check_writable(directory, what: str = "output folder") -> epath.Path:
    """Create `directory` and prove it takes a file, before any expensive work; a clear error naming it if not."""
    directory = as_path(directory)
    probe = directory / ".write_check"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write the {what} {directory}: {e.strerror or e}. Choose a writable location "
                              f"(e.g. another --workdir) or fix its permissions.") from e
    return directory
