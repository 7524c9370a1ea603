"""ADM-compatible sample files: one `.npz` with `arr_0` uint8 (N, H, W, 3) (and `arr_1` int labels), streamed.

The ADM evaluator (and guided-diffusion's sampler that writes these files) reads `arr_0` as NHWC uint8 images;
class-conditional samples carry their labels in `arr_1`. 50,000 images at 256 px are 9.8 GB, so the writer appends
batches straight into the zip member (uncompressed, zip64) instead of building the array in memory, and the reader
yields batches the same way. Files are opened through `par_jax.core.paths` (local or `gs://`). Reference batches may also hold FID statistics (`mu`, `sigma`, `mu_s`, `sigma_s`).
"""

from __future__ import annotations

import zipfile
from typing import Iterator

import numpy as np

from par_jax.core import paths


class NpzWriter:
    """Write `arr_0` (and optionally `arr_1` labels) of known final length batch by batch.

    with NpzWriter(path, num_images, (256, 256, 3)) as w:
        w.write(images_uint8_batch, labels_batch)
    """

    def __init__(self, path: str, num_images: int, image_shape: tuple[int, int, int], *, with_labels: bool = True):
        if len(image_shape) != 3 or image_shape[-1] != 3:
            raise ValueError(f"ADM sample files hold RGB images; image_shape must be (H, W, 3), got {image_shape}.")
        self.path, self.num_images, self.image_shape = path, int(num_images), tuple(int(s) for s in image_shape)
        self.with_labels = with_labels
        self.written = 0
        self._labels = np.zeros((self.num_images,), np.int64)
        self._file = paths.open_file(path, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.num_images, *self.image_shape)}
        np.lib.format.write_array_header_2_0(self._member, header)

    def write(self, images, labels=None) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"expected uint8 images of shape (B, {', '.join(map(str, self.image_shape))}); got "
                             f"{images.dtype} {images.shape}.")
        if self.written + len(images) > self.num_images:
            raise ValueError(f"writing {len(images)} more images would exceed the declared {self.num_images}.")
        if self.with_labels:
            if labels is None or np.shape(labels) != (len(images),):
                raise ValueError(f"this file stores labels: pass ({len(images)},) labels with the images.")
            self._labels[self.written:self.written + len(images)] = labels
        self._member.write(np.ascontiguousarray(images).tobytes())
        self.written += len(images)

    def close(self) -> None:
        if self._zip is None:
            return
        self._member.close()
        complete = self.written == self.num_images
        if complete and self.with_labels:
            with self._zip.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, self._labels)
        self._zip.close()
        self._file.close()
        self._zip = None
        if not complete:
            raise ValueError(f"{self.path} is incomplete: {self.written} of {self.num_images} images were written.")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._zip is not None:  # keep the original error; the partial file is not a valid sample file
            self._zip.close()
            self._file.close()
            self._zip = None


def read_header(path: str, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array in an .npz without reading its data."""
    with paths.open_file(path, "rb") as raw, zipfile.ZipFile(raw) as z, z.open(_member_name(z, path, key)) as f:
        shape, _, dtype = _read_npy_header(f)
    return shape, dtype


def iter_batches(path: str, batch_size: int, key: str = "arr_0", limit: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive batches of the leading axis of `key` in an .npz, read from the zip member without loading it all."""
    with paths.open_file(path, "rb") as raw, zipfile.ZipFile(raw) as z, z.open(_member_name(z, path, key)) as f:
        shape, fortran, dtype = _read_npy_header(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}:{key} is not a C-ordered numeric array; rewrite it with np.savez.")
        total = shape[0] if limit is None else min(shape[0], limit)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, total, batch_size):
            count = min(batch_size, total - start)
            data = f.read(count * row)
            if len(data) != count * row:
                raise ValueError(f"{path}:{key} is truncated (rows {start}..{start + count} missing).")
            yield np.frombuffer(data, dtype).reshape((count, *shape[1:]))


def _member_name(z: zipfile.ZipFile, path: str, key: str) -> str:
    name = f"{key}.npy"
    if name not in z.namelist():
        raise ValueError(f"{path} has no array {key!r} (it holds {sorted(n[:-4] for n in z.namelist())}); ADM "
                         f"sample and reference files keep their images in 'arr_0'.")
    return name


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}.")
