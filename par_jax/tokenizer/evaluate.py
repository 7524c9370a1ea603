r"""The evaluate_tokenizer job: reconstruction quality of a trained (or converted) tokenizer on an image split, or
of a video tokenizer on a clip split.

    python -m par_jax.main --job=evaluate_tokenizer --config=configs/vq.py:fmnist --workdir=workdirs/tokenizer_fmnist

Scores `config.eval.tokenizer` (default: the workdir's tokenizer) on the first `config.eval.final_num_images` images
(<= 0: all) of `config.data.eval_split`, and writes WORKDIR/eval_tokenizer/metrics.json (MSE and PSNR in [0, 1]
pixel units, codebook usage, dead codes, perplexity) and reconstructions.png (originals beside reconstructions).
For a video tokenizer the counts are clips, PSNR is per frame (and `psnr_by_frame` lists it per frame index), and the
reconstructions are reconstructions.gif (animated) and reconstructions_frames.png (a frame strip).
"""

from __future__ import annotations

import jax
from absl import logging
from flax import nnx

from par_jax import tokenizer as tokenizer_lib
from par_jax.tokenizer import train
from par_jax.core import mesh as mesh_lib
from par_jax.core import paths
from par_jax.core import sharding as sharding_lib

OUT_DIR = "eval_tokenizer"


def run(config, workdir: str) -> dict[str, float]:
    workdir = paths.as_path(workdir)
    path = config.eval.get("tokenizer", "") or workdir
    model = tokenizer_lib.load(path)
    mesh = mesh_lib.create_mesh(dict(config.mesh))
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sharding_lib.replicated(mesh))
    metrics, originals, recons = train.evaluate(params, config, model.config, nnx.graphdef(model), mesh,
                                                num_images=config.eval.final_num_images,
                                                grid_images=config.train.grid_images)
    source = config.data.video_source if model.is_video else config.data.image_source
    metrics = {"tokenizer": str(path), "split": f"{source}/{config.data.eval_split}",
               "crop": int(config.eval.crop), **metrics}
    logging.info("tokenizer %s on %s: %s", path, metrics["split"], metrics)
    if jax.process_index() == 0:  # local or gs:// workdirs (par_jax.core.paths)
        out = workdir / OUT_DIR
        paths.write_json(out / "metrics.json", metrics)
        train.write_reconstructions(out, "reconstructions", originals, recons)
    return metrics
