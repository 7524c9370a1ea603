"""Pre-extracted token codes on disk: ArrayRecord shards plus one `metadata.json`, and the sources that read them.

Layout of a codes directory:
  metadata.json                      grid shape, views, vocab, tokenizer, count, class names, the shard list
  codes-PPPPP-KKKKK.array_record     shard K written by process P; sorted names = the image source's order

One record per image (or clip), little-endian bytes:
  b"PARc" | label int32 | codes (num_views, *grid_shape) in `dtype` (uint16 when the vocabulary fits, else int32)
Views follow `par_jax.data.views` (ten_crop: 4 corners + centre, then the same of the flipped image).

Video codes (`grid_shape` (t, h, w): latent frames, rows, columns) hold one view per clip (views="clip", the
source's evaluation temporal crop, no flips); `num_frames` is the clip's frame count, `image_size` its frame size,
`source` the video source spec (`par_jax.data.video.make_video_source`), and `extra["frame_stride"]` the temporal
stride the clips were read with. Image codes have num_frames 0; metadata written before video existed loads as it
always did.

A record that cannot be read, has the wrong length or holds out-of-range codes or labels raises `CorruptRecordError`
naming the file and the record's position in it.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import struct
from typing import Any, Iterable, Sequence

import numpy as np
from array_record.python import array_record_data_source, array_record_module

METADATA_FILE = "metadata.json"
FORMAT = "par_jax.codes"
VERSION = 1
MAGIC = b"PARc"
_HEADER = struct.Struct("<4si")
# group_size 1: every record is its own chunk, so random access reads only that record (what grain needs).
# Token codes barely compress (zstd saves ~4%), so the records are stored uncompressed.
WRITER_OPTIONS = "group_size:1,uncompressed"


class CorruptRecordError(ValueError):
    """A codes record is unreadable or does not match its metadata."""


def shard_name(process_index: int, shard_index: int) -> str:
    return f"codes-{process_index:05d}-{shard_index:05d}.array_record"


def grid_text(grid_shape: Sequence[int]) -> str:
    return "x".join(str(int(g)) for g in grid_shape)


def code_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


@dataclasses.dataclass(frozen=True)
class CodesMetadata:
    """What a codes directory holds. `shards` are (file name relative to the directory, record count)."""
    grid_shape: tuple[int, ...]         # (h, w) for images, (t, h, w) for video (latent frames first)
    num_views: int
    vocab_size: int
    num_classes: int
    count: int
    shards: tuple[tuple[str, int], ...]
    tokenizer: str = ""                 # id of the tokenizer that made the codes (its path or name)
    views: str = ""                     # view kind (par_jax.data.views), e.g. "ten_crop"
    eval_view: int = 0                  # the unflipped centre view
    image_size: int = 0                 # the views' side in pixels (video: the frame size)
    source: str = ""                    # the image source's name (video: its spec, e.g. "moving_fashion_mnist")
    class_names: tuple[str, ...] = ()
    dtype: str = ""                     # filled from vocab_size when empty
    num_frames: int = 0                 # video: frames per clip the codes were made from; images: 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "grid_shape", tuple(int(g) for g in self.grid_shape))
        object.__setattr__(self, "shards", tuple((str(f), int(c)) for f, c in self.shards))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not self.dtype:
            object.__setattr__(self, "dtype", code_dtype(self.vocab_size))
        problems = []
        if len(self.grid_shape) not in (2, 3) or min(self.grid_shape) < 1:
            problems.append(f"grid_shape {self.grid_shape} is neither (h, w) for images nor (t, h, w) for video, "
                            f"with every size positive")
        if self.num_frames < 0 or (self.num_frames and len(self.grid_shape) != 3):
            problems.append(f"num_frames {self.num_frames} needs a (t, h, w) grid_shape (0 for image codes)")
        if self.num_views < 1 or self.vocab_size < 2 or self.num_classes < 1:
            problems.append("num_views, vocab_size and num_classes must be positive")
        if self.dtype not in ("uint16", "int32") or np.iinfo(self.dtype).max < self.vocab_size - 1:
            problems.append(f"dtype {self.dtype!r} cannot hold vocab_size {self.vocab_size}")
        if sum(c for _, c in self.shards) != self.count:
            problems.append(f"shard counts sum to {sum(c for _, c in self.shards)}, not count={self.count}")
        if not 0 <= self.eval_view < self.num_views:
            problems.append(f"eval_view {self.eval_view} outside [0, {self.num_views})")
        if problems:
            raise ValueError("invalid codes metadata: " + "; ".join(problems))

    @property
    def tokens_per_view(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def is_video(self) -> bool:
        return len(self.grid_shape) == 3

    @property
    def grid_text(self) -> str:
        """The grid as people write it: "16x16", or "5x8x8" for video."""
        return grid_text(self.grid_shape)

    @property
    def record_nbytes(self) -> int:
        return _HEADER.size + self.num_views * self.tokens_per_view * np.dtype(self.dtype).itemsize

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d = {"format": FORMAT, "version": VERSION, **d}
        d["shards"] = [{"file": f, "count": c} for f, c in self.shards]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "metadata") -> "CodesMetadata":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from e
        if d.pop("format", None) != FORMAT or d.pop("version", None) != VERSION:
            raise ValueError(f"{where} is not {FORMAT} version {VERSION} metadata.")
        d["shards"] = [(s["file"], s["count"]) for s in d.get("shards", [])]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{where} has unknown fields {unknown}.")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e

    def save(self, directory: str) -> None:
        path = os.path.join(directory, METADATA_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(self.to_json())
        os.replace(path + ".tmp", path)  # readers never see a half-written file

    @classmethod
    def load(cls, directory: str) -> "CodesMetadata":
        path = os.path.join(directory, METADATA_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {METADATA_FILE} in {directory!r}: it is not a codes directory. Write one "
                                    f"with `python -m par_jax.main --job=extract_codes --config=... --workdir=...`.")
        with open(path) as f:
            return cls.from_json(f.read(), where=path)


def encode_record(codes: np.ndarray, label: int, dtype: str) -> bytes:
    codes = np.asarray(codes)
    info = np.iinfo(dtype)
    if codes.size and (codes.min() < 0 or codes.max() > info.max):
        raise ValueError(f"codes outside [0, {info.max}] cannot be stored as {dtype}.")
    return _HEADER.pack(MAGIC, int(label)) + codes.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()


def decode_record(raw: bytes, meta: CodesMetadata) -> tuple[np.ndarray, np.int32]:
    """bytes -> (codes (num_views, *grid_shape) read-only view in meta.dtype, label). ValueError says what is
    wrong."""
    if len(raw) != meta.record_nbytes:
        raise ValueError(f"record has {len(raw)} bytes but the metadata ({meta.num_views} views of "
                         f"{meta.grid_text} {meta.dtype}) needs {meta.record_nbytes}")
    magic, label = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError(f"record does not start with {MAGIC!r} (found {magic!r}); not a par_jax codes record")
    if not 0 <= label < meta.num_classes:
        raise ValueError(f"label {label} outside [0, {meta.num_classes})")
    codes = np.frombuffer(raw, np.dtype(meta.dtype).newbyteorder("<"), offset=_HEADER.size)
    if codes.max() >= meta.vocab_size or codes.min() < 0:
        raise ValueError(f"codes in [{codes.min()}, {codes.max()}] outside the vocabulary [0, {meta.vocab_size})")
    return codes.reshape(meta.num_views, *meta.grid_shape), np.int32(label)


class ShardWriter:
    """Writes one shard under a temporary name and renames it when closed, so a finished file is always complete."""

    def __init__(self, path: str, meta_dtype: str):
        self.path, self.count, self._dtype = path, 0, meta_dtype
        self._tmp = path + ".tmp"
        self._writer = array_record_module.ArrayRecordWriter(self._tmp, WRITER_OPTIONS)

    def write(self, codes: np.ndarray, label: int) -> None:
        self._writer.write(encode_record(codes, label, self._dtype))
        self.count += 1

    def close(self) -> int:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.count


def check_local_path(directory: str) -> None:
    """Codes are read and written with local file APIs (ArrayRecord, os): refuse URLs rather than misplace files."""
    if "://" in str(directory):
        raise ValueError(
            f"codes directory {directory!r} is a URL, but codes are read and written through the local filesystem. "
            f"Use a path every host can open: mount the bucket (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) "
            f"and pass --config.data.codes_dir=/mnt/BUCKET/codes/...")


def write_codes(directory: str, records: Iterable[tuple[np.ndarray, int]], *, grid_shape: Sequence[int],
                num_views: int, vocab_size: int, num_classes: int, records_per_shard: int = 10_000,
                **metadata: Any) -> CodesMetadata:
    """Writes (codes (num_views, *grid_shape), label) pairs as a codes directory in one process (e.g. to import
    codes made elsewhere). `metadata` sets the other CodesMetadata fields (tokenizer, views, source, ...)."""
    check_local_path(directory)
    os.makedirs(directory, exist_ok=True)
    dtype = code_dtype(vocab_size)
    shape = (num_views, *grid_shape)
    shards, writer = [], None
    for i, (codes, label) in enumerate(records):
        codes = np.asarray(codes)
        if codes.shape != shape:
            raise ValueError(f"record {i} has codes of shape {codes.shape}, expected {shape}.")
        if codes.size and (codes.min() < 0 or codes.max() >= vocab_size) or not 0 <= label < num_classes:
            raise ValueError(f"record {i}: codes must lie in [0, {vocab_size}) and the label in [0, {num_classes}).")
        if writer is None:
            writer = ShardWriter(os.path.join(directory, shard_name(0, len(shards))), dtype)
        writer.write(codes, label)
        if writer.count == records_per_shard:
            shards.append((os.path.basename(writer.path), writer.close()))
            writer = None
    if writer is not None:
        shards.append((os.path.basename(writer.path), writer.close()))
    meta = CodesMetadata(grid_shape=tuple(grid_shape), num_views=num_views, vocab_size=vocab_size,
                         num_classes=num_classes, count=sum(c for _, c in shards), shards=shards, **metadata)
    meta.save(directory)
    return meta


def count_records(path: str) -> int:
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


class CodesSource:
    """Random-access source of code records (a grain data source): `source[i]` ->
    {"codes": (num_views, *grid_shape), "label": int32}. Checks every shard's record count against the metadata on
    open."""

    def __init__(self, directory: str):
        check_local_path(directory)
        self.directory = directory
        self.metadata = meta = CodesMetadata.load(directory)
        paths = [os.path.join(directory, f) for f, _ in meta.shards]
        for path, (_, expected) in zip(paths, meta.shards):
            if not os.path.exists(path):
                raise FileNotFoundError(f"codes shard {path} listed in {METADATA_FILE} is missing.")
            try:
                found = count_records(path)
            except RuntimeError as e:
                raise CorruptRecordError(f"codes shard {path} cannot be opened: {e}") from e
            if found != expected:
                raise CorruptRecordError(f"codes shard {path} holds {found} records but {METADATA_FILE} says "
                                         f"{expected}; the shard is truncated or from another extraction.")
        self._paths = paths
        self._ends = np.cumsum([c for _, c in meta.shards]).tolist()
        # "[0:N]" tells the ArrayRecord source the counts, so it does not reopen every file to count again.
        self._records = array_record_data_source.ArrayRecordDataSource([f"{p}[0:{c}]" for p, (_, c)
                                                                       in zip(paths, meta.shards)])

    def __len__(self) -> int:
        return self.metadata.count

    def locate(self, index: int) -> tuple[str, int]:
        """Global record index -> (shard path, position in that shard)."""
        shard = bisect.bisect_right(self._ends, index)
        return self._paths[shard], index - (self._ends[shard - 1] if shard else 0)

    def _decode(self, raw: bytes, index: int) -> dict[str, np.ndarray]:
        try:
            codes, label = decode_record(raw, self.metadata)
        except ValueError as e:
            path, position = self.locate(index)
            raise CorruptRecordError(f"{path}, record {position} (global index {index}): {e}.") from e
        return {"codes": codes, "label": label}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"codes record {index} outside [0, {len(self)}).")
        try:
            raw = self._records[index]
        except RuntimeError as e:  # riegeli reports damaged chunks (hash mismatch) and short files this way
            path, position = self.locate(index)
            raise CorruptRecordError(f"{path}, record {position} (global index {index}) cannot be read: {e}. "
                                     f"Re-extract this shard.") from e
        return self._decode(raw, index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        indices = [int(i) for i in indices]
        try:
            raws = self._records.__getitems__(indices)
        except RuntimeError:
            return [self[i] for i in indices]  # find and name the bad record
        return [self._decode(raw, i) for raw, i in zip(raws, indices)]

    def __repr__(self) -> str:
        # Identifies the data, not where it lives (moved codes compare equal).
        m = self.metadata
        return (f"CodesSource(count={m.count}, grid={m.grid_shape}, views={m.num_views}, vocab={m.vocab_size}, "
                f"tokenizer={m.tokenizer!r}, source={m.source!r})")


# Reading this much at start takes seconds: smaller codes directories are checked whole before training starts
# (a damaged record then stops the run before its first step, not hours in); larger ones are checked as they are read,
# or ahead of time with `python -m par_jax.data.verify --codes_dir=DIR`.
VERIFY_AT_START_BYTES = 1 << 30


def shard_bytes(source: CodesSource) -> int:
    return sum(os.path.getsize(p) for p in source._paths)


def verify_source(source: CodesSource) -> None:
    """Reads and checks every record (riegeli's chunk hashes, sizes, labels, code ranges); raises CorruptRecordError
    at the first bad one."""
    for start in range(0, len(source), 1024):
        source.__getitems__(range(start, min(start + 1024, len(source))))


def verify_codes(directory: str) -> CodesMetadata:
    """Reads and checks every record of a codes directory; raises CorruptRecordError at the first bad one."""
    source = CodesSource(directory)
    verify_source(source)
    return source.metadata


class SyntheticCodes:
    """Made-up code records with learnable structure, in the same form as `CodesSource` records.

    Each class has a fixed random token grid; view v of a record is that grid shifted v//2 columns (wrapping) and
    flipped horizontally when v is odd; then every token is replaced by a uniform random one with probability
    `noise`. A model that learns the class grids and reads the view from the first tokens reaches a loss near the
    noise floor, so training on it must show a falling loss.
    """

    def __init__(self, *, count: int, grid_shape: Sequence[int], vocab_size: int, num_classes: int,
                 num_views: int = 2, noise: float = 0.1, seed: int = 0):
        if count < 1 or num_views < 1 or not 0 <= noise <= 1:
            raise ValueError(f"synthetic codes need count >= 1, num_views >= 1 and noise in [0, 1]; got {count}, "
                             f"{num_views}, {noise}.")
        grid_shape = tuple(int(g) for g in grid_shape)
        self.metadata = CodesMetadata(grid_shape=grid_shape, num_views=num_views, vocab_size=vocab_size,
                                      num_classes=num_classes, count=count, shards=(("synthetic", count),),
                                      tokenizer="synthetic", views="synthetic", source=f"synthetic/seed{seed}",
                                      class_names=[f"class_{c}" for c in range(num_classes)])
        self._noise, self._seed = noise, seed
        self._grids = np.random.default_rng(seed).integers(0, vocab_size, (num_classes, *grid_shape), np.int32)

    def __len__(self) -> int:
        return self.metadata.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic record {index} outside [0, {len(self)}).")
        m = self.metadata
        rng = np.random.default_rng((self._seed, index))
        label = int(rng.integers(m.num_classes))
        grid = self._grids[label]
        # The last axis is the columns for image (h, w) and video (t, h, w) grids alike.
        views = np.stack([np.roll(grid, v // 2, axis=-1)[..., ::-1] if v % 2 else np.roll(grid, v // 2, axis=-1)
                          for v in range(m.num_views)])
        replace = rng.random(views.shape) < self._noise
        views = np.where(replace, rng.integers(0, m.vocab_size, views.shape), views).astype(np.int32)
        return {"codes": views, "label": np.int32(label)}

    def __repr__(self) -> str:
        m = self.metadata
        return (f"SyntheticCodes(count={m.count}, grid={m.grid_shape}, views={m.num_views}, vocab={m.vocab_size}, "
                f"classes={m.num_classes}, noise={self._noise}, seed={self._seed})")
