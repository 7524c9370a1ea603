r"""The `sample` job: a trained decoder (and tokenizer) in, a PNG grid and an `.npz` out.

    python -m par_jax.main --config=configs/par.py:size=XL,n=4 --workdir=WORKDIR --job=sample \
        --config.sample.num_images=64 --config.sample.guidance=1.5

Reads `config.sample` (see configs/common.py). The checkpoint is `config.sample.checkpoint` or the workdir itself (its
latest training step, EMA parameters when saved); its model must match `config.model` (a different grid, n or size
is an error that lists the differences). Writes WORKDIR/samples/<name>/:
    samples.npz   arr_0 images uint8 (N, H, W, 3) (with a tokenizer), arr_1 labels (N,), tokens (N, *grid)
    grid.png      the images (or, without a tokenizer, the token maps) in a grid, one row per class by default
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from par_jax.model import from_config_dict
from par_jax.sampling.sampler import SampleSettings, Sampler, tokens_to_images
from par_jax.utils import images as images_lib


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


def _load_tokenizer(path: str):
    if not path:
        return None
    from par_jax import tokenizer  # noqa: PLC0415 (only runs that decode images need it)
    return tokenizer.load(path)


def run(config, workdir: str, *, model=None, tokenizer=None) -> dict:
    """Sample `config.sample.num_images` images; returns {"npz", "png", "tokens", "labels", "images"?}.

    model / tokenizer: already loaded objects instead of checkpoints (tests, notebooks).
    """
    sc = config.sample
    settings = SampleSettings.from_config(sc)  # bad settings fail here, before anything is loaded
    if sc.num_images < 1 or sc.batch_size < 1:
        raise ValueError(f"config.sample.num_images and batch_size must be positive, got {sc.num_images} and "
                         f"{sc.batch_size}.")
    wanted = from_config_dict(config.model)
    if model is None:
        from par_jax.model.checkpoint import restore_model  # noqa: PLC0415
        model = restore_model(sc.checkpoint or workdir, wanted)
    elif model.config.grid_shape != wanted.grid_shape or model.config.n != wanted.n:
        raise ValueError(f"the model was built for grid {model.config.grid_shape} with n={model.config.n}, but "
                         f"config.model asks for grid {wanted.grid_shape} with n={wanted.n}.")
    cfg = model.config
    tok_path = sc.get("tokenizer", "") or config.get("data", {}).get("tokenizer", "")
    if tokenizer is None:
        tokenizer = _load_tokenizer(tok_path)
    if tokenizer is not None and len(cfg.grid_shape) != 2:
        raise ValueError(f"a tokenizer decodes image grids; this model generates a {cfg.grid_shape} video grid.")

    labels, rows = parse_labels(sc.labels, sc.num_images, cfg.num_classes, sc.seed)
    batch = min(sc.batch_size, sc.num_images)
    num_batches = -(-sc.num_images // batch)
    padded = np.resize(labels, num_batches * batch)  # the last batch is filled up and trimmed afterwards
    sampler = Sampler(model, settings, batch_size=batch)
    logging.info("sampling %d images (%d batches of %d), %d steps each; compiling...", sc.num_images, num_batches,
                 batch, cfg.layout.num_steps)
    compile_s = sampler.compile()
    logging.info("compiled in %.1f s", compile_s)

    key = jax.random.key(sc.seed)
    tokens, images = [], []
    start = time.perf_counter()
    for b in range(num_batches):
        toks = sampler(padded[b * batch:(b + 1) * batch], jax.random.fold_in(key, b))
        if tokenizer is not None:
            images.append(np.asarray(images_lib.to_uint8(tokens_to_images(toks, tokenizer, cfg.grid_shape))))
        tokens.append(np.asarray(toks))
        done, elapsed = (b + 1) * batch, time.perf_counter() - start
        logging.info("batch %d/%d: %.2f images/s, ETA %.0f s", b + 1, num_batches, done / elapsed,
                     elapsed / (b + 1) * (num_batches - b - 1))
    tokens = np.concatenate(tokens)[: sc.num_images]

    out_dir = epath.Path(workdir) / "samples" / _run_name(sc, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_1": labels, "tokens": tokens.reshape(-1, *cfg.grid_shape)}
    if images:
        arrays["arr_0"] = np.concatenate(images)[: sc.num_images]
        pictures = arrays["arr_0"]
    else:
        pictures = token_maps(tokens, cfg.grid_shape, cfg.vocab_size)
    npz_path, png_path = out_dir / "samples.npz", out_dir / "grid.png"
    with npz_path.open("wb") as f:  # epath: local or gs:// workdirs
        np.savez(f, **arrays)
    with png_path.open("wb") as f:
        Image.fromarray(images_lib.make_grid(pictures, rows)).save(f, format="PNG")
    logging.info("wrote %s and %s", npz_path, png_path)
    return {"npz": os.fspath(npz_path), "png": os.fspath(png_path), "tokens": tokens, "labels": labels,
            "images": arrays.get("arr_0")}


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
