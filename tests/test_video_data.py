"""par_jax.data.video and par_jax.utils.video: the moving Fashion-MNIST clips, temporal crops, the folder and tfds
video sources (on files the tests write), GIFs, grids and frame strips. CPU, small, well under a minute."""

import os
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from par_jax.data import sources, video
from par_jax.data.sources import DataSourceError
from par_jax.utils import video as video_utils

FASHION = sources.DEBIAN_FASHION_MNIST


class ConstantImages:
    """An ImageSource of white squares, labels i % 3: every garment pixel is visible, so placement can be checked."""

    name, num_classes, class_names = "white", 3, ("a", "b", "c")

    def __len__(self):
        return 40

    def __getitem__(self, index):
        return np.full((28, 28, 3), 255, np.uint8), index % 3


def ramp(length, size=8):
    """uint8 (length, size, size, 3) video whose frame t is filled with 10 * t: a frame says its own index."""
    return np.broadcast_to((10 * np.arange(length, dtype=np.uint8))[:, None, None, None],
                           (length, size, size, 3)).copy()


# --------------------------------------------------------------------------------------------------------------
# Moving Fashion-MNIST


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST idx files not installed")
def test_moving_fashion_mnist_clips_are_deterministic_per_seed_and_labelled_by_their_garment():
    src = video.make_video_source(f"moving_fashion_mnist:{FASHION}", count=12, seed=3)
    images = sources.fashion_mnist_files("train", FASHION)
    assert len(src) == 12 and src.num_classes == 10 and src.class_names == sources.FASHION_MNIST_CLASSES
    assert (src.num_frames, src.frame_size) == (17, 32)
    clips = {i: src[i] for i in (7, 2, 11, 0)}  # out of order
    for i, (clip, label) in clips.items():
        assert clip.shape == (17, 32, 32, 3) and clip.dtype == np.uint8
        assert label == images[i][1]
        assert (clip[..., 0] == clip[..., 1]).all() and (clip[..., 1] == clip[..., 2]).all()  # grey as RGB
        assert clip.any(axis=(1, 2, 3)).all()  # the garment is in every frame
        assert not all((clip[t] == clip[0]).all() for t in range(17))  # and it moves
    # A fresh source, a different count and a different access order give the same clip 7; another seed does not.
    again = video.MovingFashionMNIST("train", count=50, seed=3, images=images)
    np.testing.assert_array_equal(again[7][0], clips[7][0])
    other = video.MovingFashionMNIST("train", count=12, seed=4, images=images)
    assert other[7][1] == clips[7][1] and not np.array_equal(other[7][0], clips[7][0])
    with pytest.raises(IndexError):
        src[12]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[2][0], clips[2][0])  # grain workers get copies


def test_the_whole_garment_stays_inside_the_canvas_and_bounces():
    src = video.MovingFashionMNIST(num_frames=40, frame_size=32, garment_size=20, images=ConstantImages(), seed=1)
    assert src.class_names == ("a", "b", "c") and src[5][1] == 2
    limit = 32 - 20
    reflected = 0
    for i in range(len(src)):
        clip, _ = src[i]
        path = src.trajectory(i)
        assert path.shape == (40, 2) and path.min() >= 0 and path.max() <= limit
        # Every frame shows all 20x20 garment pixels, exactly where the trajectory puts them.
        assert ((clip[..., 0] > 0).sum(axis=(1, 2)) == 400).all()
        for t in (0, 17, 39):
            y, x = path[t]
            assert clip[t, y:y + 20, x:x + 20].min() == 255
        steps = np.abs(np.diff(path, axis=0))
        assert steps.max() <= 3
        # Away from the walls a coordinate moves by its constant speed of 1-3 px per frame (less at a bounce).
        assert set(steps.max(axis=0).tolist()) <= {1, 2, 3}
        reflected += int((np.diff(np.sign(np.diff(path, axis=0)), axis=0) != 0).any())
    assert reflected > len(src) // 2  # 40 frames on a 12 px track: most clips hit a wall
    # frame_stride 3 shows every third position of the same motion.
    strided = video.MovingFashionMNIST(num_frames=14, frame_stride=3, images=ConstantImages(), seed=1)
    np.testing.assert_array_equal(strided.trajectory(4), src.trajectory(4)[::3])
    # The split seeds the motion too: test clip i does not move like train clip i.
    test = video.MovingFashionMNIST("test", num_frames=40, images=ConstantImages(), seed=1)
    assert sum(np.array_equal(test.trajectory(i), src.trajectory(i)) for i in range(len(src))) <= 1


