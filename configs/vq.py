r"""Training a VQ tokenizer (the train_tokenizer job, `par_jax.tokenizer.train`).

Arguments (comma-separated, all optional):
  vq16           LlamaGen's VQ-16 on ImageNet (the default): 16x downsampling, 16384 codes of dim 8, L2 + LPIPS +
                 PatchGAN (weight 0.5 from step 20k), Adam lr 1e-4, betas (0.9, 0.95), batch 128, 40 epochs
  fmnist         the small tokenizer for Fashion-MNIST (28x28 padded to 32x32 -> 8x8 tokens, 512 codes), L2 and
                 codebook losses only, minutes on a CPU
  video          the causal 3D video tokenizer (MAGVIT-v2 style) on moving Fashion-MNIST: 17 frames at 32 px ->
                 5 x 8 x 8 codes (4x in time: the first frame alone, then groups of 4; 4x in space), 512 codes of
                 dim 8, widths 8/16/32 (0.58M parameters), L2 and codebook losses, batch 8, 300 steps; its 3D
                 kernels start on the newest frame(s) only (VideoVQConfig.inflate_init) and codes unused for 10 steps
                 are re-seeded from the batch's encoder outputs (train.dead_code_restart=10; images: 0, off). Measured
                 on this project's 2-core CPU while it was shared with other jobs (load average ~17): 2.2 s per
                 step at batch 8 after a ~65 s compile, so about 12 minutes in all; a quiet machine is faster
  video,per_frame  the per-frame baseline: the image encoder/decoder on every frame, 17 x 8 x 8 codes
  res=256        vq16's image resolution
  runlocal       shrink the same experiment to a smoke run of a few minutes on one CPU

Launch:
  python -m par_jax.main --config=configs/vq.py:fmnist --workdir=workdirs/tokenizer_fmnist
  python -m par_jax.main --config=configs/vq.py:vq16 --workdir=gs://BUCKET/vq16 \
      --config.data.image_source=tfds:imagenet2012 --config.loss.perceptual_weights=/path/lpips_vgg16.safetensors
  python -m par_jax.main --config=configs/vq.py:video --workdir=workdirs/tokenizer_video
  python -m par_jax.main --config=configs/vq.py:video --workdir=workdirs/tokenizer_ucf \
      --config.data.video_source=tfds:ucf101 --config.data.frame_size=64 --config.tokenizer.frame_size=64
Local smoke run:
  python -m par_jax.main --config=configs/vq.py:vq16,runlocal --workdir=/tmp/vq_local
Reconstruction quality of a trained or converted tokenizer (metrics.json and a grid under WORKDIR/eval_tokenizer):
  python -m par_jax.main --job=evaluate_tokenizer --config=configs/vq.py:fmnist --workdir=workdirs/tokenizer_fmnist
  (--config.eval.tokenizer=PATH scores another checkpoint; eval.final_num_images <= 0 means the whole split)
Any field can be overridden, e.g. --config.tokenizer.codebook_size=1024 --config.train.num_steps=5000.
The trained tokenizer is `par_jax.tokenizer.load(WORKDIR)` (or WORKDIR/tokenizer, the final export).
"""

import dataclasses

import ml_collections

from par_jax.core import config_args

IMAGENET_TRAIN_IMAGES = 1_281_167
VIDEO_BATCH = 8
VIDEO_STEPS = 300


def _tokenizer_section(name: str, **overrides) -> ml_collections.ConfigDict:
    # Every VQConfig field is present, so each can be overridden on the command line. (Imported here: the arguments
    # are checked before jax is.)
    from par_jax.tokenizer import vq  # noqa: PLC0415

    fields = dataclasses.asdict(vq.vq_config(name, **overrides))
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return ml_collections.ConfigDict(dict(name=name, **fields))


def _video_tokenizer_section(name: str, **overrides) -> ml_collections.ConfigDict:
    from par_jax.tokenizer import video_vq  # noqa: PLC0415

    fields = dataclasses.asdict(video_vq.video_vq_config(name, **overrides))
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return ml_collections.ConfigDict(dict(name=name, **fields))


def _video_config(config, a) -> ml_collections.ConfigDict:
    name = "video_per_frame" if a.per_frame else "video"
    config.tokenizer = _video_tokenizer_section(name)
    config.data = ml_collections.ConfigDict(dict(
        video_source="moving_fashion_mnist", train_split="train", eval_split="test", num_frames=17, frame_size=32,
        frame_stride=1, tfds_data_dir="", download=False, count=0, seed=0,
        worker_count=0, read_threads=1, prefetch=4))
    config.loss = ml_collections.ConfigDict(dict(
        reconstruction_weight=1.0, codebook_weight=1.0, perceptual_weight=0.0, perceptual_weights="",
        disc_weight=0.0, disc_start=0, disc_channels=16, disc_layers=2))
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, disc_lr=1e-4, schedule="cosine", warmup_steps=50, warmup_epochs=0.0, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.0, grad_clip=1.0))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=VIDEO_BATCH, num_steps=VIDEO_STEPS, log_every=25, eval_every=VIDEO_STEPS, checkpoint_every=100,
        keep_checkpoints=2, grid_images=8, dead_code_restart=10))
    # Counts are clips; the garment moves over the whole canvas, so every pixel is scored (crop 0).
    config.eval = ml_collections.ConfigDict(dict(batch_size=16, num_images=64, final_num_images=256, crop=0,
                                                 tokenizer=""))
    if a.runlocal:
        config.train.update(num_steps=10, log_every=5, eval_every=10, checkpoint_every=10, grid_images=4,
                            batch_size=4)
        config.eval.update(batch_size=4, num_images=8, final_num_images=8)
        config.optimizer.warmup_steps = 2
    return config


