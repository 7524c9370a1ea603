"""The evaluate job: `python -m par_jax.main --config=... --workdir=W --job=evaluate` (PAR_SPEC section 11).

1. Build the feature network and the reference features first (a missing weight file or reference fails in seconds,
   not after hours of sampling).
2. Draw `num_samples` samples with uniformly random (or balanced) labels from the checkpoint, in batches sharded over
   the devices, with progress and ETA; decode them with the tokenizer; resize them to the evaluation resolution with
   the release's bicubic resize; stream them into an ADM-compatible `samples.npz` (`arr_0` uint8 N x H x W x 3,
   `arr_1` labels) and save a PNG grid. Or, with `config.eval.samples`, score an existing .npz instead.
   With several processes each samples its own share of the labels on a mesh of its own devices shaped like
   `config.mesh` (weights split by `config.mesh.rules`, so XXL/3B fit), the images are gathered and process 0
   writes the files; sample i is drawn with the key fold_in(key(seed), i), so the file is the same for any process
   count.
   A decoder with a 3-D grid (T', H', W') is a video model: its samples are decoded by the video tokenizer into
   clips, scored by a video feature network (`i3d`: FVD; `video_classifier`: `fd_video_classifier`, offline)
   against clips of a video source (`config.eval.reference`, e.g. moving_fashion_mnist), and `samples.npz` holds
   uint8 clips (N, T, H, W, 3) (kept in memory until written: a video evaluation's sample count is small).
3. Compute the configured metrics and write them through CLU metric writers (scalars, the sample grid, the settings
   as hparams; TensorBoard under W/eval/<name>) and as `results.json`, which records every setting that changes the
   numbers: checkpoint, sampling settings, n and the order, seed, N, labels, resolution, reference, feature network.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from par_jax.core import checkpoint, paths
from par_jax.core.config_args import UsageError
from par_jax.data import pipeline
from par_jax.evaluation import features as features_lib
from par_jax.evaluation import generate, metrics, npz, reference, video_reference
from par_jax.evaluation.settings import EvalSettings
from par_jax.utils import images as image_utils
from par_jax.utils import video as video_utils

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.npz"
GRID_FILE = "samples_grid.png"
GIF_FILE = "samples_grid.gif"     # video: the first grid_images clips tiled, animated
STRIP_CLIPS = 8                   # video: clips in the PNG frame strip (a row per clip, its frames left to right)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _plain(value: Any) -> Any:
    """JSON-friendly copy (tuples to lists, NumPy scalars to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Grid:
    """Keeps the first `count` samples for the PNG / TensorBoard grid."""

    def __init__(self, count: int):
        self.count, self.images = count, []

    @property
    def full(self) -> bool:
        return sum(len(x) for x in self.images) >= self.count

    def add(self, images: np.ndarray) -> None:
        have = sum(len(x) for x in self.images)
        if have < self.count:
            self.images.append(images[:self.count - have])

    def picture(self) -> np.ndarray | None:
        if not self.images:
            return None
        images = np.concatenate(self.images)
        if images.ndim == 5:  # clips: a frame strip of the first few
            return video_utils.frame_strip(images[:STRIP_CLIPS])
        return image_utils.make_grid(images, rows=max(1, int(np.sqrt(len(images)))))

    def animation(self) -> np.ndarray | None:
        """Video: every kept clip tiled into one clip (T, H', W', 3); None for images."""
        if not self.images or self.images[0].ndim != 5:
            return None
        clips = np.concatenate(self.images)
        return video_utils.clip_grid(clips, rows=max(1, int(np.sqrt(len(clips)))))


def _is_video_file(path: str) -> bool:
    shape, _ = npz.read_header(path)
    return len(shape) == 5


def _check_network_kind(settings: EvalSettings, video: bool, what: str) -> None:
    """Image samples need an image feature network and clips a video one; say so before anything is built."""
    if video != (settings.feature_network in features_lib.VIDEO_NETWORKS):
        choices = features_lib.VIDEO_NETWORKS if video else tuple(
            n for n in features_lib.NETWORKS if n not in features_lib.VIDEO_NETWORKS)
        raise UsageError(f"{what} {'clips' if video else 'images'}, but config.eval.feature_network="
                         f"{settings.feature_network!r} is {'an image' if video else 'a video'} network; choose one "
                         f"of {choices}" + (" (and config.eval.metrics from fvd, precision_recall, "
                                            "class_consistency)." if video else "."))


def _write_clips(path, clips: list[np.ndarray], labels: list[np.ndarray]) -> None:
    """samples.npz of a video evaluation: arr_0 uint8 (N, T, H, W, 3), arr_1 labels."""
    with paths.open_file(path, "wb") as f:
        np.savez(f, arr_0=np.concatenate(clips), arr_1=np.concatenate(labels).astype(np.int64))


def run(config, workdir: str) -> dict[str, Any]:
    """Run the evaluation protocol of `config.eval`; returns the results record (also written as results.json)."""
    s = EvalSettings.from_config(config)  # bad settings fail here, before anything is loaded
    names = s.metrics
    is_main = jax.process_index() == 0
    workdir = paths.as_path(workdir)

    # 1. Everything that can be missing, then the feature network and reference set, before any sampling.
    video, tokenizer, clip_shape = False, None, None
    if s.samples:
        if not paths.exists(s.samples):
            raise FileNotFoundError(f"config.eval.samples={s.samples!r} does not exist.")
        video = _is_video_file(s.samples)
        _check_network_kind(s, video, f"{s.samples} holds")
        if video:
            clip_shape = tuple(npz.read_header(s.samples)[0][1:])
    else:
        step_dir, step, item = checkpoint.resolve(
            s.checkpoint or config.sample.checkpoint or workdir,
            what="checkpoint to evaluate (set --config.eval.checkpoint to a training workdir or a params-only "
                 "checkpoint, or --config.eval.samples to a .npz)")
        tokenizer_path = s.require_tokenizer()
        if not paths.exists(tokenizer_path):
            raise FileNotFoundError(f"tokenizer {tokenizer_path!r} does not exist.")
        # The sampler's mesh: config.mesh's shape over this process's own devices (each samples its own share).
        from par_jax.sampling import placement  # noqa: PLC0415
        mesh, rules = placement.from_config(config)
        from par_jax.model import checkpoint as model_ckpt  # noqa: PLC0415
        model_config = model_ckpt.read_model_config(step_dir)
        video = len(model_config.grid_shape) == 3
        _check_network_kind(s, video, f"the decoder's grid {model_config.grid_shape} makes")
        if video:
            # The video tokenizer first: the reference clips are read at the shape it decodes samples to.
            from par_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
            tokenizer = tokenizer_lib.load(tokenizer_path, codes_dir=pipeline.training_codes_dir(config))
            clip_shape = generate.sample_shape(model_config, tokenizer, 0)
    features_lib.check(s)
    if video:
        video_reference.check(s)
    network = features_lib.build(s)
    metrics.check_network(names, network)
    if video:
        # From a file, the clips are scored at their own size; sampled ones are resized to config.eval.resolution.
        reference_feats, reference_record = video_reference.features(
            s, network, num_frames=clip_shape[0], frame_size=clip_shape[1], resolution=0 if s.samples else
            s.resolution)
    else:
        reference_feats, reference_record = reference.features(s, network)
    logging.info("reference: %s, %d images, FID statistics %s", reference_record["reference"],
                 reference_feats.count, reference_record["reference_stats"])

    # 2. Samples: from a file, or drawn from the checkpoint.
    collector = features_lib.FeatureCollector(network)
    grid = _Grid(s.grid_images)
    settings: dict[str, Any] = {}
    if s.samples:
        shape, _ = npz.read_header(s.samples)
        labels = None
        with paths.open_file(s.samples, "rb") as raw, np.load(raw) as f:
            if "arr_1" in f.files:
                labels = f["arr_1"]
        if "class_consistency" in names and labels is None:
            raise ValueError(f"{s.samples} has no arr_1 labels, which class_consistency needs.")
        step, out_name = -1, s.name or f"file_{network.name}_{shape[0]}"
        start = 0
        for images in npz.iter_batches(s.samples, network.batch_size):
            collector.add(images, None if labels is None else labels[start:start + len(images)])
            grid.add(images)
            start += len(images)
        settings.update(samples_file=str(paths.as_path(s.samples)), num_samples=int(shape[0]),
                        resolution=f"{shape[-3]}x{shape[-2]} (as in the file)")
        out_dir = workdir / "eval" / out_name
    else:
        from par_jax import sampling, tokenizer as tokenizer_lib  # noqa: PLC0415

        # Restored straight into their shards on the sampler's mesh.
        model = model_ckpt.load_params(step_dir, item=item, shardings=placement.param_shardings(
            model_config, mesh, rules))
        if tokenizer is None:
            tokenizer = tokenizer_lib.load(tokenizer_path, codes_dir=pipeline.training_codes_dir(config))
        sample_settings = sampling.SampleSettings.from_config(config.sample)
        labels = generate.make_labels(s.num_samples, model.config.num_classes, s.labels, s.seed)
        out_dir = workdir / "eval" / (s.name or f"step{step}_{network.name}_{len(labels)}")
        if is_main:
            paths.check_writable(out_dir, "evaluation output folder")
        if video:
            clip_shape = generate.sample_shape(model.config, tokenizer, s.resolution)
            height, width = clip_shape[1:3]
        else:
            height, width = (s.resolution,) * 2 if s.resolution else \
                tuple(g * tokenizer.config.downsample for g in model.config.grid_shape)
        writer = (npz.NpzWriter(out_dir / SAMPLES_FILE, len(labels), (height, width, 3))
                  if s.save_npz and is_main and not video else None)
        kept_clips: list[np.ndarray] = []
        kept_labels: list[np.ndarray] = []
        try:
            for images, part in generate.generate(model, tokenizer, labels, sample_settings,
                                                  key=jax.random.key(s.seed), batch_size=s.batch_size,
                                                  resolution=s.resolution, mesh=mesh, rules=rules):
                collector.add(images, part, local=True)
                if s.save_npz or not grid.full:  # the same decision on every process (gathers are collective)
                    images, part = features_lib.gather(images), features_lib.gather(part)
                    if writer is not None:
                        writer.write(images, part)
                    elif video and s.save_npz and is_main:
                        kept_clips.append(images)
                        kept_labels.append(part)
                    grid.add(images)
        finally:
            if writer is not None:
                writer.close()
        if kept_clips:
            _write_clips(out_dir / SAMPLES_FILE, kept_clips, kept_labels)
        settings.update({
            "checkpoint": str(step_dir), "checkpoint_step": step, "weights": item,
            "model": _plain(dataclasses.asdict(model.config)),
            "tokenizer": tokenizer_path, "tokenizer_config": _plain(dataclasses.asdict(tokenizer.config)),
            "sampling": _plain(dataclasses.asdict(sample_settings)),
            "n": model.config.n, "order": model.config.order_kind, "num_steps": model.config.layout.num_steps,
            "num_samples": len(labels), "batch_size": s.batch_size, "seed": s.seed,
            "sampler_mesh": {k: int(v) for k, v in mesh.shape.items()},
            "labels": s.labels, "samples_file": str(out_dir / SAMPLES_FILE) if s.save_npz else "",
            "resolution": s.resolution or f"{height}x{width} (decoded size)",
            "resize": ("PyTorch bicubic (a=-0.75, align_corners=False, no antialias)" if s.resolution else "none")
                      + (" per frame" if video else "") + "; uint8 = clamp(127.5 x + 128, 0, 255) truncated",
        })
    if video:
        settings.update(video=True, num_frames=int(clip_shape[0]), frame_size=f"{clip_shape[1]}x{clip_shape[2]}")
    if is_main:
        paths.makedirs(out_dir)

    # 3. Metrics, writers, record.
    results = metrics.compute(names, collector.result(), reference_feats, network, s)
    settings.update({
        **reference_record,
        "feature_network": network.name, "feature_network_info": _plain(network.info),
        "metrics": list(names), "pr_k": s.pr_k, "is_split_size": s.is_split_size,
        "backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count(),
        "par_jax_commit": _git_commit(), "jax": jax.__version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    record = {"metrics": results, "comparable_to_published": network.comparable_to_published,
              "feature_network_description": network.description, "settings": settings}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in results.items())
    logging.info("evaluation (%s): %s", network.name, summary)
    if not network.comparable_to_published:
        logging.info("these %s numbers are NOT comparable with published ImageNet FID/IS.", network.name)

    writer = metric_writers.create_default_writer(str(out_dir), just_logging=not is_main)
    write_step = max(step, 0)
    writer.write_scalars(write_step, {f"eval/{k}": v for k, v in results.items()})
    picture = grid.picture()
    if picture is not None:
        writer.write_images(write_step, {"eval/samples": picture[None]})
    animation = grid.animation()
    writer.write_hparams({k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))})
    writer.flush()
    writer.close()
    if is_main:
        if picture is not None:
            image_utils.save_png(out_dir / GRID_FILE, picture)
        if animation is not None:
            video_utils.write_gif(animation, out_dir / GIF_FILE)
        paths.write_json(out_dir / RESULTS_FILE, _plain(record))
        logging.info("results in %s", out_dir / RESULTS_FILE)
    return record