def test_moving_synthetic_needs_no_files_and_its_splits_differ():
    train = video.make_video_source("moving_synthetic", num_frames=5, frame_size=16, count=6)
    test = video.make_video_source("moving_synthetic", split="test", num_frames=5, frame_size=16, count=6)
    assert len(train) == 6 and train[0][0].shape == (5, 16, 16, 3) and train.num_classes == 10
    assert not np.array_equal(train[0][0], test[0][0])
    with pytest.raises(ValueError, match="garment_size 40 is larger"):
        video.MovingFashionMNIST(frame_size=32, garment_size=40, images=ConstantImages())
    with pytest.raises(ValueError, match="count 41 outside"):
        video.MovingFashionMNIST(count=41, images=ConstantImages())
    with pytest.raises(DataSourceError, match="unknown video source 'ucf'.*moving_fashion_mnist.*folder:PATH"):
        video.make_video_source("ucf")


# --------------------------------------------------------------------------------------------------------------
# Temporal crops


def test_temporal_crop_arithmetic_and_short_videos():
    frames = ramp(20)
    assert video.crop_span(5, 3) == 13
    crop = video.temporal_crop(frames, 5, 3)
    assert crop[:, 0, 0, 0].tolist() == [0, 30, 60, 90, 120]
    assert video.temporal_crop(frames, 5, 3, start=7)[:, 0, 0, 0].tolist() == [70, 100, 130, 160, 190]
    with pytest.raises(ValueError, match="crop start 8 outside"):
        video.temporal_crop(frames, 5, 3, start=8)
    rng = np.random.default_rng(0)
    starts = {video.random_crop_start(20, 5, 3, rng) for _ in range(300)}
    assert starts == set(range(8))  # every start that fits, and none that does not
    with pytest.raises(DataSourceError, match=r"clip.mp4 has 10 frames; 5 frames every 3 need at least 13"):
        video.temporal_crop(frames[:10], 5, 3, what="clip.mp4")
    padded = video.temporal_crop(frames[:10], 5, 3, short="pad")
    assert padded[:, 0, 0, 0].tolist() == [0, 30, 60, 90, 90]  # the last frame repeated
    with pytest.raises(ValueError, match="short must be one of"):
        video.temporal_crop(frames, 5, 3, short="loop")


def test_random_temporal_crop_in_a_grain_pipeline_is_reproducible_and_in_bounds():
    videos = [(ramp(12 + 3 * i), i) for i in range(6)]
    crop = video.RandomTemporalCrop(4, 2)

    def stream(seed):
        ds = grain.MapDataset.source(videos).random_map(crop, seed=seed)
        return [ds[i] for i in range(len(ds))]

    first, again, other = stream(1), stream(1), stream(2)
    for (clip, label), (clip2, _), (length_video, _) in zip(first, again, videos):
        np.testing.assert_array_equal(clip, clip2)
        index = clip[:, 0, 0, 0] // 10
        assert np.all(np.diff(index) == 2) and index[-1] < len(length_video) and index[0] >= 0
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


# --------------------------------------------------------------------------------------------------------------
# Real videos: a folder of files, tfds


