r"""PAR class-conditional decoder on pre-extracted VQ codes (ImageNet by default): the whole experiment.

Arguments (comma-separated `key=value`, all optional; an unknown key or value is an error naming what is allowed):
  size=XL        model size: tiny, small, B, L, XL, XXL, 3B
  n=4            tokens per parallel step (1 = LlamaGen, 4, 16, any square dividing the grid)
  res=384        image resolution, a multiple of 16 (tokens per side = res / 16)
  recipe=paper   training recipe: paper (warmup + cosine, attention dropout 0.1) or release (constant lr)
  runlocal       shrink the same experiment to run on one CPU in minutes (size tiny, 128 px, float32)

Launch (one host; the config is read by path, so any working directory will do):
  python -m par_jax.main --config=configs/par.py:size=XL,n=4,res=384 --workdir=gs://BUCKET/par_xl_4x
Local smoke run:
  python -m par_jax.main --config=configs/par.py:runlocal --workdir=/tmp/par_local
Any field can be overridden, e.g. --config.optimizer.lr=2e-4 --config.train.batch_size=512
(a tuple whole: --config.model.grid_shape=(16,16)).

Sections (each read by one part of par_jax):
  model      decoder fields (par_jax.model.ModelConfig) plus `size`
  data       where the training codes come from (par_jax.data)
  optimizer  AdamW + schedule (PAR_SPEC section 10)
  train      batch, steps, logging, checkpoints
  mesh       device mesh shape and logical-axis rules
  evals      evaluators run during training
  sample     sampling settings (PAR_SPEC section 7)
  eval       evaluation settings (PAR_SPEC section 11)
"""

import math

import ml_collections

from par_jax.core import config_args

# Paper settings (PAR_SPEC sections 7 and 10).
SIZES = ("tiny", "small", "B", "L", "XL", "XXL", "3B")
RECIPES = ("paper", "release")
PAPER_LR = {"tiny": 1e-3, "small": 3e-4, "B": 1e-4, "L": 1e-4, "XL": 1e-4, "XXL": 2e-4, "3B": 2e-4}
PAPER_BATCH = {"tiny": 32, "small": 64, "B": 256, "L": 256, "XL": 256, "XXL": 512, "3B": 512}
PAPER_GUIDANCE = {"L": 1.60, "XL": 1.50, "XXL": 1.435, "3B": 1.345}


