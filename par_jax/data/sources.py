"""Image sources: random-access sequences of `(image uint8 (H, W, 3), label int)` for the code-extraction job.

Every source has `len()`, `source[i]`, `num_classes`, `class_names` and a `name` recorded in the codes' metadata. All
are picklable (grain may hand them to worker processes) and deterministic: `source[i]` is always the same image.

  tfds:NAME      a TensorFlow Datasets dataset, read through its random-access ArrayRecord data source
  folder:PATH    an ImageNet-style folder, one subfolder of images per class (labels = sorted subfolder names)
  fashion_mnist  Fashion-MNIST: tfds when it is prepared (or downloadable), else the Debian package's idx files
  synthetic      made-up class-dependent pictures, for tests and smoke runs
"""

from __future__ import annotations

import gzip
import os
from typing import Protocol, Sequence

import numpy as np
from absl import logging
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


class DataSourceError(ValueError):
    """An image source cannot be opened; the message says how to make it available."""


class ImageSource(Protocol):
    name: str
    num_classes: int
    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


def to_rgb(image) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}.")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}.")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def open_tfds(name: str, split: str, data_dir: str | None, download: bool, item: tuple[str, str], label_key: str, *,
              note: str):
    """(random-access data source, features) of a tfds split in ArrayRecord format, with one clear error when it is
    not prepared or lacks the features. item: (feature key, what it must hold, e.g. "an image"); note: what preparing
    this dataset needs, for the error."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only the tfds sources need it)

    try:
        builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except Exception as e:  # unknown dataset or config
        raise DataSourceError(f"tfds has no dataset {name!r}: {e}") from e
    if download and not builder.is_prepared():
        logging.info("Preparing tfds dataset %s in %s (ArrayRecord).", name, builder.data_dir)
        builder.download_and_prepare()
    try:
        data = builder.as_data_source(split=split)
    except Exception as e:  # tfds raises several types (not prepared, wrong format, missing split)
        raise DataSourceError(
            f"tfds dataset {name!r} (split {split!r}) is not available in {builder.data_dir}: {e}\n"
            f"Prepare it once in ArrayRecord format, e.g. `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR` ({note}), then pass --config.data.tfds_data_dir=DIR; or set "
            f"--config.data.download=True on a machine with network."
        ) from e
    features = builder.info.features
    item_key, what = item
    if item_key not in features or label_key not in features:
        raise DataSourceError(f"tfds dataset {name!r} has features {sorted(features)}; expected {what} under "
                              f"{item_key!r} and a class label under {label_key!r}.")
    return data, features


class TfdsSource:
    """A tfds dataset split through `builder.as_data_source` (ArrayRecord, random access, no TensorFlow graph).

    The dataset must be prepared in ArrayRecord format under `data_dir`, or `download=True` prepares it (needs the
    network; ImageNet also needs its tar files in tfds's manual directory).
    """

    def __init__(self, name: str, split: str = "train", *, data_dir: str | None = None, download: bool = False,
                 image_key: str = "image", label_key: str = "label"):
        self.name = f"tfds:{name}/{split}"
        self._image_key, self._label_key = image_key, label_key
        self._data, features = open_tfds(name, split, data_dir, download, (image_key, "an image"), label_key,
                                         note="ImageNet needs its tar files in DIR/downloads/manual")
        self.num_classes = int(features[label_key].num_classes)
        self.class_names = tuple(features[label_key].names)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        example = self._data[index]
        return to_rgb(example[self._image_key]), int(example[self._label_key])

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {len(self)} images)"


def class_folders(root: str, extensions: tuple[str, ...], kind: str, items: str
                  ) -> tuple[list[str], list[str], list[int]]:
    """(sorted class names, files relative to root, labels) of an ImageNet-style `root/<class>/<files>` folder;
    `kind` and `items` name what it holds in errors ("image", "images")."""
    if not os.path.isdir(root):
        raise DataSourceError(f"{kind} folder {root!r} does not exist.")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataSourceError(f"{kind} folder {root!r} has no class subfolders; expected root/<class>/<{items}>.")
    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(os.path.join(root, name))
                       if e.is_file() and e.name.lower().endswith(extensions))
        files += [os.path.join(name, f) for f in names]
        labels += [label] * len(names)
    if not files:
        raise DataSourceError(f"{kind} folder {root!r} has class subfolders but no {items} with extensions "
                              f"{extensions}.")
    return classes, files, labels


class FolderSource:
    """ImageNet-style folder: `root/<class name>/<image files>`. Labels index the sorted class names."""

    def __init__(self, root: str):
        classes, files, labels = class_folders(root, IMAGE_EXTENSIONS, "image", "images")
        self.root = root
        self.name = f"folder:{os.path.abspath(root)}"
        self.num_classes = len(classes)
        self.class_names = tuple(classes)
        self._files = files
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path = os.path.join(self.root, self._files[index])
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataSourceError(f"cannot decode image {path} (index {index}): {e}") from e
        return image, int(self._labels[index])

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, {len(self)} images, {self.num_classes} classes)"


# --- Fashion-MNIST from idx files --------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Reads an idx file (the MNIST format; gzipped when the name ends in .gz) into a NumPy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataSourceError(f"cannot read idx file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataSourceError(f"{path} is not an idx file (bad magic {data[:4].hex()}).")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4")) if len(data) >= header else ()
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(shape) != ndim or len(data) != expected:
        raise DataSourceError(f"{path}: idx header says shape {shape} ({expected} bytes) but the file has "
                              f"{len(data)} bytes; it is truncated or damaged.")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class IdxSource:
    """Images and labels from a pair of idx files held in memory (Fashion-MNIST: 28x28 grey, 10 classes)."""

    def __init__(self, images_path: str, labels_path: str, *, name: str, class_names: Sequence[str]):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataSourceError(f"{images_path} / {labels_path}: expected images (N, H, W) and labels (N,), got "
                                  f"{images.shape} and {labels.shape}.")
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataSourceError(f"{labels_path}: labels outside [0, {len(class_names)}).")
        self.name = name
        self.num_classes = len(class_names)
        self.class_names = tuple(class_names)
        self._images = images.astype(np.uint8)
        self._labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return to_rgb(self._images[index]), int(self._labels[index])

    def __repr__(self) -> str:
        return f"IdxSource({self.name!r}, {len(self)} images)"


def fashion_mnist_files(split: str = "train", directory: str = DEBIAN_FASHION_MNIST) -> IdxSource:
    """Fashion-MNIST from its original idx files (as installed by Debian's `dataset-fashion-mnist` package)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataSourceError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [os.path.join(directory, f"{prefix}-{kind}-ubyte{ext}") for ext in (".gz", "")]
        found = [p for p in candidates if os.path.exists(p)]
        if not found:
            raise DataSourceError(f"Fashion-MNIST file {candidates[0]} not found.")
        paths.append(found[0])
    return IdxSource(*paths, name=f"fashion_mnist/{split}", class_names=FASHION_MNIST_CLASSES)


def fashion_mnist(split: str = "train", *, data_dir: str | None = None, download: bool = False,
                  directory: str = DEBIAN_FASHION_MNIST) -> ImageSource:
    """Fashion-MNIST from tfds when prepared (or `download` and online), else from the idx files in `directory`."""
    try:
        return TfdsSource("fashion_mnist", split, data_dir=data_dir, download=download)
    except Exception as e:  # noqa: BLE001 (any tfds failure means: use the files)
        tfds_error = e
    try:
        source = fashion_mnist_files(split, directory)
    except DataSourceError as e:
        raise DataSourceError(
            f"Fashion-MNIST is not available.\n  tfds: {tfds_error}\n  idx files: {e}\n"
            f"Get it with `apt-get install dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST}), or copy the four "
            f"*-ubyte.gz files into a folder and pass --config.data.image_source=fashion_mnist:FOLDER, or run "
            f"`tfds build fashion_mnist --file_format=array_record` with network."
        ) from e
    logging.info("Fashion-MNIST from the idx files in %s (tfds unavailable: %s)", directory,
                 str(tfds_error).splitlines()[0][:200])
    return source


# --- Synthetic ---------------------------------------------------------------------------------------------------

class SyntheticImages:
    """Deterministic class-dependent pictures: a per-class colour and stripe frequency plus per-image noise."""

    def __init__(self, count: int = 256, *, size: int = 64, num_classes: int = 10, seed: int = 0):
        if count < 1 or size < 1 or num_classes < 1:
            raise ValueError("synthetic images need count, size and num_classes >= 1.")
        self.name = f"synthetic:{count}x{size}px/{num_classes}classes/seed{seed}"
        self.num_classes, self.class_names = num_classes, tuple(f"class_{c}" for c in range(num_classes))
        self._count, self._size, self._seed = count, size, seed
        rng = np.random.default_rng(seed)
        self._colours = rng.integers(40, 216, (num_classes, 3))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self._count:
            raise IndexError(f"synthetic image index {index} outside [0, {self._count}).")
        label = index % self.num_classes
        rng = np.random.default_rng((self._seed, index))
        y, x = np.mgrid[:self._size, :self._size] / self._size
        stripes = np.sin(2 * np.pi * (label + 1) * (x + y * (index % 3)) + rng.uniform(0, 2 * np.pi))
        image = self._colours[label] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 8, (self._size, self._size, 1))
        return np.clip(image, 0, 255).astype(np.uint8), label

    def __repr__(self) -> str:
        return f"SyntheticImages({self.name!r})"


def make_image_source(spec: str, *, split: str = "train", data_dir: str | None = None, download: bool = False,
                      image_size: int = 64, num_classes: int = 10, count: int = 256, seed: int = 0) -> ImageSource:
    """An image source from a spec string: 'tfds:NAME', 'folder:PATH', 'fashion_mnist[:IDX_DIR]' or 'synthetic'.

    `image_size`, `num_classes`, `count` and `seed` shape the synthetic source only.
    """
    kind, _, arg = spec.partition(":")
    if kind == "tfds" and arg:
        return TfdsSource(arg, split, data_dir=data_dir, download=download)
    if kind == "folder" and arg:
        return FolderSource(arg)
    if kind == "fashion_mnist":
        if arg:  # an explicit folder of idx files
            return fashion_mnist_files(split, arg)
        return fashion_mnist(split, data_dir=data_dir, download=download)
    if kind == "synthetic":
        return SyntheticImages(count, size=image_size, num_classes=num_classes, seed=seed)
    raise ValueError(f"unknown image source {spec!r}; use 'tfds:NAME', 'folder:PATH', 'fashion_mnist' "
                     f"(optionally 'fashion_mnist:DIR' with the idx files) or 'synthetic'.")
