"""Video sources: random-access sequences of clips `(uint8 (num_frames, frame_size, frame_size, 3), label int)`.

  moving_fashion_mnist  synthetic: a Fashion-MNIST garment of class c bouncing on a black canvas (deterministic)
  moving_synthetic      the same motion with `SyntheticImages` pictures instead of garments (no files needed)
  tfds:ucf101           UCF-101 from TensorFlow Datasets (config ucf101_1_256), ArrayRecord random access
  folder:PATH           PATH/<class name>/<video files>, decoded with imageio (ffmpeg; pillow for GIFs)

Every source has `name`, `num_classes`, `class_names`, `num_frames`, `frame_size`, `len()` and `source[i]`, which
is the fixed evaluation clip of video i. Real videos are resized (short side) and centre-cropped to `frame_size`
frame by frame, then a temporal crop takes `num_frames` frames every `frame_stride` frames:

  evaluation  the crop starting at the first frame (`source[i]`): the same clip whatever the video's length, and the
              first frame, which a causal video tokenizer encodes alone, is the video's own first frame
  training    a random start: `source.clip(i, rng)`, or in a grain pipeline
              `grain.MapDataset.range(len(source)).shuffle(seed=s).random_map(RandomClips(source), seed=s)`

A video too short for one crop ((num_frames - 1) * frame_stride + 1 frames) is an error naming it, unless the source
was made with `short="pad"` (its last frame repeated). All sources are picklable and deterministic.
"""

from __future__ import annotations

import os
import zlib
from typing import Protocol, Sequence

import grain
import numpy as np
from PIL import Image

from par_jax.data import sources, views
from par_jax.data.sources import DataSourceError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
SHORT_POLICIES = ("error", "pad")
# tfds datasets with several configs and the one read when the spec names none: 256x256 frames, official split 1.
DEFAULT_TFDS_CONFIGS = {"ucf101": "ucf101_1_256"}


class VideoSource(Protocol):
    name: str
    num_classes: int
    class_names: Sequence[str]
    num_frames: int
    frame_size: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


# --- temporal crops ----------------------------------------------------------------------------------------------

def crop_span(num_frames: int, frame_stride: int = 1) -> int:
    """Frames of video one crop covers: its first frame, then num_frames - 1 steps of frame_stride."""
    return (num_frames - 1) * frame_stride + 1


def _check_crop(num_frames: int, frame_stride: int, short: str) -> None:
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(f"num_frames and frame_stride must be >= 1, got {num_frames} and {frame_stride}.")
    if short not in SHORT_POLICIES:
        raise ValueError(f"short must be one of {SHORT_POLICIES}, got {short!r}.")


def crop_indices(length: int, num_frames: int, frame_stride: int = 1, start: int = 0, *, short: str = "error",
                 what: str = "video") -> np.ndarray:
    """Indices start, start + frame_stride, ... (num_frames of them) into a video of `length` frames.

    A video shorter than one crop raises DataSourceError naming `what`, its length and the length needed; with
    short="pad" the indices past its end repeat its last frame instead (then only start=0 fits).
    """
    _check_crop(num_frames, frame_stride, short)
    span = crop_span(num_frames, frame_stride)
    if length < span and (short == "error" or length == 0):
        raise DataSourceError(
            f"{what} has {length} frames; {num_frames} frames every {frame_stride} need at least {span}. Use fewer "
            f"frames or a smaller frame_stride, drop the video, or pass short='pad' to repeat its last frame.")
    if not 0 <= start <= max(0, length - span):
        raise ValueError(f"crop start {start} outside [0, {max(0, length - span)}] for {what} of {length} frames.")
    return np.minimum(start + frame_stride * np.arange(num_frames), length - 1)


