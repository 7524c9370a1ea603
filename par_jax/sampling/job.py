r"""The `sample` job: a trained decoder (and tokenizer) in, a PNG grid and an `.npz` out.

    python -m par_jax.main --config=configs/par.py:size=XL,n=4 --workdir=WORKDIR --job=sample \
        --config.sample.num_images=64 --config.sample.guidance=1.5

Reads `config.sample` (see configs/par.py). The checkpoint is `config.sample.checkpoint` or the workdir itself (its
latest training step, EMA parameters when saved); its model must match `config.model` (a different grid, n or size
is an error that lists the differences). Writes WORKDIR/samples/<name>/ (local or gs://):
    settings.json  what the samples were drawn with (checkpoint, model, sampling settings, labels, batch size)
    samples.npz    arr_0 images uint8 (N, H, W, 3) (with a tokenizer), arr_1 labels (N,), tokens (N, *grid)
    grid.png       the images (or, without a tokenizer, the token maps) in a grid, one row per class by default

Video (a (t, h, w) grid_shape) with a video tokenizer: the tokens are decoded to clips, and the folder holds
    samples.npz    arr_0 clips uint8 (N, T, H, W, 3), arr_1 labels (N,), tokens (N, t, h, w)
    grid.gif       the clips tiled frame by frame, one row per class by default, looping
    frames.png     the first clip of each grid row, its frames left to right
The tokenizer must be a video tokenizer whose latent shape for the training clips is the model's grid (the clips'
frames and size come from the training codes' metadata, else config.data.num_frames / frame_size, else the
tokenizer's own); an image tokenizer on a video grid, or the reverse, is an error before anything is sampled.
Without a tokenizer, grid.png shows each sample's token maps with its latent frames side by side.

The output folder is created and checked first: an unwritable one is an error naming it before anything is loaded
or sampled. Each batch is written to <name>/batches/ as it completes, so a rerun of an interrupted job skips the
batches already there (and says so); the settings of the first run are recorded, and a rerun with different ones is
refused with the differing fields (instead of mixing samples). When every batch is there, samples.npz and grid.png
are assembled and the batch files removed; a rerun of a finished job only reads samples.npz back. The sampler runs
on a mesh of this process's devices shaped like `config.mesh` (weights split by `config.mesh.rules`: XXL and 3B fit
chips that hold a share of them; sampling/placement.py). With several processes every process samples every batch
on its own devices and process 0 alone writes (the evaluate job splits the samples between processes instead).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time

import jax
import numpy as np
from absl import logging

from par_jax.core import checkpoint as core_ckpt
from par_jax.core import paths
from par_jax.model import from_config_dict
from par_jax.sampling import placement
from par_jax.sampling.sampler import SampleSettings, Sampler, tokens_to_images
from par_jax.utils import images as images_lib
from par_jax.utils import video as video_lib

SETTINGS_FILE = "settings.json"
SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
GIF_FILE = "grid.gif"        # video
STRIP_FILE = "frames.png"    # video
BATCHES_DIR = "batches"


def parse_labels(spec: str, num_images: int, num_classes: int, seed: int) -> tuple[np.ndarray, int]:
    """(labels (num_images,), grid rows) from config.sample.labels.

    "" : a few classes spread over the label range, one grid row each; "random": uniform random classes;
    "3,7,11": these ids repeated in turn (one grid row per id).
    """
    spec = (spec or "").strip()
    if spec == "random":
        labels = np.random.default_rng(seed).integers(0, num_classes, num_images)
        return labels.astype(np.int32), max(1, math.isqrt(num_images))
    if spec:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"config.sample.labels must be '', 'random' or comma-separated class ids, got {spec!r}.")
        bad = [i for i in ids if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"config.sample.labels has class ids {bad} outside 0..{num_classes - 1}.")
        rows = len(ids)
        per_row = -(-num_images // rows)
        return np.repeat(np.asarray(ids, np.int32), per_row)[:num_images], rows
    rows = min(num_classes, max(1, math.isqrt(num_images)))
    per_row = -(-num_images // rows)
    classes = (np.arange(rows) * num_classes) // rows
    return np.repeat(classes, per_row)[:num_images].astype(np.int32), rows


def token_maps(tokens: np.ndarray, grid_shape, vocab_size: int) -> np.ndarray:
    """Token ids as greyscale pictures (N, h, w, 3) in [-1, 1], for runs without a tokenizer (video: frames side by
    side)."""
    maps = tokens.reshape(tokens.shape[0], *grid_shape).astype(np.float32) / max(vocab_size - 1, 1) * 2 - 1
    if maps.ndim == 4:  # (N, T, h, w) -> (N, h, T*w)
        maps = np.concatenate(list(np.moveaxis(maps, 1, 0)), axis=-1)
    return np.repeat(maps[..., None], 3, axis=-1)


def _load_tokenizer(path: str, config):
    if not path:
        return None
    from par_jax import tokenizer  # noqa: PLC0415 (only runs that decode images need it)
    from par_jax.data import pipeline  # noqa: PLC0415
    return tokenizer.load(path, codes_dir=pipeline.training_codes_dir(config))


def _clip_shape(config, tokenizer) -> tuple[int, int, str]:
    """(frames per clip, frame size, where they came from) of the clips a video decoder was trained on."""
    from par_jax.data import codes as codes_lib  # noqa: PLC0415
    from par_jax.data import pipeline  # noqa: PLC0415
    codes_dir = pipeline.training_codes_dir(config)
    if codes_dir:
        meta = codes_lib.CodesMetadata.load(codes_dir)
        if meta.num_frames:
            return meta.num_frames, meta.image_size, f"the training codes in {codes_dir}"
    data = config.get("data") or {}
    if data.get("video_source", "") and data.get("num_frames", 0) and data.get("frame_size", 0):
        return int(data["num_frames"]), int(data["frame_size"]), "config.data.num_frames / frame_size"
    tc = tokenizer.config
    return int(tc.num_frames), int(tc.frame_size), "the tokenizer's own num_frames / frame_size"


def check_tokenizer(tokenizer, grid_shape, config, tok_path: str = "") -> None:
    """Fails before sampling when `tokenizer` cannot decode the model's grid: an image tokenizer for a (t, h, w)
    video grid or a video tokenizer for an (h, w) image grid, or a video tokenizer whose latent shape for the
    training clips is not the model's grid."""
    grid = tuple(int(g) for g in grid_shape)
    is_video = bool(getattr(tokenizer, "is_video", False))
    name = f"the tokenizer {tok_path}" if tok_path else "the tokenizer"
    if len(grid) == 3 and not is_video:
        raise ValueError(f"this model generates {'x'.join(map(str, grid))} video grids but {name} is an image "
                         f"tokenizer: decode with the video tokenizer its codes were made with "
                         f"(--config.sample.tokenizer=PATH), or set --config.sample.tokenizer='' and "
                         f"--config.data.tokenizer='' for token maps.")
    if len(grid) == 2 and is_video:
        raise ValueError(f"this model generates {grid[0]}x{grid[1]} image grids but {name} is a video tokenizer: "
                         f"decode with the image tokenizer its codes were made with (--config.sample.tokenizer=PATH).")
    if is_video:
        num_frames, frame_size, origin = _clip_shape(config, tokenizer)
        try:
            latent = tuple(int(g) for g in tokenizer.config.latent_shape(num_frames, frame_size))
        except ValueError as e:
            raise ValueError(f"{name} cannot take the clips ({num_frames} frames of {frame_size} px, from "
                             f"{origin}): {e}") from e
        if latent != grid:
            raise ValueError(f"{name} turns {num_frames} frames of {frame_size} px (from {origin}) into "
                             f"{'x'.join(map(str, latent))} codes but the model generates "
                             f"{'x'.join(map(str, grid))} grids: decode with the tokenizer the model's codes were "
                             f"made with (--config.sample.tokenizer=PATH).")


