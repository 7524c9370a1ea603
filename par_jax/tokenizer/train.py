r"""The train_tokenizer job: train a VQ tokenizer on images, evaluate its reconstructions, checkpoint and resume.

    python -m par_jax.main --config=configs/vq.py:fmnist --workdir=workdirs/tokenizer_fmnist
    python -m par_jax.main --config=configs/vq.py:vq16 --workdir=gs://BUCKET/vq16 \
        --config.data.image_source=tfds:imagenet2012 --config.loss.perceptual_weights=/path/lpips_vgg16.safetensors

Reads top to bottom: logging, mesh, input, model and optimizer, the update step, checkpoint, evaluation, loop.
The tokenizer is replicated on every device and the batch is split over the mesh's batch axes (VQ-16 has 72M
parameters; nothing here needs sharded weights). The machinery is the decoder's: `par_jax.training` mesh, optimizer
and `TrainCheckpointer` (orbax, asynchronous, keeps the latest few, saves on preemption, resumes from the workdir,
with the grain iterator state), CLU metric writers (TensorBoard) and CLU's progress report (steps/s, ETA).

Checkpoint layout: the `params` item is exactly the tokenizer's parameters, so `par_jax.tokenizer.load` reads any
step. The PatchGAN discriminator, needed only to continue training, travels inside the optimizer item. At the end
the job also writes a params-only copy to `WORKDIR/tokenizer`.

Losses (PAR_SPEC section 8): L2 reconstruction + codebook + commitment (beta from the tokenizer config), optional
LPIPS perceptual loss (weights from a file; an error when asked for without one), optional PatchGAN hinge loss
with weight `loss.disc_weight` from step `loss.disc_start` (the discriminator trains from the same step).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from par_jax.data import sources as sources_lib
from par_jax.data import views as views_lib
from par_jax.tokenizer import losses as losses_lib
from par_jax.tokenizer import vq
from par_jax.core import checkpoint as ckpt_lib
from par_jax.core import mesh as mesh_lib
from par_jax.core import optim
from par_jax.core import sharding as sharding_lib
from par_jax.utils import images as images_lib

TRAIN_VIEWS = ("pad", "resize", "center", "random_crop")
EVAL_VIEWS = ("pad", "resize", "center")
EXPORT_DIR = "tokenizer"


# ----- input --------------------------------------------------------------------------------------------------

def random_crop(image: np.ndarray, size: int, rng: np.random.Generator, min_crop_frac: float = 0.8) -> np.ndarray:
    """LlamaGen's training crop: scale the short side to a random length in [size, size / min_crop_frac], then take
    a random size x size crop."""
    h, w = image.shape[:2]
    short = rng.uniform(size, size / min_crop_frac)
    scale = short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    from PIL import Image  # noqa: PLC0415
    image = np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.Resampling.BICUBIC))
    top, left = rng.integers(0, nh - size + 1), rng.integers(0, nw - size + 1)
    return image[top:top + size, left:left + size]


class TrainView(grain.transforms.RandomMap):
    """(image uint8 (H, W, 3), label) -> uint8 (size, size, 3): the configured view, optionally flipped."""

    def __init__(self, size: int, view: str, flip: bool):
        self.size, self.view, self.flip = size, view, flip

    def random_map(self, element, rng: np.random.Generator):
        image = element[0]
        if self.view == "random_crop":
            image = random_crop(image, self.size, rng)
        else:
            image = views_lib.make_views(image, self.view, self.size)[0]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)


class EvalView(grain.transforms.Map):
    def __init__(self, size: int, view: str):
        self.size, self.view = size, view

    def map(self, element):
        return views_lib.make_views(element[0], self.view, self.size)[0]


def image_source(config, split: str):
    d = config.data
    return sources_lib.make_image_source(d.image_source, split=split, data_dir=d.tfds_data_dir or None,
                                         download=d.download, image_size=d.image_size, count=d.synthetic_count,
                                         seed=d.seed if split == d.train_split else d.seed + 1)


def make_train_loader(config, local_batch: int) -> grain.DataLoader:
    """Endless shuffled uint8 batches (local_batch, S, S, 3) for this process; its iterator state is checkpointed."""
    d = config.data
    if d.train_view not in TRAIN_VIEWS:
        raise ValueError(f"unknown data.train_view {d.train_view!r}; choose one of {TRAIN_VIEWS}.")
    source = image_source(config, d.train_split)
    shard = grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(),
                                        drop_remainder=True)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard, shuffle=True,
                                          num_epochs=None, seed=d.seed)
    logging.info("tokenizer training images: %s (%d), view %s at %dpx", source.name, len(source), d.train_view,
                 d.image_size)
    return grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=shard,
        operations=[TrainView(d.image_size, d.train_view, d.flip),
                    grain.transforms.Batch(batch_size=local_batch, drop_remainder=True)],
        worker_count=d.worker_count,
        read_options=grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch))


def eval_batches(config, local_batch: int, num_images: int):
    """Yields (uint8 (local_batch, S, S, 3), valid bool (local_batch,)) over the first `num_images` images of the
    eval split (all of it when <= 0), split over processes; the last batch is padded and masked."""
    d = config.data
    if d.eval_view not in EVAL_VIEWS:
        raise ValueError(f"unknown data.eval_view {d.eval_view!r}; choose one of {EVAL_VIEWS}.")
    source = image_source(config, d.eval_split)
    total = len(source) if num_images <= 0 else min(num_images, len(source))
    count = jax.process_count()
    per_process = -(-total // count)
    start = jax.process_index() * per_process
    indices = list(range(start, min(start + per_process, total)))
    view = EvalView(d.image_size, d.eval_view)
    for i in range(0, per_process, local_batch):
        chunk = indices[i:i + local_batch]
        images = np.zeros((local_batch, d.image_size, d.image_size, 3), np.uint8)
        for j, index in enumerate(chunk):
            images[j] = view.map(source[index])
        yield images, np.arange(local_batch) < len(chunk)


def to_float(images):
    return images.astype(jnp.float32) / 127.5 - 1.0


# ----- state --------------------------------------------------------------------------------------------------

def _no_decay_specs(params) -> Any:
    # optim.decay_mask decays every parameter whose logical names lack "norm": mark biases and norm gains (1-D).
    return jax.tree.map(lambda x: ("norm",) if x.ndim == 1 else (None,) * x.ndim, params)


def _discriminator(cfg: vq.VQConfig, loss_cfg, seed: int) -> losses_lib.PatchDiscriminator:
    return losses_lib.PatchDiscriminator(loss_cfg.disc_channels, loss_cfg.disc_layers, cfg.in_channels,
                                         rngs=nnx.Rngs(seed))


def abstract_models(cfg: vq.VQConfig, loss_cfg):
    """(vq graphdef, vq params, discriminator graphdef, discriminator params) as abstract shapes, nothing allocated;
    the discriminator entries are None without the adversarial loss. (Building an NNX model is slow Python: build
    each once.)"""
    vq_def, vq_params = nnx.split(nnx.eval_shape(lambda: vq.VQModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    disc_def = disc_params = None
    if loss_cfg.disc_weight > 0:
        disc_def, disc_params = nnx.split(nnx.eval_shape(lambda: _discriminator(cfg, loss_cfg, 0)), nnx.Param)
        disc_params = nnx.to_pure_dict(disc_params)
    return vq_def, nnx.to_pure_dict(vq_params), disc_def, disc_params


def state_from_params(params, disc_params, tx, disc_tx) -> dict:
    """The training state: {"step", "params" (the tokenizer's, exactly), "opt_state": {"vq", "discriminator"?}}."""
    opt_state = {"vq": tx.init(params)}
    if disc_params is not None:
        opt_state["discriminator"] = {"params": disc_params, "opt_state": disc_tx.init(disc_params)}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}


def init_state(cfg: vq.VQConfig, loss_cfg, seed: int, tx, disc_tx) -> dict:
    """A fresh training state (jit it with out_shardings to create it in place)."""
    params = nnx.to_pure_dict(nnx.state(vq.VQModel(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    disc_params = None
    if loss_cfg.disc_weight > 0:
        disc_params = nnx.to_pure_dict(nnx.state(_discriminator(cfg, loss_cfg, seed + 1), nnx.Param))
    return state_from_params(params, disc_params, tx, disc_tx)


def _tree_norm(tree):
    return optax.global_norm(tree)


# ----- the update step ----------------------------------------------------------------------------------------

def train_step(state, images, rng, *, vq_def, disc_def, tx, disc_tx, loss_cfg, perceptual, gan: bool, cfg):
    """One generator update (and one discriminator update when `gan`). images: uint8 (B, S, S, 3).

    Returns (state, metrics dict of scalars, code histogram (K,)).
    """
    x = to_float(images)
    disc_state = state["opt_state"].get("discriminator")
    dropout_rng = jax.random.fold_in(rng, state["step"]) if cfg.dropout > 0 else None

    def generator_loss(params):
        model = nnx.merge(vq_def, params)
        recon, q = model(x, rng=dropout_rng)
        rec = losses_lib.reconstruction_loss(x, recon)
        total = loss_cfg.reconstruction_weight * rec + loss_cfg.codebook_weight * (q.codebook_loss + q.commit_loss)
        aux = {"reconstruction": rec, "codebook": q.codebook_loss, "commitment": q.commit_loss}
        if perceptual is not None:
            p = jnp.mean(losses_lib.perceptual_loss(perceptual, x, recon))
            total = total + loss_cfg.perceptual_weight * p
            aux["perceptual"] = p
        if gan:
            disc = nnx.merge(disc_def, disc_state["params"])
            g = losses_lib.hinge_g_loss(disc(recon))
            total = total + loss_cfg.disc_weight * g
            aux["generator_adv"] = g
        return total, (aux, recon, q.codes)

    (loss, (aux, recon, codes)), grads = jax.value_and_grad(generator_loss, has_aux=True)(state["params"])
    updates, opt_vq = tx.update(grads, state["opt_state"]["vq"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **aux, "grad_norm": _tree_norm(grads), "update_norm": _tree_norm(updates),
               "param_norm": _tree_norm(params),
               "psnr": jnp.mean(psnr(x, jnp.clip(recon, -1, 1)))}
    opt_state = dict(state["opt_state"], vq=opt_vq)

    if gan:
        fake = jax.lax.stop_gradient(recon)

        def discriminator_loss(dparams):
            disc = nnx.merge(disc_def, dparams)
            real_logits, fake_logits = disc(x), disc(fake)
            d = loss_cfg.disc_weight * losses_lib.hinge_d_loss(real_logits, fake_logits)
            return d, (jnp.mean(real_logits), jnp.mean(fake_logits))

        (d_loss, (lr_, lf_)), dgrads = jax.value_and_grad(discriminator_loss, has_aux=True)(disc_state["params"])
        dupdates, dopt = disc_tx.update(dgrads, disc_state["opt_state"], disc_state["params"])
        opt_state["discriminator"] = {"params": optax.apply_updates(disc_state["params"], dupdates),
                                      "opt_state": dopt}
        metrics.update(disc_loss=d_loss, logits_real=lr_, logits_fake=lf_, disc_grad_norm=_tree_norm(dgrads))

    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, metrics, losses_lib.code_histogram(codes, cfg.codebook_size)


def psnr(x, y):
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR of [0, 1] images)."""
    mse = jnp.mean(((x - y) / 2.0) ** 2, axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def eval_step(params, images, valid, *, vq_def, cfg, crop: int):
    """Sums over the valid images of one batch: squared error (in [0, 1] units), PSNR; and the code histogram.

    `crop` > 0 scores only the centre crop x crop pixels (e.g. the 28x28 of Fashion-MNIST padded to 32x32).
    """
    model = nnx.merge(vq_def, params)
    x = to_float(images)
    codes = model.encode(x)
    recon = model.decode(codes)
    xs, rs = x, recon
    if crop:
        o = (x.shape[1] - crop) // 2
        xs, rs = x[:, o:o + crop, o:o + crop], recon[:, o:o + crop, o:o + crop]
    w = valid.astype(jnp.float32)
    se = jnp.mean(((xs - rs) / 2.0) ** 2, axis=(1, 2, 3))
    sums = {"mse": jnp.sum(se * w), "psnr": jnp.sum(psnr(xs, rs) * w), "count": jnp.sum(w)}
    hist = jnp.bincount(jnp.where(valid[:, None, None], codes, cfg.codebook_size).reshape(-1),
                        length=cfg.codebook_size + 1)[:-1]
    return sums, hist, recon


# ----- the job ------------------------------------------------------------------------------------------------

def _check_config(config, cfg: vq.VQConfig):
    d, t = config.data, config.train
    if d.image_size % cfg.downsample:
        raise ValueError(f"data.image_size={d.image_size} is not a multiple of the tokenizer's downsampling "
                         f"factor {cfg.downsample}.")
    if d.image_size != cfg.image_size:
        logging.warning("data.image_size=%d differs from tokenizer.image_size=%d; training at %d.", d.image_size,
                        cfg.image_size, d.image_size)
    if t.num_steps < 1 or t.batch_size < 1 or t.log_every < 1:
        raise ValueError("train.num_steps, train.batch_size and train.log_every must be positive.")
    if config.loss.disc_weight > 0 and config.loss.disc_start < 0:
        raise ValueError("loss.disc_start must be >= 0.")


def reconstruction_grid(originals, reconstructions, pairs_per_row: int = 8, min_side: int = 96) -> np.ndarray:
    """uint8 grid of cells, each an original (left) beside its reconstruction (right) split by a grey line; small
    images are enlarged (nearest neighbour) to at least `min_side` pixels so that a person can see the difference."""
    originals, reconstructions = images_lib.to_uint8(originals), images_lib.to_uint8(reconstructions)
    scale = max(1, -(-min_side // originals.shape[1]))
    line = np.full(originals.shape[:2] + (1,) + originals.shape[3:], 128, np.uint8)
    cells = np.concatenate([originals, line, reconstructions], axis=2)
    cells = cells.repeat(scale, axis=1).repeat(scale, axis=2)
    return images_lib.make_grid(cells, rows=max(1, -(-len(cells) // pairs_per_row)), pad=4 * scale)


def _write_grid(writer, workdir, step, originals, reconstructions):
    grid = reconstruction_grid(originals, reconstructions)
    writer.write_images(step, {"reconstructions": grid[None]})
    return images_lib.save_png(os.path.join(workdir, "reconstructions", f"step_{step:08d}.png"), grid)


def evaluate(params, config, cfg: vq.VQConfig, vq_def, mesh, *, num_images: int, grid_images: int = 0):
    """Reconstruction MSE / PSNR and codebook usage over the eval split. Returns (metrics, originals, recons)."""
    batch_sharding = sharding_lib.batch_sharding(mesh, sharding_lib.rules_from_config(None), ndim=4)
    mask_sharding = sharding_lib.batch_sharding(mesh, sharding_lib.rules_from_config(None), ndim=1)
    step = _jitted_eval(vq_def, cfg, int(config.eval.crop))
    local_batch = config.eval.batch_size // jax.process_count()
    totals, hist, originals, recons = None, None, [], []
    for images, valid in eval_batches(config, local_batch, num_images):
        g_images = jax.make_array_from_process_local_data(batch_sharding, images)
        g_valid = jax.make_array_from_process_local_data(mask_sharding, valid)
        sums, h, recon = step(params, g_images, g_valid)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        hist = h if hist is None else hist + h
        if sum(len(o) for o in originals) < grid_images:
            originals.append(multihost_utils.process_allgather(g_images, tiled=True))
            recons.append(multihost_utils.process_allgather(recon, tiled=True))
    if totals is None:
        raise ValueError(f"the eval split {config.data.eval_split!r} of {config.data.image_source!r} is empty.")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    mse = float(totals["mse"]) / count
    metrics = {"mse": mse, "psnr": float(totals["psnr"]) / count, "psnr_of_mean_mse": -10 * math.log10(mse),
               "images": count, **usage(jax.device_get(hist))}
    if grid_images:
        originals = np.concatenate(originals)[:grid_images]
        recons = np.concatenate(recons)[:grid_images]
    return metrics, originals, recons


@functools.lru_cache(maxsize=8)
def _jitted_eval(vq_def, cfg, crop):
    return jax.jit(functools.partial(eval_step, vq_def=vq_def, cfg=cfg, crop=crop))


def usage(hist) -> dict[str, float]:
    return {f"code_{k}": v for k, v in losses_lib.usage_stats(hist).items()}


def export(workdir, model: vq.VQModel) -> epath.Path:
    """Params-only copy of the final tokenizer at WORKDIR/tokenizer (replacing an older export)."""
    directory = ckpt_lib.as_path(workdir) / EXPORT_DIR
    if jax.process_index() == 0 and directory.exists():
        directory.rmtree()
    multihost_utils.sync_global_devices("tokenizer export: old copy removed")
    return ckpt_lib.save_params(directory, model)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"disc_weight": 0.5}} -> {"loss.disc_weight": 0.5}, non-scalars as strings (for hparams)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, bool, str)) else str(v)
    return out


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Train the tokenizer of `config.tokenizer` as `config` says; returns the final evaluation metrics."""
    workdir = os.fspath(workdir)
    if "://" not in workdir:  # orbax needs absolute local paths
        workdir = os.path.abspath(workdir)
    cfg = vq.from_config_dict(config.tokenizer)
    _check_config(config, cfg)
    loss_cfg, t = config.loss, config.train

    # Logging.
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

    # Mesh: tokenizer replicated, batch split over the batch axes.
    mesh = mesh_lib.create_mesh(dict(config.mesh))
    replicated = sharding_lib.replicated(mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh, sharding_lib.rules_from_config(None), ndim=4)
    shards = mesh_lib.num_batch_shards(mesh)
    if t.batch_size % shards or t.batch_size % jax.process_count() or config.eval.batch_size % shards:
        raise ValueError(f"train.batch_size={t.batch_size} and eval.batch_size={config.eval.batch_size} must be "
                         f"multiples of the {shards} batch shards and of the {jax.process_count()} processes.")

    # Losses that need files are checked before any work.
    perceptual = None
    if loss_cfg.perceptual_weight > 0:
        perceptual = jax.device_put(losses_lib.load_perceptual_weights(loss_cfg.perceptual_weights), replicated)
        logging.info("perceptual loss (LPIPS VGG16) from %s, weight %g", loss_cfg.perceptual_weights,
                     loss_cfg.perceptual_weight)
    else:
        logging.warning("perceptual loss OFF (loss.perceptual_weight=0): L2 + codebook losses only%s.",
                        " + PatchGAN" if loss_cfg.disc_weight > 0 else "")

    # Input.
    loader = make_train_loader(config, t.batch_size // jax.process_count())
    data_iter = iter(loader)

    # Model and optimizer.
    vq_def, abstract_params, disc_def, disc_abstract = abstract_models(cfg, loss_cfg)
    logging.info("tokenizer %s: %s parameters, %dx downsampling, %d codes of dim %d", config.tokenizer.name,
                 f"{sum(x.size for x in jax.tree.leaves(abstract_params)):,}", cfg.downsample, cfg.codebook_size,
                 cfg.codebook_dim)
    opt = dict(config.optimizer)
    schedule = optim.learning_rate_schedule(opt, t.num_steps, optim.warmup_steps(opt, 1.0))
    tx = optim.make_optimizer(opt, schedule, _no_decay_specs(abstract_params))
    disc_tx = None
    if loss_cfg.disc_weight > 0:
        disc_opt = dict(opt, lr=opt["disc_lr"], schedule="constant", warmup_steps=0)
        disc_tx = optim.make_optimizer(disc_opt, optim.learning_rate_schedule(disc_opt, t.num_steps, 0),
                                       _no_decay_specs(disc_abstract))
    abstract_state = jax.eval_shape(functools.partial(state_from_params, tx=tx, disc_tx=disc_tx), abstract_params,
                                    disc_abstract)
    state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                                  state_shardings)

    # Checkpoint: resume from the workdir when it holds one.
    checkpointer = ckpt_lib.TrainCheckpointer(workdir, max_to_keep=t.keep_checkpoints,
                                              save_every_steps=t.checkpoint_every)
    checkpointer.install_sigterm_handler()
    latest = checkpointer.latest_step()
    if latest is not None:
        logging.info("resuming from step %d of %s", latest, workdir)
        state = checkpointer.restore(latest, abstract_state, data_iter)
    else:
        state = jax.jit(functools.partial(init_state, cfg, loss_cfg, config.seed, tx, disc_tx),
                        out_shardings=state_shardings)()
    start = int(jax.device_get(state["step"]))

    # The update steps: without and with the adversarial loss (switched on at loss.disc_start).
    def make_step(gan: bool):
        fn = functools.partial(train_step, vq_def=vq_def, disc_def=disc_def, tx=tx, disc_tx=disc_tx,
                               loss_cfg=loss_cfg, perceptual=perceptual, gan=gan, cfg=cfg)
        return jax.jit(fn, in_shardings=(state_shardings, batch_sharding, replicated),
                       out_shardings=(state_shardings, replicated, replicated), donate_argnums=0)
    steps = {False: make_step(False)}
    if loss_cfg.disc_weight > 0:
        steps[True] = make_step(True)
    rng = jax.random.key(config.seed + 2)

    writer.write_hparams(_flat(config.to_dict()))
    report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer, every_steps=t.log_every,
                                             every_secs=None)
    window, window_hist, window_start = [], None, time.perf_counter()
    eval_metrics: dict[str, float] = {}
    logging.info("training steps %d..%d, batch %d", start, t.num_steps, t.batch_size)
    step = start
    with jax.set_mesh(mesh):
        while step < t.num_steps:
            images = jax.make_array_from_process_local_data(batch_sharding, next(data_iter))
            gan = loss_cfg.disc_weight > 0 and step >= loss_cfg.disc_start
            state, metrics, hist = steps[gan](state, images, rng)
            step += 1
            window.append(metrics)
            window_hist = hist if window_hist is None else window_hist + hist
            report(step)

            if step % t.log_every == 0 or step == t.num_steps:
                means = {k: float(np.mean([m[k] for m in jax.device_get(window) if k in m]))
                         for k in window[-1]}
                if not all(math.isfinite(v) for v in means.values()):
                    checkpointer.close()
                    bad = sorted(k for k, v in means.items() if not math.isfinite(v))
                    raise FloatingPointError(f"non-finite {bad} at step {step}; the last good checkpoint is kept in "
                                             f"{checkpointer.directory} (lower optimizer.lr or check the data).")
                means.update(usage(jax.device_get(window_hist)))
                means["learning_rate"] = float(schedule(step))
                means["images_per_sec"] = len(window) * t.batch_size / (time.perf_counter() - window_start)
                writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                logging.info("step %d: loss %.4f, rec %.4f, psnr %.2f, codes used %.1f%% (%d dead), %.1f img/s",
                             step, means["loss"], means["reconstruction"], means["psnr"], 100 * means["code_usage"],
                             means["code_dead_codes"], means["images_per_sec"])
                window, window_hist, window_start = [], None, time.perf_counter()

            last = step == t.num_steps
            if t.eval_every and (step % t.eval_every == 0 or last):
                num = config.eval.final_num_images if last else config.eval.num_images
                eval_metrics, originals, recons = evaluate(state["params"], config, cfg, vq_def, mesh,
                                                           num_images=num, grid_images=t.grid_images)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                path = _write_grid(writer, workdir, step, originals, recons) if jax.process_index() == 0 else ""
                logging.info("eval at step %d on %d images: mse %.5f, psnr %.2f dB, codes used %.1f%% (%d dead); "
                             "grid %s", step, eval_metrics["images"], eval_metrics["mse"], eval_metrics["psnr"],
                             100 * eval_metrics["code_usage"], eval_metrics["code_dead_codes"], path)

            preempted = checkpointer.preempted(step)
            checkpointer.save(step, state, data_iter, cfg, force=last or preempted)
            if preempted and not last:
                checkpointer.close()
                logging.warning("stopped at step %d after a preemption signal; rerun the same command to resume.",
                                step)
                writer.flush()
                return eval_metrics
    checkpointer.close()
    if start >= t.num_steps and t.eval_every:  # resumed a finished run: report its numbers again
        eval_metrics, _, _ = evaluate(state["params"], config, cfg, vq_def, mesh,
                                      num_images=config.eval.final_num_images)
    path = export(workdir, nnx.merge(vq_def, state["params"]))
    logging.info("tokenizer written to %s (load it with par_jax.tokenizer.load)", path)
    writer.flush()
    return eval_metrics