def temporal_crop(frames: np.ndarray, num_frames: int, frame_stride: int = 1, start: int = 0, *,
                  short: str = "error", what: str = "video") -> np.ndarray:
    """frames[start], frames[start + frame_stride], ... (num_frames of them); see `crop_indices`."""
    return np.asarray(frames)[crop_indices(len(frames), num_frames, frame_stride, start, short=short, what=what)]


def random_crop_start(length: int, num_frames: int, frame_stride: int, rng: np.random.Generator) -> int:
    """A uniform start among the crops that fit (0 when none or one fits; crop_indices then judges)."""
    return int(rng.integers(0, max(0, length - crop_span(num_frames, frame_stride)) + 1))


class RandomTemporalCrop(grain.transforms.RandomMap):
    """grain transform on decoded videos: `(frames (L, H, W, 3), label)` -> `(random crop (num_frames, ...), label)`.

        grain.MapDataset.source(videos).random_map(RandomTemporalCrop(17), seed=1)

    grain hands `random_map` a generator derived from the seed and the element's position, so the stream is
    reproducible and resumable. For a video source, `RandomClips` does the same without decoding unused frames.
    """

    def __init__(self, num_frames: int, frame_stride: int = 1, *, short: str = "error"):
        _check_crop(num_frames, frame_stride, short)
        self.num_frames, self.frame_stride, self.short = num_frames, frame_stride, short

    def random_map(self, element, rng: np.random.Generator):
        frames, label = element
        start = random_crop_start(len(frames), self.num_frames, self.frame_stride, rng)
        return temporal_crop(frames, self.num_frames, self.frame_stride, start, short=self.short,
                             what=f"a video of class {label}"), label


class RandomClips(grain.transforms.RandomMap):
    """grain transform from a video index to a training clip: `i -> source.clip(i, rng)`, a random temporal crop.

        grain.MapDataset.range(len(source)).shuffle(seed=0).random_map(RandomClips(source), seed=1)

    Indices travel through the shuffle (cheap), and only the crop's frames are resized.
    """

    def __init__(self, source):
        self.source = source

    def random_map(self, index, rng: np.random.Generator):
        return self.source.clip(int(index), rng)