def get_config(arg: str = ""):
    a = config_args.parse_arg(arg, dict(size=("",) + SIZES, recipe=RECIPES),
                              size="", n=4, res=0, runlocal=False, recipe="paper")
    # runlocal shrinks the same experiment to one CPU; an explicit size= or res= still wins.
    a.size = a.size or ("tiny" if a.runlocal else "XL")
    a.res = a.res or (128 if a.runlocal else 384)
    if a.res <= 0 or a.res % 16:
        raise config_args.UsageError(f"config argument res={a.res} must be a positive multiple of 16 "
                                     f"(the tokenizer's 16x downsampling).")
    side = math.isqrt(max(a.n, 0))
    if a.n < 1 or side * side != a.n or (a.res // 16) % side:
        raise config_args.UsageError(f"config argument n={a.n} must be a square (1, 4, 16, ...) whose root divides "
                                     f"the {a.res // 16} tokens per side.")
    config = ml_collections.ConfigDict()
    config.arg = arg or ""
    config.job = "train"
    config.seed = 0

    tokens_per_side = a.res // 16
    config.model = ml_collections.ConfigDict(dict(
        size=a.size, n=a.n, grid_shape=(tokens_per_side, tokens_per_side),
        vocab_size=16384, num_classes=1000, dtype="bfloat16", scan_layers=True, remat="none",
        attn_dropout=0.1,  # the paper; the release uses 0.0
        # training attention kernel: auto | xla | dot_product | splash (par_jax/model/attention.py). auto: splash on
        # TPU, dot_product (cuDNN) on GPU, xla on the CPU, and xla whenever attn_dropout > 0 (the paper recipe).
        attention="auto",
    ))

    # --- data (par_jax.data): the training codes, and the extract_codes job that writes them (PAR_SPEC 10) ---
    config.data = ml_collections.ConfigDict(dict(
        source="synthetic" if a.runlocal else "codes",  # "codes" (from --job=extract_codes) | "synthetic"
        codes_dir="",             # the codes directory; extract_codes writes to it (empty: WORKDIR/codes)
        eval_codes_dir="",        # optional held-out codes (e.g. ImageNet val) for make_eval_loader
        seed=0,                   # shuffling order and view choice
        shuffle=True,
        worker_count=0,           # grain worker processes building batches (0: threads of this process do)
        read_threads=4, prefetch=8,  # batches read in parallel / batches prefetched
        synthetic_count=10_000, synthetic_views=2, synthetic_noise=0.1,  # source=synthetic (and synthetic images)
        # extract_codes: image source -> views -> tokenizer codes
        image_source="tfds:imagenet2012",  # "tfds:NAME" | "folder:PATH" | "fashion_mnist[:IDX_DIR]" | "synthetic"
        split="train", tfds_data_dir="", download=False,
        image_size=a.res, views="ten_crop", crop_ratio=1.1, flip_views=False,  # see par_jax/data/views.py
        tokenizer="",             # a trained tokenizer (par_jax.tokenizer.load)
        extract_batch_size=64,    # images per step per process (x10 views for ten_crop)
        records_per_shard=10_000, extract_workers=16,
    ))

    # --- optimizer (PAR_SPEC section 10; par_jax.core.optim) ---
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=PAPER_LR[a.size], b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.05,        # matrices and embeddings only, not norm gains
        schedule="cosine",        # "cosine" (linear warmup, cosine to 0) | "constant" (after the warmup)
        warmup_epochs=15.0,       # of 300 in the paper
        warmup_steps=-1,          # >= 0 overrides warmup_epochs
        grad_clip=1.0,            # global norm; 0 = off
        ema_decay=0.0,            # > 0 keeps EMA weights (e.g. 0.9999); sampling then uses them
    ))

    # --- train loop (par_jax.training.train) ---
    config.train = ml_collections.ConfigDict(dict(
        batch_size=PAPER_BATCH[a.size],  # global, over all processes
        num_epochs=300.0,         # epochs of the training codes (one random view per record per epoch)
        num_steps=-1,             # > 0 overrides num_epochs
        grad_accum_steps=1,       # micro-batches per step (the batch is split; one optimizer update)
        log_every_steps=100,
        checkpoint_every_steps=2000, keep_checkpoints=3, async_checkpoints=True,
        sample_every_steps=10_000,  # a sample grid (PNG + TensorBoard) every so often; 0 = off
        sample_num_images=16,
        peak_flops=0.0,           # per device, for MFU; 0 = vendor table for known accelerators, else measured
    ))

    # --- device mesh (par_jax.core.mesh / sharding); -1 takes the remaining devices ---
    config.mesh = ml_collections.ConfigDict(dict(
        data=1 if a.size in ("XXL", "3B") else -1,
        fsdp=-1 if a.size in ("XXL", "3B") else 1,  # shard parameters and optimizer state when they do not fit
        tensor=1,
        # logical axis -> mesh axes ("" replicated, "data,fsdp" several); par_jax.core.sharding.DEFAULT_RULES
        rules=dict(batch="data,fsdp", layers="", vocab="tensor", embed="fsdp", classes="", heads="tensor",
                   head_dim="", mlp="tensor", norm=""),
    ))

    # Evaluators run during training: {name: {every_steps: N, ...kwargs}} (par_jax.training.evaluators).
    config.evals = ml_collections.ConfigDict()

    if a.recipe == "release":     # the PyTorch release: constant lr, no warmup, no attention dropout
        config.optimizer.update(schedule="constant", warmup_epochs=0.0)
        config.model.attn_dropout = 0.0

    if a.runlocal:                # minutes on one CPU, float32 (bfloat16 is slow on XLA:CPU)
        config.model.update(dtype="float32", vocab_size=1024, num_classes=10)
        config.data.update(read_threads=2, prefetch=8)
        config.optimizer.update(warmup_steps=20)
        config.train.update(batch_size=16, num_steps=300, log_every_steps=20, checkpoint_every_steps=100,
                            sample_every_steps=0, sample_num_images=8)

    # --- sampling (PAR_SPEC section 7) ---
    config.sample = ml_collections.ConfigDict(dict(
        checkpoint="",            # a workdir or checkpoint path; empty = the run's own workdir
        num_images=64, batch_size=32, seed=0,
        labels="",                # "" = a row per class in a grid; else comma-separated class ids
        guidance=PAPER_GUIDANCE.get(a.size, 1.5),
        guidance_schedule="constant",   # "constant" | "linear" (ramp from 1 to `guidance` over the steps)
        guidance_stop_step=-1,          # switch guidance off from this step on (-1: never)
        temperature=1.0, top_k=0, top_p=1.0,
        tokenizer="",             # decodes the tokens to images; empty = config.data.tokenizer (none: token maps)
    ))

    # --- evaluation (PAR_SPEC section 11; par_jax.evaluation, docs/evaluation.md). The evaluate job runs this
    # protocol; during training, config.evals.eval = dict(every_steps=N, num_samples=1000, ...) runs it on fewer
    # samples (its other keys override fields here; par_jax.evaluation.plugin). ---
    config.eval = ml_collections.ConfigDict(dict(
        name="",                  # results go to WORKDIR/eval/<name> (default: step<S>_<feature_network>_<N>)
        checkpoint="",            # workdir or checkpoint dir; empty = config.sample.checkpoint, else WORKDIR
        samples="",               # score an existing ADM .npz (arr_0 images, arr_1 labels) instead of sampling
        num_samples=50_000, batch_size=64, seed=0,
        labels="uniform",         # "uniform" (i.i.d. random classes, the paper) | "balanced" (equal counts)
        resolution=256,           # samples are resized to this (the release's bicubic); 0 = keep the decoded size
        feature_network="inception",  # "inception" (ADM-comparable) | "fmnist_classifier" (offline; not comparable)
                                      # video: "i3d" (FVD) | "video_classifier" (offline; not FVD)
        inception_weights="",     # pt_inception-2015-12-05-6726825d.pth (or .npz/.safetensors with its keys)
        i3d_weights="",           # video: the Kinetics-400 I3D for FVD (feature_network="i3d"; docs/evaluation.md)
        classifier="workdirs/fmnist_classifier",  # trained on first use if absent
        feature_batch_size=64,
        reference="",             # ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz), or an image source
                                  # spec like config.data.image_source (e.g. "fashion_mnist"), viewed as in training
        reference_split="test", reference_count=0,  # for an image source; count 0 = all
        reference_stats="stored", # "stored": FID from the reference file's mu/sigma when it has them (as ADM)
        metrics="fid,sfid,is,precision_recall",
        pr_k=3, is_split_size=5000, fid_min_samples=0,  # 0: FID needs more samples than feature dimensions
        grid_images=64, save_npz=True,
    ))
    if a.runlocal:
        config.eval.update(num_samples=64, batch_size=16, resolution=0, feature_network="fmnist_classifier",
                           fid_min_samples=16, metrics="fid,is,precision_recall", grid_images=16)
    return config
