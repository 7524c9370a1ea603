"""Sample grids during training: a `par_jax.training.evaluators` plug-in, registered as `samples`.

Every `config.train.sample_every_steps` steps (or `config.evals.samples = dict(every_steps=N, num_images=16)`), draw
`num_images` samples of the current model, one per class in turn (classes 0, 1, 2, ...), decode them with the run's
tokenizer and write one PNG grid to WORKDIR/samples/step_<step>.png and, when the loop passes its writer, to
TensorBoard as `samples`. A video decoder's clips make an animated WORKDIR/samples/step_<step>.gif instead (and a
strip of its frames in TensorBoard).

Several processes: every process samples its share of the labels on its own devices (parameters split over
processes are gathered first), the images are gathered to every process, and process 0 writes the PNG (the other
processes' writers only log). Sampling uses `config.sample` (guidance, temperature, top-k/p) with the key
fold_in(key(config.sample.seed), step).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging

from par_jax import sampling
from par_jax.core import paths
from par_jax.data import pipeline
from par_jax.evaluation import features as features_lib
from par_jax.evaluation import generate
from par_jax.utils import images as images_lib
from par_jax.utils import video as video_utils

SAMPLES_DIR = "samples"


def grid_path(workdir, step: int):
    return paths.as_path(workdir) / SAMPLES_DIR / f"step_{step:08d}.png"


class SampleGrid:
    """One grid of `num_images` samples per call; returns {} (the picture is the result)."""

    def __init__(self, config, *, num_images: int = 0):
        self.num_images = int(num_images or config.train.get("sample_num_images", 16))
        if self.num_images < 1:
            raise ValueError(f"a sample grid needs num_images >= 1, got {self.num_images}.")
        self.settings = sampling.SampleSettings.from_config(config.sample)
        self.seed = int(config.sample.seed)
        self.tokenizer_path = str(config.sample.get("tokenizer", "") or config.get("data", {}).get("tokenizer", ""))
        self.tokenizer = None
        self.codes_dir = pipeline.training_codes_dir(config)
        if not self.tokenizer_path:
            logging.warning("sample grids need a tokenizer to turn codes into images, and config.data.tokenizer is "
                            "empty: no sample grids in this run.")
        elif not paths.exists(self.tokenizer_path):
            raise FileNotFoundError(f"sample grids: tokenizer {self.tokenizer_path!r} does not exist (set "
                                    f"config.data.tokenizer to the one the codes were extracted with).")

    def __call__(self, model, config=None, *, step: int, workdir, writer=None) -> dict[str, float]:
        del config  # read at construction
        if not self.tokenizer_path:
            return {}
        if self.tokenizer is None:
            from par_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
            self.tokenizer = tokenizer_lib.load(self.tokenizer_path, codes_dir=self.codes_dir)
        grid = self.picture(model, step)
        if grid.ndim == 4:  # clips (T, H, W, 3): an animated GIF, and its frames as one strip for TensorBoard
            if jax.process_index() == 0:
                path = video_utils.write_gif(grid, grid_path(workdir, step).with_suffix(".gif"))
                logging.info("wrote the sample clips of step %d to %s", step, path)
            if writer is not None:
                writer.write_images(step, {"samples": video_utils.frame_strip(grid)[None]})
            return {}
        if jax.process_index() == 0:
            path = images_lib.save_png(grid_path(workdir, step), grid)
            logging.info("wrote the sample grid of step %d to %s", step, path)
        if writer is not None:
            writer.write_images(step, {"samples": grid[None]})
        return {}

    def picture(self, model, step: int) -> np.ndarray:
        """The grid as one uint8 picture, identical on every process."""
        labels = np.arange(self.num_images, dtype=np.int32) % model.config.num_classes
        share = -(-self.num_images // jax.process_count())
        devices = jax.local_device_count()  # the sampler splits its batch over this process's devices
        batch = -(-share // devices) * devices
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        pictures = [features_lib.gather(images) for images, _ in
                    generate.generate(model, self.tokenizer, labels, self.settings, key=key, batch_size=batch,
                                      resolution=0, what=f"sample grid at step {step}")]
        pictures = np.concatenate(pictures)
        rows = max(1, int(math.sqrt(self.num_images)))
        if pictures.ndim == 5:  # clips of a (t, h, w) decoder: one animated grid (T, H', W', 3)
            return video_utils.clip_grid(pictures, rows=rows)
        return images_lib.make_grid(pictures, rows=rows)
