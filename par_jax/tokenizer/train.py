r"""The train_tokenizer job: train a VQ tokenizer on images or clips, evaluate its reconstructions, checkpoint and
resume.

    python -m par_jax.main --config=configs/vq.py:fmnist --workdir=workdirs/tokenizer_fmnist
    python -m par_jax.main --config=configs/vq.py:video --workdir=workdirs/tokenizer_video
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

Video tokenizers (a `config.tokenizer` with `kind`, `video_vq.VideoVQConfig`) train on uint8 clips (B, T, S, S, 3)
from `par_jax.data.video_pipeline` with the same loop and losses; LPIPS and the PatchGAN score every frame as an
image. Evaluation reports per-frame PSNR and code usage, and reconstructions are written as an animated GIF
(originals beside reconstructions) and a PNG frame strip.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from par_jax.data import image_pipeline
from par_jax.data import video_pipeline
from par_jax.tokenizer import losses as losses_lib
from par_jax import tokenizer as tokenizer_lib
from par_jax.core import checkpoint as ckpt_lib
from par_jax.core import loop
from par_jax.core import mesh as mesh_lib
from par_jax.core.config_args import UsageError
from par_jax.core import optim
from par_jax.core import sharding as sharding_lib
from par_jax.utils import images as images_lib
from par_jax.utils import video as video_utils

EXPORT_DIR = "tokenizer"
NONFINITE_HINT = "Lower optimizer.lr (or raise its warmup) or check the images."


def to_float(images):
    return images.astype(jnp.float32) / 127.5 - 1.0


def is_video(cfg) -> bool:
    return isinstance(cfg, tokenizer_lib.VideoVQConfig)


def batch_ndim(cfg) -> int:
    """Rank of an input batch: (B, S, S, 3) images or (B, T, S, S, 3) clips."""
    return 5 if is_video(cfg) else 4


def pipeline(cfg):
    """The input module for the tokenizer's kind: `make_train_loader` and `eval_batches` over images or clips."""
    return video_pipeline if is_video(cfg) else image_pipeline


def frames(x):
    """Clips (B, T, H, W, C) as a batch of frames (B * T, H, W, C); images unchanged. The perceptual loss and the
    PatchGAN judge pictures, so a video tokenizer's are scored frame by frame."""
    return x.reshape((-1,) + x.shape[-3:])


# ----- state --------------------------------------------------------------------------------------------------

def _no_decay_specs(params) -> Any:
    # optim.decay_mask decays every parameter whose logical names lack "norm": mark biases and norm gains (1-D).
    return jax.tree.map(lambda x: ("norm",) if x.ndim == 1 else (None,) * x.ndim, params)


def _discriminator(cfg, loss_cfg, seed: int) -> losses_lib.PatchDiscriminator:
    return losses_lib.PatchDiscriminator(loss_cfg.disc_channels, loss_cfg.disc_layers, cfg.in_channels,
                                         rngs=nnx.Rngs(seed))


def abstract_models(cfg, loss_cfg):
    """(vq graphdef, vq params, discriminator graphdef, discriminator params) as abstract shapes, nothing allocated;
    the discriminator entries are None without the adversarial loss. (Building an NNX model is slow Python: build
    each once.)"""
    vq_def, vq_params = nnx.split(nnx.eval_shape(lambda: tokenizer_lib.build(cfg, nnx.Rngs(0))), nnx.Param)
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


def init_state(cfg, loss_cfg, seed: int, tx, disc_tx) -> dict:
    """A fresh training state (jit it with out_shardings to create it in place)."""
    params = nnx.to_pure_dict(nnx.state(tokenizer_lib.build(cfg, nnx.Rngs(seed)), nnx.Param))
    disc_params = None
    if loss_cfg.disc_weight > 0:
        disc_params = nnx.to_pure_dict(nnx.state(_discriminator(cfg, loss_cfg, seed + 1), nnx.Param))
    return state_from_params(params, disc_params, tx, disc_tx)


def with_code_ages(state: dict, codebook_size: int) -> dict:
    """The state a step with dead-code restarts takes: plus "code_age" (K,) int32, the steps since each code was
    last chosen. Checkpoints leave it out (a resumed run counts from zero again), so they keep one format."""
    return {**state, "code_age": jnp.zeros((codebook_size,), jnp.int32)}