def tokens_to_clips(tokens, tokenizer, grid_shape) -> np.ndarray:
    """Raster-order tokens (B, t*h*w) -> clips float (B, T, H, W, 3) in [-1, 1] through a video tokenizer."""
    tokens = np.asarray(tokens)
    return np.asarray(tokenizer.decode(jax.numpy.asarray(tokens.reshape(tokens.shape[0], *grid_shape))))


def run(config, workdir: str, *, model=None, tokenizer=None) -> dict:
    """Sample `config.sample.num_images` images (or clips); returns {"npz", "png", "tokens", "labels", "images"?}
    and, for video decoded by a video tokenizer, "gif" and "clips" (uint8 (N, T, H, W, 3)).

    model / tokenizer: already loaded objects instead of checkpoints (tests, notebooks).
    """
    sc = config.sample
    settings = SampleSettings.from_config(sc)  # bad settings fail here, before anything is loaded
    if sc.num_images < 1 or sc.batch_size < 1:
        raise ValueError(f"config.sample.num_images and batch_size must be positive, got {sc.num_images} and "
                         f"{sc.batch_size}.")
    wanted = from_config_dict(config.model)
    out_dir = paths.as_path(workdir) / "samples" / _run_name(sc, wanted)
    is_main = jax.process_index() == 0
    if is_main:
        paths.check_writable(out_dir, "sample output folder")
    mesh, rules = placement.from_config(config)  # config.mesh's shape over this process's devices

    if model is None:
        from par_jax.model.checkpoint import load_params  # noqa: PLC0415
        found = core_ckpt.resolve(sc.checkpoint or workdir, what="par_jax checkpoint")
        logging.info("restoring %s from %s", found.item, found.directory)
        model = load_params(found.directory, wanted, item=found.item,
                            shardings=placement.param_shardings(wanted, mesh, rules))
        source = f"{found.directory} ({found.item})"
    elif model.config.grid_shape != wanted.grid_shape or model.config.n != wanted.n:
        raise ValueError(f"the model was built for grid {model.config.grid_shape} with n={model.config.n}, but "
                         f"config.model asks for grid {wanted.grid_shape} with n={wanted.n}.")
    else:
        source = "a model passed to sampling.job.run"
    cfg = model.config
    tok_path = sc.get("tokenizer", "") or config.get("data", {}).get("tokenizer", "")
    if tokenizer is None:
        tokenizer = _load_tokenizer(tok_path, config)
    video = len(cfg.grid_shape) == 3
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg.grid_shape, config, str(tok_path))

    labels, rows = parse_labels(sc.labels, sc.num_images, cfg.num_classes, sc.seed)
    batch = min(sc.batch_size, sc.num_images)
    num_batches = -(-sc.num_images // batch)
    record = {"checkpoint": source, "model": core_ckpt.config_to_json(cfg),
              "tokenizer": str(tok_path) if tokenizer is not None else "",
              "sampling": dataclasses.asdict(settings), "num_images": int(sc.num_images), "batch_size": batch,
              "seed": int(sc.seed), "labels": str(sc.labels)}
    _claim(out_dir, record, is_main)
    npz_path, png_path = out_dir / SAMPLES_FILE, out_dir / GRID_FILE
    clips_out = video and tokenizer is not None
    gif_path = out_dir / GIF_FILE if clips_out else None
    if clips_out:
        png_path = out_dir / STRIP_FILE
    if npz_path.exists():
        logging.info("%s is complete (all %d images); nothing to sample.", out_dir, sc.num_images)
        return _result(npz_path, png_path, gif_path)

    batches = out_dir / BATCHES_DIR
    todo = [b for b in range(num_batches) if not _batch_path(batches, b).exists()]
    if len(todo) < num_batches:
        logging.info("resuming %s: %d of %d batches already written, skipping them; sampling %d more.", out_dir,
                     num_batches - len(todo), num_batches, len(todo))
    padded = np.resize(labels, num_batches * batch)  # the last batch is filled up and trimmed afterwards
    if todo:
        sampler = Sampler(model, settings, batch_size=batch, mesh=mesh, rules=rules)
        logging.info("sampling %d images (%d batches of %d), %d steps each; compiling...", sc.num_images,
                     num_batches, batch, cfg.layout.num_steps)
        logging.info("compiled in %.1f s", sampler.compile())
        key = jax.random.key(sc.seed)
        start = time.perf_counter()
        for i, b in enumerate(todo):
            toks = sampler(padded[b * batch:(b + 1) * batch], jax.random.fold_in(key, b))
            arrays = {"tokens": np.asarray(toks), "labels": padded[b * batch:(b + 1) * batch]}
            if clips_out:
                arrays["clips"] = np.asarray(images_lib.to_uint8(tokens_to_clips(toks, tokenizer, cfg.grid_shape)))
            elif tokenizer is not None:
                arrays["images"] = np.asarray(images_lib.to_uint8(tokens_to_images(toks, tokenizer, cfg.grid_shape)))
            if is_main:
                _write_npz(_batch_path(batches, b), arrays)
            elapsed = time.perf_counter() - start
            logging.info("batch %d/%d written: %.2f images/s, ETA %.0f s", b + 1, num_batches,
                         (i + 1) * batch / elapsed, elapsed / (i + 1) * (len(todo) - i - 1))

    # Every batch is on disk: assemble the outputs (on process 0), then drop the batch files.
    if not is_main:
        return {"npz": str(npz_path), "png": str(png_path), "labels": labels,
                **({"gif": str(gif_path)} if clips_out else {})}
    parts = [_read_npz(_batch_path(batches, b)) for b in range(num_batches)]
    tokens = np.concatenate([p["tokens"] for p in parts])[: sc.num_images]
    arrays = {"arr_1": labels, "tokens": tokens.reshape(-1, *cfg.grid_shape)}
    if clips_out:
        clips = arrays["arr_0"] = np.concatenate([p["clips"] for p in parts])[: sc.num_images]
        video_lib.write_gif(video_lib.clip_grid(clips, rows), gif_path)
        per_row = -(-len(clips) // rows)  # the grid's row length: its first clip per row (a class each by default)
        video_lib.write_frame_strip(clips[::per_row], png_path)
        _write_npz(npz_path, arrays)  # last, and atomically: its presence means the job is complete
        paths.remove(batches)
        logging.info("wrote %s, %s and %s", npz_path, gif_path, png_path)
        return {"npz": str(npz_path), "png": str(png_path), "gif": str(gif_path), "tokens": tokens,
                "labels": labels, "images": None, "clips": clips}
    if tokenizer is not None:
        arrays["arr_0"] = np.concatenate([p["images"] for p in parts])[: sc.num_images]
        pictures = arrays["arr_0"]
    else:
        pictures = token_maps(tokens, cfg.grid_shape, cfg.vocab_size)
    images_lib.save_png(png_path, images_lib.make_grid(pictures, rows))
    _write_npz(npz_path, arrays)  # last, and atomically: its presence means the job is complete
    paths.remove(batches)
    logging.info("wrote %s and %s", npz_path, png_path)
    return {"npz": str(npz_path), "png": str(png_path), "tokens": tokens, "labels": labels,
            "images": arrays.get("arr_0")}


def _claim(out_dir, record: dict, is_main: bool) -> None:
    """Record the settings in a new output folder, or check that an existing one was drawn with the same."""
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        if is_main:
            paths.write_json(path, record)
        return
    saved = paths.read_json(path)
    diffs = [f"{k}: {saved.get(k)!r} there, {record.get(k)!r} now" for k in sorted(set(saved) | set(record))
             if saved.get(k) != _json(record.get(k))]
    if diffs:
        raise ValueError(f"{out_dir} holds samples drawn with other settings ({'; '.join(diffs)}). Rerun with the "
                         f"recorded settings ({path}) to finish or reuse them, or delete that folder (or use another "
                         f"--workdir) to start over.")


def _json(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as they read back


def _batch_path(batches, b: int):
    return batches / f"batch_{b:05d}.npz"


def _write_npz(path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.parent / f".{path.name}.tmp"
    paths.write_bytes(tmp, buffer.getvalue())
    paths.replace(tmp, path)


def _read_npz(path) -> dict:
    with np.load(io.BytesIO(paths.read_bytes(path))) as f:
        return {k: f[k] for k in f.files}


def _result(npz_path, png_path, gif_path=None) -> dict:
    arrays = _read_npz(npz_path)
    result = {"npz": str(npz_path), "png": str(png_path),
              "tokens": arrays["tokens"].reshape(len(arrays["arr_1"]), -1), "labels": arrays["arr_1"],
              "images": arrays.get("arr_0")}
    if gif_path is not None:  # video: arr_0 holds clips
        result.update(gif=str(gif_path), images=None, clips=arrays.get("arr_0"))
    return result


def _run_name(sc, cfg) -> str:
    name = f"n{cfg.n}_g{sc.guidance:g}_t{sc.temperature:g}_seed{sc.seed}"
    if sc.top_k:
        name += f"_k{sc.top_k}"
    if sc.top_p < 1:
        name += f"_p{sc.top_p:g}"
    if sc.guidance_schedule != "constant":   # settings that change the samples change the folder
        name += f"_{sc.guidance_schedule}"
    if sc.guidance_stop_step >= 0:
        name += f"_stop{sc.guidance_stop_step}"
    return name