def get_config(arg: str = ""):
    a = config_args.parse_arg(arg, vq16=False, fmnist=False, video=False, per_frame=False, res=256, runlocal=False)
    if a.vq16 + a.fmnist + a.video > 1:
        given = [name for name in ("vq16", "fmnist", "video") if getattr(a, name)]
        raise config_args.UsageError(f"config arguments {' and '.join(given)} exclude each other; choose one of "
                                     f"vq16, fmnist, video.")
    if a.per_frame and not a.video:
        raise config_args.UsageError("config argument per_frame chooses the video baseline; use video,per_frame.")
    name = "fmnist" if a.fmnist else "vq16"

    config = ml_collections.ConfigDict()
    config.arg = arg or ""
    config.job = "train_tokenizer"
    config.seed = 0
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    if a.video:
        return _video_config(config, a)

    if name == "vq16":
        config.tokenizer = _tokenizer_section("vq16", image_size=a.res, dtype="bfloat16")
        config.data = ml_collections.ConfigDict(dict(
            image_source="tfds:imagenet2012", train_split="train", eval_split="validation", image_size=a.res,
            train_view="random_crop", eval_view="center", flip=True,
            tfds_data_dir="", download=False, synthetic_count=256, seed=0,
            worker_count=16, read_threads=16, prefetch=256))
        config.loss = ml_collections.ConfigDict(dict(
            reconstruction_weight=1.0, codebook_weight=1.0,
            perceptual_weight=1.0, perceptual_weights="",   # a VGG16 + LPIPS weights file (see tokenizer/losses.py)
            disc_weight=0.5, disc_start=20_000, disc_channels=64, disc_layers=3))
        # The release trains with plain Adam (its weight-decay flag is never used), a constant lr and clipping at 1.
        config.optimizer = ml_collections.ConfigDict(dict(
            lr=1e-4, disc_lr=1e-4, schedule="constant", warmup_steps=0, warmup_epochs=0.0, b1=0.9, b2=0.95,
            eps=1e-8, weight_decay=0.0, grad_clip=1.0))
        batch = 128
        config.train = ml_collections.ConfigDict(dict(
            batch_size=batch, num_steps=40 * IMAGENET_TRAIN_IMAGES // batch, log_every=100, eval_every=10_000,
            checkpoint_every=5_000, keep_checkpoints=3, grid_images=32, dead_code_restart=0))
        config.eval = ml_collections.ConfigDict(dict(batch_size=64, num_images=1_000, final_num_images=50_000,
                                                     crop=0, tokenizer=""))
    else:
        config.tokenizer = _tokenizer_section("fmnist")
        config.data = ml_collections.ConfigDict(dict(
            image_source="fashion_mnist", train_split="train", eval_split="test", image_size=32,
            train_view="pad", eval_view="pad", flip=False,
            tfds_data_dir="", download=False, synthetic_count=256, seed=0,
            worker_count=0, read_threads=1, prefetch=4))
        config.loss = ml_collections.ConfigDict(dict(
            reconstruction_weight=1.0, codebook_weight=1.0, perceptual_weight=0.0, perceptual_weights="",
            disc_weight=0.0, disc_start=0, disc_channels=16, disc_layers=2))
        config.optimizer = ml_collections.ConfigDict(dict(
            lr=1e-3, disc_lr=1e-4, schedule="cosine", warmup_steps=100, warmup_epochs=0.0, b1=0.9, b2=0.95,
            eps=1e-8, weight_decay=0.0, grad_clip=1.0))
        config.train = ml_collections.ConfigDict(dict(
            batch_size=32, num_steps=1_500, log_every=100, eval_every=500, checkpoint_every=250,
            keep_checkpoints=2, grid_images=32, dead_code_restart=0))
        # Scores use the 28x28 centre (the original image), not the black padding.
        config.eval = ml_collections.ConfigDict(dict(batch_size=250, num_images=1_000, final_num_images=0,
                                                     crop=28, tokenizer=""))

    if a.runlocal:
        config.data.worker_count, config.data.read_threads, config.data.prefetch = 0, 1, 2
        config.train.update(num_steps=20, log_every=5, eval_every=10, checkpoint_every=10, grid_images=8)
        config.eval.update(batch_size=8, num_images=16, final_num_images=16)
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, 5)
        if name == "vq16":
            # The same architecture family, narrow and at 32px on synthetic pictures; the GAN switches on mid-run.
            config.tokenizer = _tokenizer_section("vq16", image_size=32, base_channels=32, z_channels=32,
                                                  codebook_size=1024, dtype="float32")
            config.data.update(image_source="synthetic", train_split="train", eval_split="test", image_size=32,
                               train_view="random_crop", eval_view="center")
            config.loss.update(perceptual_weight=0.0, disc_start=10, disc_channels=16, disc_layers=2)
            config.train.batch_size = 8
        else:
            config.train.batch_size = 16
    return config