def restart_dead_codes(params, code_age, hist, latent, key, after: int):
    """Dead-code restart: every code not chosen for `after` consecutive steps is replaced by an encoder output of
    this batch (distinct ones while the batch has at least as many latents as the codebook has codes), so it sits
    where the encoder puts its outputs and gets chosen again. Returns (params, code_age, number restarted)."""
    emb = params["quantize"]["embedding"]
    z = latent.reshape(-1, latent.shape[-1]).astype(emb.dtype)
    age = jnp.where(hist > 0, 0, code_age + 1)
    dead = age >= after
    picks = jax.random.choice(key, z.shape[0], (emb.shape[0],), replace=z.shape[0] < emb.shape[0])
    emb = jnp.where(dead[:, None], z[picks], emb)
    params = {**params, "quantize": {**params["quantize"], "embedding": emb}}
    return params, jnp.where(dead, 0, age), jnp.sum(dead)


# ----- the update step ----------------------------------------------------------------------------------------

def train_step(state, images, rng, *, vq_def, disc_def, tx, disc_tx, loss_cfg, perceptual, gan: bool, cfg,
               restart: int = 0):
    """One generator update (and one discriminator update when `gan`). images: uint8 (B, S, S, 3), or clips
    (B, T, S, S, 3) for a video tokenizer. `restart` > 0 re-seeds codes unused for that many steps
    (`restart_dead_codes`; the state then carries "code_age", see `with_code_ages`).

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
            p = jnp.mean(losses_lib.perceptual_loss(perceptual, frames(x), frames(recon)))
            total = total + loss_cfg.perceptual_weight * p
            aux["perceptual"] = p
        if gan:
            disc = nnx.merge(disc_def, disc_state["params"])
            g = losses_lib.hinge_g_loss(disc(frames(recon)))
            total = total + loss_cfg.disc_weight * g
            aux["generator_adv"] = g
        return total, (aux, recon, q.codes, q.latent)

    (loss, (aux, recon, codes, latent)), grads = jax.value_and_grad(generator_loss, has_aux=True)(state["params"])
    updates, opt_vq = tx.update(grads, state["opt_state"]["vq"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates),
               "param_norm": optax.global_norm(params),
               "psnr": jnp.mean(psnr(frames(x), frames(jnp.clip(recon, -1, 1))))}
    opt_state = dict(state["opt_state"], vq=opt_vq)

    if gan:
        fake = jax.lax.stop_gradient(recon)

        def discriminator_loss(dparams):
            disc = nnx.merge(disc_def, dparams)
            real_logits, fake_logits = disc(frames(x)), disc(frames(fake))
            d = loss_cfg.disc_weight * losses_lib.hinge_d_loss(real_logits, fake_logits)
            return d, (jnp.mean(real_logits), jnp.mean(fake_logits))

        (d_loss, (lr_, lf_)), dgrads = jax.value_and_grad(discriminator_loss, has_aux=True)(disc_state["params"])
        dupdates, dopt = disc_tx.update(dgrads, disc_state["opt_state"], disc_state["params"])
        opt_state["discriminator"] = {"params": optax.apply_updates(disc_state["params"], dupdates),
                                      "opt_state": dopt}
        metrics.update(disc_loss=d_loss, logits_real=lr_, logits_fake=lf_, disc_grad_norm=optax.global_norm(dgrads))

    hist = losses_lib.code_histogram(codes, cfg.codebook_size)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if restart:
        key = jax.random.fold_in(jax.random.fold_in(rng, state["step"]), 1)
        new_state["params"], new_state["code_age"], metrics["restarted_codes"] = restart_dead_codes(
            params, state["code_age"], hist, latent, key, restart)
    return new_state, metrics, hist


def psnr(x, y):
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR of [0, 1] images)."""
    mse = jnp.mean(((x - y) / 2.0) ** 2, axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def eval_step(params, images, valid, *, vq_def, cfg, crop: int):
    """Sums over the valid images (or clips) of one batch: squared error (in [0, 1] units), PSNR (a clip's is the
    mean PSNR of its frames; clips also sum it per frame index); and the code histogram.

    `crop` > 0 scores only the centre crop x crop pixels (e.g. the 28x28 of Fashion-MNIST padded to 32x32).
    """
    model = nnx.merge(vq_def, params)
    x = to_float(images)
    codes = model.encode(x)
    recon = model.decode(codes)
    xs, rs = x, recon
    if crop:
        o = (x.shape[-2] - crop) // 2
        xs, rs = x[..., o:o + crop, o:o + crop, :], recon[..., o:o + crop, o:o + crop, :]
    w = valid.astype(jnp.float32)
    se = jnp.mean(((xs - rs) / 2.0) ** 2, axis=tuple(range(1, x.ndim)))
    frame_psnr = psnr(frames(xs), frames(rs)).reshape(x.shape[0], -1)  # (B, T) for clips, (B, 1) for images
    sums = {"mse": jnp.sum(se * w), "psnr": jnp.sum(frame_psnr.mean(axis=1) * w), "count": jnp.sum(w)}
    if x.ndim == 5:  # by frame index: a causal tokenizer encodes frame 0 alone, the rest in groups
        sums["psnr_by_frame"] = jnp.sum(frame_psnr * w[:, None], axis=0)
    hist = jnp.bincount(jnp.where(valid.reshape((-1,) + (1,) * (codes.ndim - 1)), codes, cfg.codebook_size)
                        .reshape(-1), length=cfg.codebook_size + 1)[:-1]
    return sums, hist, recon


# ----- the job ------------------------------------------------------------------------------------------------

def _check_config(config, cfg):
    d, t = config.data, config.train
    if is_video(cfg):
        try:
            cfg.latent_shape(d.num_frames, d.frame_size)
        except ValueError as e:
            raise UsageError(f"data.num_frames={d.num_frames}, data.frame_size={d.frame_size}: {e}") from None
        if d.frame_size != cfg.frame_size:
            logging.warning("data.frame_size=%d differs from tokenizer.frame_size=%d; training at %d.", d.frame_size,
                            cfg.frame_size, d.frame_size)
    elif d.image_size % cfg.downsample:
        raise UsageError(f"data.image_size={d.image_size} is not a multiple of the tokenizer's downsampling "
                         f"factor {cfg.downsample}.")
    elif d.image_size != cfg.image_size:
        logging.warning("data.image_size=%d differs from tokenizer.image_size=%d; training at %d.", d.image_size,
                        cfg.image_size, d.image_size)
    if t.num_steps < 1 or t.batch_size < 1 or t.log_every < 1:
        raise UsageError("train.num_steps, train.batch_size and train.log_every must be positive.")
    if t.get("dead_code_restart", 0) < 0:
        raise UsageError("train.dead_code_restart must be >= 0 (0: off; n: re-seed codes unused for n steps).")
    if config.loss.disc_weight > 0 and config.loss.disc_start < 0:
        raise UsageError("loss.disc_start must be >= 0.")


def reconstruction_grid(originals, reconstructions, pairs_per_row: int = 8, min_side: int = 96) -> np.ndarray:
    """uint8 grid of cells, each an original (left) beside its reconstruction (right) split by a grey line; small
    images are enlarged (nearest neighbour) to at least `min_side` pixels so that a person can see the difference."""
    originals, reconstructions = images_lib.to_uint8(originals), images_lib.to_uint8(reconstructions)
    scale = max(1, -(-min_side // originals.shape[1]))
    line = np.full(originals.shape[:2] + (1,) + originals.shape[3:], 128, np.uint8)
    cells = np.concatenate([originals, line, reconstructions], axis=2)
    cells = cells.repeat(scale, axis=1).repeat(scale, axis=2)
    return images_lib.make_grid(cells, rows=max(1, -(-len(cells) // pairs_per_row)), pad=4 * scale)


def reconstruction_clip(originals, reconstructions, pairs_per_row: int = 4) -> np.ndarray:
    """uint8 clip (T, H', W', 3) whose frame t is the `reconstruction_grid` of frame t of every clip pair."""
    return np.stack([reconstruction_grid(originals[:, t], reconstructions[:, t], pairs_per_row)
                     for t in range(originals.shape[1])])


def reconstruction_strip(originals, reconstructions, clips: int = 4) -> np.ndarray:
    """uint8 picture of the first `clips` clips' frames left to right, each original's row above its
    reconstruction's."""
    pairs = np.stack([images_lib.to_uint8(originals[:clips]), images_lib.to_uint8(reconstructions[:clips])], axis=1)
    return video_utils.frame_strip(pairs.reshape((-1,) + pairs.shape[2:]))


def write_reconstructions(directory, name: str, originals, reconstructions, writer=None, step: int = 0) -> str:
    """Write originals beside reconstructions under `directory`: NAME.png for images; for clips NAME.gif (animated)
    and NAME_frames.png (a frame strip). With a CLU `writer`, the picture (or strip) goes to it too. Returns the
    path of the main file."""
    directory = epath.Path(directory)
    if originals.ndim == 5:
        strip = reconstruction_strip(originals, reconstructions)
        if writer is not None:
            writer.write_images(step, {"reconstructions": strip[None]})
        images_lib.save_png(str(directory / f"{name}_frames.png"), strip)
        return video_utils.write_gif(reconstruction_clip(originals, reconstructions), directory / f"{name}.gif",
                                     min_side=0)
    grid = reconstruction_grid(originals, reconstructions)
    if writer is not None:
        writer.write_images(step, {"reconstructions": grid[None]})
    return images_lib.save_png(str(directory / f"{name}.png"), grid)


def _write_grid(writer, workdir, step, originals, reconstructions):
    return write_reconstructions(epath.Path(workdir) / "reconstructions", f"step_{step:08d}", originals,
                                 reconstructions, writer, step)


def evaluate(params, config, cfg, vq_def, mesh, *, num_images: int, grid_images: int = 0):
    """Reconstruction MSE / PSNR and codebook usage over the eval split (images, or clips for a video tokenizer:
    `num_images` and `grid_images` then count clips). Returns (metrics, originals, recons)."""
    batch_sharding = sharding_lib.batch_sharding(mesh, sharding_lib.rules_from_config(None), ndim=batch_ndim(cfg))
    mask_sharding = sharding_lib.batch_sharding(mesh, sharding_lib.rules_from_config(None), ndim=1)
    step = _jitted_eval(vq_def, cfg, int(config.eval.crop))
    local_batch = config.eval.batch_size // jax.process_count()
    totals, hist, originals, recons = None, None, [], []
    for images, valid in pipeline(cfg).eval_batches(config, local_batch, num_images):
        g_images = jax.make_array_from_process_local_data(batch_sharding, images)
        g_valid = jax.make_array_from_process_local_data(mask_sharding, valid)
        sums, h, recon = step(params, g_images, g_valid)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        hist = h if hist is None else hist + h
        if sum(len(o) for o in originals) < grid_images:
            originals.append(multihost_utils.process_allgather(g_images, tiled=True))
            recons.append(multihost_utils.process_allgather(recon, tiled=True))
    if totals is None:
        source = config.data.video_source if is_video(cfg) else config.data.image_source
        raise ValueError(f"the eval split {config.data.eval_split!r} of {source!r} is empty.")
    totals = jax.device_get(totals)
    count = float(totals["count"])
    mse = float(totals["mse"]) / count
    metrics = {"mse": mse, "psnr": float(totals["psnr"]) / count, "psnr_of_mean_mse": -10 * math.log10(mse),
               ("clips" if is_video(cfg) else "images"): count, **usage(jax.device_get(hist))}
    if "psnr_by_frame" in totals:
        metrics["psnr_by_frame"] = [round(float(v) / count, 4) for v in totals["psnr_by_frame"]]
    if grid_images:
        originals = np.concatenate(originals)[:grid_images]
        recons = np.concatenate(recons)[:grid_images]
    return metrics, originals, recons


@functools.lru_cache(maxsize=8)
def _jitted_eval(vq_def, cfg, crop):
    return jax.jit(functools.partial(eval_step, vq_def=vq_def, cfg=cfg, crop=crop))


def usage(hist) -> dict[str, float]:
    return {f"code_{k}": v for k, v in losses_lib.usage_stats(hist).items()}


def export(workdir, model) -> epath.Path:
    """Params-only copy of the final tokenizer at WORKDIR/tokenizer (replacing an older export)."""
    directory = ckpt_lib.as_path(workdir) / EXPORT_DIR
    if jax.process_index() == 0 and directory.exists():
        directory.rmtree()
    multihost_utils.sync_global_devices("tokenizer export: old copy removed")
    return ckpt_lib.save_params(directory, model)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Train the tokenizer of `config.tokenizer` as `config` says; returns the final evaluation metrics."""
    cfg = tokenizer_lib.config_from_block(config.tokenizer)
    _check_config(config, cfg)
    loss_cfg, t = config.loss, config.train

    # Mesh: tokenizer replicated, batch split over the batch axes.
    mesh = mesh_lib.create_mesh(dict(config.mesh))
    replicated = sharding_lib.replicated(mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh, sharding_lib.rules_from_config(None), ndim=batch_ndim(cfg))
    shards = mesh_lib.num_batch_shards(mesh)
    if t.batch_size % shards or t.batch_size % jax.process_count() or config.eval.batch_size % shards:
        raise UsageError(f"train.batch_size={t.batch_size} and eval.batch_size={config.eval.batch_size} must be "
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
    loader = pipeline(cfg).make_train_loader(config, t.batch_size // jax.process_count())
    data_iter = iter(loader)

    # Model and optimizer.
    vq_def, abstract_params, disc_def, disc_abstract = abstract_models(cfg, loss_cfg)
    logging.info("tokenizer %s: %s parameters, %dx downsampling%s, %d codes of dim %d", config.tokenizer.name,
                 f"{sum(x.size for x in jax.tree.leaves(abstract_params)):,}", cfg.downsample,
                 f" ({cfg.kind}, {cfg.temporal_downsample}x in time)" if is_video(cfg) else "", cfg.codebook_size,
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

    # The run (workdir lock, writers, checkpoints, progress): resume from the workdir when it holds a checkpoint.
    run = loop.Run(workdir, config, job="train_tokenizer", total_steps=t.num_steps, log_every=t.log_every,
                   checkpoint=loop.CheckpointSettings(every_steps=t.checkpoint_every, keep=t.keep_checkpoints))
    writer = run.writer
    try:
        start, state = run.resume(abstract_state, data_iter, cfg, tokenizer_lib.RUNTIME_FIELDS)
        if state is None:
            state = jax.jit(functools.partial(init_state, cfg, loss_cfg, config.seed, tx, disc_tx),
                            out_shardings=state_shardings)()
        # Dead-code restarts carry each code's age through the steps, outside the checkpointed state.
        restart = int(t.get("dead_code_restart", 0))
        step_shardings = state_shardings
        if restart:
            step_shardings = dict(state_shardings, code_age=replicated)
            state = jax.device_put(with_code_ages(state, cfg.codebook_size), step_shardings)

        # The update steps: without and with the adversarial loss (switched on at loss.disc_start).
        def make_step(gan: bool):
            fn = functools.partial(train_step, vq_def=vq_def, disc_def=disc_def, tx=tx, disc_tx=disc_tx,
                                   loss_cfg=loss_cfg, perceptual=perceptual, gan=gan, cfg=cfg, restart=restart)
            return jax.jit(fn, in_shardings=(step_shardings, batch_sharding, replicated),
                           out_shardings=(step_shardings, replicated, replicated), donate_argnums=0)
        steps = {False: make_step(False)}
        if loss_cfg.disc_weight > 0:
            steps[True] = make_step(True)
        rng = jax.random.key(config.seed + 2)

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
                run.step_done(step)

                if step % t.log_every == 0 or step == t.num_steps:
                    means = {k: float(np.mean([m[k] for m in jax.device_get(window) if k in m]))
                             for k in window[-1]}
                    run.check_health(step, means, NONFINITE_HINT)
                    means.update(usage(jax.device_get(window_hist)))
                    means["learning_rate"] = float(schedule(step))
                    means["images_per_sec"] = len(window) * t.batch_size / (time.perf_counter() - window_start)
                    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                    logging.info("step %d: loss %.4f, rec %.4f, psnr %.2f, codes used %.1f%% (%d dead%s), %.1f img/s",
                                 step, means["loss"], means["reconstruction"], means["psnr"], 100 * means["code_usage"],
                                 means["code_dead_codes"],
                                 f", {means['restarted_codes']:.1f} restarted a step" if restart else "",
                                 means["images_per_sec"])
                    window, window_hist, window_start = [], None, time.perf_counter()

                last = step == t.num_steps
                if t.eval_every and (step % t.eval_every == 0 or last):
                    num = config.eval.final_num_images if last else config.eval.num_images
                    eval_metrics, originals, recons = evaluate(state["params"], config, cfg, vq_def, mesh,
                                                               num_images=num, grid_images=t.grid_images)
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()
                                                if not isinstance(v, list)})  # psnr_by_frame: in metrics.json
                    path = _write_grid(writer, run.workdir, step, originals, recons) if jax.process_index() == 0 else ""
                    unit = "clips" if is_video(cfg) else "images"
                    logging.info("eval at step %d on %d %s: mse %.5f, psnr %.2f dB, codes used %.1f%% (%d dead); "
                                 "grid %s", step, eval_metrics[unit], unit, eval_metrics["mse"], eval_metrics["psnr"],
                                 100 * eval_metrics["code_usage"], eval_metrics["code_dead_codes"], path)

                preempted = run.preempted(step)
                if last or preempted or run.should_save(step):
                    # Every metric of this step, the norm of the parameters being saved among them, must be finite.
                    saved = {k: v for k, v in state.items() if k != "code_age"}
                    run.save(step, saved, data_iter, cfg, health=metrics, force=last or preempted,
                             hint=NONFINITE_HINT)
                if preempted and not last:
                    logging.warning("stopped at step %d after a preemption signal; rerun the same command to resume.",
                                    step)
                    return eval_metrics
        if start >= t.num_steps and t.eval_every:  # resumed a finished run: report its numbers again
            eval_metrics, _, _ = evaluate(state["params"], config, cfg, vq_def, mesh,
                                          num_images=config.eval.final_num_images)
        run.checkpointer.wait()
        path = export(run.workdir, nnx.merge(vq_def, state["params"]))
        logging.info("tokenizer written to %s (load it with par_jax.tokenizer.load)", path)
        return eval_metrics
    finally:
        run.close()