def write_videos(root):
    """Two classes: an .mp4 of 12 frames (48x64) and a .gif of 9 frames (20x30) in 'walk'; an .mp4 in 'run'."""
    import imageio.v3 as iio

    (root / "walk").mkdir(parents=True)
    (root / "run").mkdir()
    iio.imwrite(root / "walk" / "a.mp4", ramp(12, 64)[:, :48], plugin="FFMPEG", fps=10)
    iio.imwrite(root / "walk" / "b.gif", ramp(9, 30)[:, :20], plugin="pillow", duration=100, loop=0)
    iio.imwrite(root / "run" / "c.mp4", ramp(16, 64)[:, :48], plugin="FFMPEG", fps=10)
    (root / "run" / "notes.txt").write_text("not a video")


def test_video_folder_source_decodes_mp4_and_gif_resizes_and_crops(tmp_path):
    write_videos(tmp_path)
    src = video.make_video_source(f"folder:{tmp_path}", num_frames=4, frame_size=16, frame_stride=2)
    assert src.class_names == ("run", "walk") and len(src) == 3 and src.num_classes == 2
    frames, label = src.video(1)  # walk/a.mp4: all 12 frames, resized and centre-cropped
    assert frames.shape == (12, 16, 16, 3) and label == 1
    np.testing.assert_allclose(frames[:, 8, 8, 0], 10 * np.arange(12), atol=3)  # lossy h264, uniform frames
    clip, label = src[1]  # the evaluation crop: from the first frame, every second frame
    assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8 and label == 1
    np.testing.assert_allclose(clip[:, 8, 8, 0], [0, 20, 40, 60], atol=3)
    gif, label = src[2]  # walk/b.gif, exact (pillow, a palette that holds every grey used)
    assert label == 1 and gif[:, 0, 0, 0].tolist() == [0, 20, 40, 60]
    rng = np.random.default_rng(0)
    starts = {int(round(src.clip(0, rng)[0][0, 8, 8, 0] / 10)) for _ in range(12)}  # run/c.mp4: 16 frames
    assert starts <= set(range(10)) and len(starts) > 2
    assert src.video(2)[0].shape == (9, 16, 16, 3)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[1][0], clip)
    # Training clips in a grain pipeline: indices shuffled, then a random crop per clip, the same for the same seed.
    def stream(seed):
        ds = grain.MapDataset.range(len(src)).shuffle(seed=seed).random_map(video.RandomClips(src), seed=seed)
        return [ds[i] for i in range(len(ds))]
    first, again = stream(5), stream(5)
    assert sorted(label for _, label in first) == [0, 1, 1]
    for (clip, _), (clip2, _) in zip(first, again):
        np.testing.assert_array_equal(clip, clip2)
        assert clip.shape == (4, 16, 16, 3) and np.allclose(np.diff(clip[:, 8, 8, 0].astype(int)), 20, atol=4)
    long = video.VideoFolderSource(str(tmp_path), num_frames=6, frame_size=16, frame_stride=2)
    with pytest.raises(DataSourceError, match=r"b\.gif \(index 2\) has 9 frames; 6 frames every 2 need at least 11"):
        long[2]
    assert video.VideoFolderSource(str(tmp_path), num_frames=6, frame_size=16, frame_stride=2,
                                   short="pad")[2][0].shape == (6, 16, 16, 3)
    (tmp_path / "run" / "d.avi").write_bytes(b"not a video")
    with pytest.raises(DataSourceError, match=r"cannot decode video .*d\.avi \(index 1\)"):
        video.VideoFolderSource(str(tmp_path), num_frames=4, frame_size=16)[1]
    with pytest.raises(DataSourceError, match="no class subfolders"):
        video.VideoFolderSource(str(tmp_path / "run"))