class _CroppedVideos:
    """Shared by the real-video sources: `_decode` gives raw frames; this crops them in time, then resizes."""

    name: str
    num_frames: int
    frame_size: int
    frame_stride: int
    short: str

    def _init_crops(self, num_frames: int, frame_size: int, frame_stride: int, short: str) -> None:
        _check_crop(num_frames, frame_stride, short)
        if frame_size < 1:
            raise ValueError(f"frame_size must be >= 1, got {frame_size}.")
        self.num_frames, self.frame_size, self.frame_stride, self.short = num_frames, frame_size, frame_stride, short

    def _decode(self, index: int, stop: int | None = None) -> tuple[list[np.ndarray], int]:
        """The video's first `stop` frames (all when None), at their stored size, and its label."""
        raise NotImplementedError

    def _what(self, index: int) -> str:
        return f"video {index} of {self.name}"

    def _resized(self, frames) -> np.ndarray:
        return np.stack([_resize_frame(np.asarray(f), self.frame_size) for f in frames])

    def video(self, index: int) -> tuple[np.ndarray, int]:
        """Every frame of video `index`, resized to frame_size (L, S, S, 3), and its label."""
        frames, label = self._decode(index)
        if not frames:
            raise DataSourceError(f"{self._what(index)} has no frames.")
        return self._resized(frames), label

    def clip(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        """The evaluation crop (rng None: from the first frame) or a random crop of video `index`, with its label."""
        # The evaluation crop needs only the first frames: a folder source stops decoding there.
        frames, label = self._decode(index, None if rng is not None else crop_span(self.num_frames,
                                                                                    self.frame_stride))
        start = 0 if rng is None else random_crop_start(len(frames), self.num_frames, self.frame_stride, rng)
        picked = crop_indices(len(frames), self.num_frames, self.frame_stride, start, short=self.short,
                              what=self._what(index))
        return self._resized([frames[i] for i in picked]), label

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.clip(index)


def _resize_frame(frame: np.ndarray, frame_size: int) -> np.ndarray:
    """Short side to frame_size, centre crop: the same resampling as the image views (box halving, then bicubic)."""
    return views.center_crop(sources.to_rgb(frame), frame_size)


# --- TensorFlow Datasets ---------------------------------------------------------------------------------------------

class TfdsVideoSource(_CroppedVideos):
    """A tfds video dataset (UCF-101 by default) through `builder.as_data_source` (ArrayRecord, random access).

    `name` may carry a config, 'ucf101/ucf101_1'; without one, ucf101 reads 'ucf101_1_256' (frames 256x256).
    """

    def __init__(self, name: str = "ucf101", split: str = "train", *, data_dir: str | None = None,
                 download: bool = False, num_frames: int = 17, frame_size: int = 32, frame_stride: int = 1,
                 short: str = "error", video_key: str = "video", label_key: str = "label"):
        self._init_crops(num_frames, frame_size, frame_stride, short)
        if "/" not in name and name in DEFAULT_TFDS_CONFIGS:
            name = f"{name}/{DEFAULT_TFDS_CONFIGS[name]}"
        self.name = f"tfds:{name}/{split}"
        self._video_key, self._label_key = video_key, label_key
        self._data, features = sources.open_tfds(
            name, split, data_dir, download, (video_key, "a video"), label_key,
            note="UCF-101 downloads 6.5 GB and needs `ffmpeg` on PATH; docs/data.md, 'Video sources'")
        # (None, H, W, 3) for a fixed frame size (ucf101_1_256), (None, None, None, 3) for the originals.
        self._stored_shape = tuple(features[video_key].shape)
        self.num_classes = int(features[label_key].num_classes)
        self.class_names = tuple(features[label_key].names)

    def __len__(self) -> int:
        return len(self._data)

    def _decode(self, index: int, stop: int | None = None) -> tuple[list[np.ndarray], int]:
        example = self._data[index]  # tfds decodes every frame of the video here (a list of arrays)
        frames = [np.asarray(f) for f in example[self._video_key]]
        expected = self._stored_shape[1:3]
        for t, frame in enumerate(frames):
            if None not in expected and frame.shape[:2] != expected:
                raise DataSourceError(f"{self._what(index)}: frame {t} is {frame.shape[0]}x{frame.shape[1]} but the "
                                      f"dataset declares {expected[0]}x{expected[1]} frames; it was written with "
                                      f"another config. Rebuild it with `tfds build`.")
        return frames[:stop], int(example[self._label_key])

    def __repr__(self) -> str:
        return f"TfdsVideoSource({self.name!r}, {len(self)} videos)"


# --- a folder of video files -----------------------------------------------------------------------------------------

class VideoFolderSource(_CroppedVideos):
    """`root/<class name>/<video files>` (.mp4 .avi .mov .mkv .webm .gif). Labels index the sorted class names.

    Containers are decoded by imageio's ffmpeg plugin (the binary ships in the imageio-ffmpeg wheel), GIFs by
    pillow. The evaluation crop stops decoding after its last frame; a random crop decodes the whole video.
    """

    def __init__(self, root: str, *, num_frames: int = 17, frame_size: int = 32, frame_stride: int = 1,
                 short: str = "error"):
        self._init_crops(num_frames, frame_size, frame_stride, short)
        classes, files, labels = sources.class_folders(root, VIDEO_EXTENSIONS, "video", "videos")
        self.root = root
        self.name = f"folder:{os.path.abspath(root)}"
        self.num_classes = len(classes)
        self.class_names = tuple(classes)
        self._files = files
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._files)

    def _what(self, index: int) -> str:
        return f"video {os.path.join(self.root, self._files[index])} (index {index})"

    def _decode(self, index: int, stop: int | None = None) -> tuple[list[np.ndarray], int]:
        import imageio.v3 as iio  # noqa: PLC0415 (only this source decodes video files)

        path = os.path.join(self.root, self._files[index])
        gif = path.lower().endswith(".gif")
        decoded: list[np.ndarray] = []
        try:
            # pillow hands GIF frames over as RGB (each frame composited); ffmpeg decodes containers to rgb24.
            frames = iio.imiter(path, plugin="pillow", mode="RGB") if gif else iio.imiter(path, plugin="FFMPEG")
            for t, frame in enumerate(frames):
                if stop is not None and t >= stop:
                    break
                if decoded and frame.shape[:2] != decoded[0].shape[:2]:
                    raise DataSourceError(f"{self._what(index)}: frame {t} is {frame.shape[0]}x{frame.shape[1]}, "
                                          f"frame 0 was {decoded[0].shape[0]}x{decoded[0].shape[1]}; a video's "
                                          f"frames must share one size.")
                decoded.append(np.asarray(frame, np.uint8))
        except DataSourceError:
            raise
        except Exception as e:  # imageio and ffmpeg raise many types for damaged or unsupported files
            raise DataSourceError(f"cannot decode {self._what(index)}: {e}") from e
        return decoded, int(self._labels[index])

    def __repr__(self) -> str:
        return f"VideoFolderSource({self.root!r}, {len(self)} videos, {self.num_classes} classes)"


