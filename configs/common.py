"""Shared pieces of the experiment configs. Each experiment file's `get_config(arg)` calls one of these.

Sections (each owned by one part of par_jax):
  model      decoder fields (par_jax.model.ModelConfig) plus `size`
  data       where the training codes come from
  optimizer  AdamW + schedule (PAR_SPEC section 10)
  train      batch, steps, logging, checkpoints
  mesh       device mesh shape and logical-axis rules
  sample     sampling settings (PAR_SPEC section 7)
  eval       evaluation settings (PAR_SPEC section 11)
"""

import ml_collections

# Paper settings (PAR_SPEC sections 7 and 10).
PAPER_LR = {"tiny": 1e-3, "small": 3e-4, "B": 1e-4, "L": 1e-4, "XL": 1e-4, "XXL": 2e-4, "3B": 2e-4}
PAPER_BATCH = {"tiny": 32, "small": 64, "B": 256, "L": 256, "XL": 256, "XXL": 512, "3B": 512}
PAPER_GUIDANCE = {"L": 1.60, "XL": 1.50, "XXL": 1.435, "3B": 1.345}


def parse_arg(arg: str, **defaults):
    """'size=L,n=4,runlocal' -> ConfigDict(size='L', n=4, runlocal=True), typed by the defaults."""
    out = dict(defaults)
    for item in filter(None, (a.strip() for a in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(out)}")
        default = out[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def par_config(arg: str = ""):
    a = parse_arg(arg, size="XL", n=4, res=384, runlocal=False)
    config = ml_collections.ConfigDict()
    config.arg = arg or ""
    config.job = "train"
    config.seed = 0

    tokens_per_side = a.res // 16
    config.model = ml_collections.ConfigDict(dict(
        size=a.size, n=a.n, grid_shape=(tokens_per_side, tokens_per_side),
        vocab_size=16384, num_classes=1000, dtype="bfloat16", scan_layers=True, remat="none",
        attn_dropout=0.1,  # the paper; the release uses 0.0
    ))

    # --- data (par_jax.data): the training codes, and the extract_codes job that writes them (PAR_SPEC 10) ---
    config.data = ml_collections.ConfigDict(dict(
        source="synthetic" if a.runlocal else "codes",  # "codes" (from --job=extract_codes) | "synthetic"
        codes_dir="",             # the codes directory; extract_codes writes to it (empty: WORKDIR/codes)
        eval_codes_dir="",        # optional held-out codes (e.g. ImageNet val) for make_eval_loader
        seed=0,                   # shuffling order and view choice
        shuffle=True,
        worker_count=0,           # grain worker processes; records need little work, so threads (below) suffice
        read_threads=16, prefetch=512,
        synthetic_count=10_000, synthetic_views=2, synthetic_noise=0.1,  # source=synthetic (and synthetic images)
        # extract_codes: image source -> views -> tokenizer codes
        image_source="tfds:imagenet2012",  # "tfds:NAME" | "folder:PATH" | "fashion_mnist[:IDX_DIR]" | "synthetic"
        split="train", tfds_data_dir="", download=False,
        image_size=a.res, views="ten_crop", crop_ratio=1.1, flip_views=False,  # see par_jax/data/views.py
        tokenizer="",             # a trained tokenizer (par_jax.tokenizer.load)
        extract_batch_size=64,    # images per step per process (x10 views for ten_crop)
        records_per_shard=10_000, extract_workers=16,
    ))

    # --- data / optimizer / train / mesh: filled by the training work (issue 4) ---

    # --- sampling (PAR_SPEC section 7) ---
    config.sample = ml_collections.ConfigDict(dict(
        checkpoint="",            # a workdir or checkpoint path; empty = the run's own workdir
        num_images=64, batch_size=32, seed=0,
        labels="",                # "" = a row per class in a grid; else comma-separated class ids
        guidance=PAPER_GUIDANCE.get(a.size, 1.5),
        guidance_schedule="constant",   # "constant" | "linear" (ramp from 1 to `guidance` over the steps)
        guidance_stop_step=-1,          # switch guidance off from this step on (-1: never)
        temperature=1.0, top_k=0, top_p=1.0,
    ))

    # --- evaluation (PAR_SPEC section 11): filled by the evaluation work (issue 7) ---
    return config