def test_tfds_ucf101_source_reads_a_prepared_array_record_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.video import ucf101

    class SmallUcf101(ucf101.Ucf101, skip_registration=True):
        """The real UCF-101 builder (features, config, file layout) with three made-up videos instead of 6.5 GB."""

        name = "ucf101"

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._videos({"a": (10, 5), "b": (7, 42), "c": (12, 100)}),
                    "test": self._videos({"d": (9, 7)})}

        def _videos(self, spec):
            for key, (length, label) in spec.items():
                yield key, {"video": ramp(length, 256), "label": label}

    SmallUcf101(config="ucf101_1_256", data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = video.make_video_source("tfds:ucf101", data_dir=str(tmp_path), num_frames=3, frame_size=16, frame_stride=3)
    assert src.name == "tfds:ucf101/ucf101_1_256/train" and len(src) == 3
    assert src.num_classes == 101 and src.class_names[0] == "ApplyEyeMakeup" and len(src.class_names) == 101
    by_label = {}
    for i in range(len(src)):
        frames, label = src.video(i)
        by_label[label] = frames
        clip, label2 = src[i]
        assert label2 == label and clip.shape == (3, 16, 16, 3) and clip.dtype == np.uint8
        np.testing.assert_allclose(clip[:, 8, 8, 0], [0, 30, 60], atol=2)  # JPEG frames, uniform grey
    assert {k: len(v) for k, v in by_label.items()} == {5: 10, 42: 7, 100: 12}
    assert by_label[5].shape[1:] == (16, 16, 3)
    short = next(i for i in range(len(src)) if src.video(i)[1] == 42)  # tfds shuffles the order
    longer = video.TfdsVideoSource("ucf101", data_dir=str(tmp_path), num_frames=3, frame_size=16, frame_stride=4)
    with pytest.raises(DataSourceError, match=rf"video {short} of tfds:ucf101/ucf101_1_256/train has 7 frames; "
                                              r"3 frames every 4 need at least 9"):
        longer[short]
    src._stored_shape = (None, 128, 128, 3)  # as if the files had been written by another config
    with pytest.raises(DataSourceError, match=r"frame 0 is 256x256 but the dataset declares 128x128 frames"):
        src[0]
    with pytest.raises(DataSourceError, match="tfds build ucf101/ucf101_1 --file_format=array_record"):
        video.make_video_source("tfds:ucf101/ucf101_1", data_dir=str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------------------------
# Pictures for people


def test_write_gif_round_trip_loops_and_upscales(tmp_path):
    clip = ramp(5, 32)
    path = video_utils.write_gif(clip, tmp_path / "out" / "clip.gif", fps=10, min_side=100)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.size == (128, 128)  # 32 px x 4, the first whole factor reaching 100
        assert gif.info["loop"] == 0 and gif.info["duration"] == 100
        gif.seek(3)
        assert np.asarray(gif.convert("RGB"))[64, 64].tolist() == [30, 30, 30]
    floats = clip.astype(np.float32) / 127.5 - 1.0  # [-1, 1] floats are accepted too
    with Image.open(video_utils.write_gif(floats, tmp_path / "f.gif", min_side=32)) as gif:
        assert gif.n_frames == 5 and gif.size == (32, 32)


def test_clip_grid_layout_and_frame_strip(tmp_path):
    clips = np.zeros((3, 4, 6, 5, 3), np.uint8)
    for b in range(3):
        for t in range(4):
            clips[b, t] = 10 * b + t + 1
    grid = video_utils.clip_grid(clips, rows=2, pad=1, pad_value=255)
    assert grid.shape == (4, 2 * 7 + 1, 2 * 6 + 1, 3)  # 2 rows x 2 cols of 6x5 with a 1 px gap
    assert grid[2, 1, 1, 0] == 3 and grid[2, 1, 7, 0] == 13 and grid[2, 8, 1, 0] == 23  # clip b, frame t at cell b
    assert grid[0, 8, 7, 0] == 255 and grid[0, 0, 0, 0] == 255  # the empty cell and the gap
    strip_path = video_utils.write_frame_strip(clips, tmp_path / "strip.png", min_side=12, pad=2)
    strip = np.asarray(Image.open(strip_path))
    # Frames upscaled 3x (5 -> 15 >= 12): 18x15 each; a row per clip, frames left to right.
    assert strip.shape == (3 * 20 + 2, 4 * 17 + 2, 3)
    assert strip[2 + 20 * 1 + 5, 2 + 17 * 2 + 5, 0] == 13
    with pytest.raises(ValueError, match="clip_grid needs clips"):
        video_utils.clip_grid(np.zeros((4, 5, 3), np.uint8), rows=1)