# --- Moving Fashion-MNIST --------------------------------------------------------------------------------------------

def _bounce(start: int, velocity: int, times: np.ndarray, limit: int) -> np.ndarray:
    """Positions start + velocity * t reflected into [0, limit]: a point bouncing off two walls, in closed form."""
    if limit == 0:
        return np.zeros(len(times), np.int64)
    unfolded = np.mod(start + velocity * times, 2 * limit)
    return np.where(unfolded <= limit, unfolded, 2 * limit - unfolded)


class MovingFashionMNIST:
    """Clip i: image i of an image source (Fashion-MNIST by default) moving on a black canvas, its label the clip's.

    The image is resized to `garment_size` and starts at a position drawn from `default_rng((seed, crc32(split), i))`
    with a velocity of 1-3 px per frame in x and in y (each sign random), bouncing off the canvas walls, so the whole
    garment is visible in every frame. A clip depends only on (seed, split, i, the image): any access order, any
    count, gives the same clip i. `frame_stride` s shows every s-th step of the motion (frames at times 0, s, 2s...).
    """

    def __init__(self, split: str = "train", *, num_frames: int = 17, frame_size: int = 32, garment_size: int = 20,
                 frame_stride: int = 1, count: int = 0, seed: int = 0, images: sources.ImageSource | None = None,
                 data_dir: str | None = None, download: bool = False, name: str = "moving_fashion_mnist"):
        if min(num_frames, frame_size, garment_size, frame_stride) < 1:
            raise ValueError(f"num_frames, frame_size, garment_size and frame_stride must be >= 1, got {num_frames}, "
                             f"{frame_size}, {garment_size} and {frame_stride}.")
        if garment_size > frame_size:
            raise ValueError(f"garment_size {garment_size} is larger than the frame ({frame_size} px); it must fit.")
        if images is None:
            images = sources.fashion_mnist(split, data_dir=data_dir, download=download)
        if count < 0 or count > len(images):
            raise ValueError(f"count {count} outside [0, {len(images)}] (the images of {images.name}; 0 = all).")
        self._images, self.split = images, split
        self._count = count or len(images)
        self.num_frames, self.frame_size, self.garment_size, self.seed = num_frames, frame_size, garment_size, seed
        self.frame_stride = frame_stride
        self.num_classes, self.class_names = images.num_classes, tuple(images.class_names)
        self.name = (f"{name}/{split}:{images.name}/{self._count}clips/{num_frames}x{frame_size}px/"
                     f"garment{garment_size}/seed{seed}" + (f"/stride{frame_stride}" if frame_stride > 1 else ""))

    def __len__(self) -> int:
        return self._count

    def trajectory(self, index: int) -> np.ndarray:
        """int (num_frames, 2): the garment's top-left corner (y, x) in every frame."""
        # The split is in the seed too: test clip i must not move exactly like train clip i.
        rng = np.random.default_rng((self.seed, zlib.crc32(self.split.encode()), index))
        limit = self.frame_size - self.garment_size
        start = rng.integers(0, limit + 1, size=2)
        velocity = rng.integers(1, 4, size=2) * rng.choice((-1, 1), size=2)
        times = self.frame_stride * np.arange(self.num_frames)
        return np.stack([_bounce(int(s), int(v), times, limit) for s, v in zip(start, velocity)], axis=1)

    def video(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self._count:
            raise IndexError(f"clip index {index} outside [0, {self._count}).")
        image, label = self._images[index]
        garment = np.asarray(Image.fromarray(sources.to_rgb(image)).resize(
            (self.garment_size, self.garment_size), resample=Image.Resampling.BILINEAR))
        clip = np.zeros((self.num_frames, self.frame_size, self.frame_size, 3), np.uint8)
        g = self.garment_size
        for t, (y, x) in enumerate(self.trajectory(index)):
            clip[t, y:y + g, x:x + g] = garment
        return clip, int(label)

    def clip(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        """The clip; it has exactly num_frames frames, so every crop (random or not) is the whole clip."""
        del rng
        return self.video(index)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.video(index)

    def __repr__(self) -> str:
        return f"MovingFashionMNIST({self.name!r})"


# --- specs -------------------------------------------------------------------------------------------------------

VIDEO_SPECS = ("moving_fashion_mnist", "moving_fashion_mnist:IDX_DIR", "moving_synthetic", "tfds:ucf101",
               "tfds:NAME/CONFIG", "folder:PATH")


def make_video_source(spec: str, *, split: str = "train", num_frames: int = 17, frame_size: int = 32,
                      frame_stride: int = 1, data_dir: str | None = None, download: bool = False, count: int = 0,
                      seed: int = 0, garment_size: int | None = None, short: str = "error") -> VideoSource:
    """A video source from a spec string (see VIDEO_SPECS and the module docstring).

    `count` (0 = all), `seed` and `garment_size` (default 5/8 of frame_size: 20 px at 32) shape the moving sets only;
    `short` the real videos only (a synthetic clip is never short).
    """
    kind, _, arg = spec.partition(":")
    garment = garment_size or max(1, round(frame_size * 5 / 8))
    if kind == "moving_fashion_mnist":
        images = sources.fashion_mnist_files(split, arg) if arg else None
        return MovingFashionMNIST(split, num_frames=num_frames, frame_size=frame_size, garment_size=garment,
                                  frame_stride=frame_stride, count=count, seed=seed, images=images, data_dir=data_dir,
                                  download=download)
    if kind == "moving_synthetic" and not arg:
        # Images drawn per split with different seeds, so train and test clips differ.
        images = sources.SyntheticImages(count or 256, size=28, seed=seed * 2 + (split != "train"))
        return MovingFashionMNIST(split, num_frames=num_frames, frame_size=frame_size, garment_size=garment,
                                  frame_stride=frame_stride, count=count, seed=seed, images=images,
                                  name="moving_synthetic")
    if kind == "tfds" and arg:
        return TfdsVideoSource(arg, split, data_dir=data_dir, download=download, num_frames=num_frames,
                               frame_size=frame_size, frame_stride=frame_stride, short=short)
    if kind == "folder" and arg:
        return VideoFolderSource(arg, num_frames=num_frames, frame_size=frame_size, frame_stride=frame_stride,
                                 short=short)
    raise DataSourceError(f"unknown video source {spec!r}; use one of {', '.join(VIDEO_SPECS)}.")
