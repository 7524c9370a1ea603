r"""The video demo: class-conditional video PAR end to end on Moving Fashion-MNIST, on one 2-core CPU (docs/video.md).

Phases (each resumes or is reused when re-run): train the causal 3D video tokenizer (17 frames of 32 px -> 5x8x8
codes) -> extract codes of the first config.demo.max_images training clips -> train a small PAR-4x decoder on the
(5, 8, 8) grids (PAR's regions over space, every latent frame in each region) -> sample an animated grid with a row
per class -> train the offline video classifier -> evaluate (Frechet distance in the classifier's feature space,
precision / recall, class consistency; not FVD, see docs/evaluation.md) -> report.

    python -m par_jax.main --config=configs/demo_video.py --workdir=workdirs/demo_video    # 18 min on 2 idle cores
Quick variant (tiny sizes, few steps; what CI runs):
    python -m par_jax.main --config=configs/demo_video.py:quick --workdir=/tmp/demo_video_quick
Arguments: quick; n=4 (tokens per parallel step: 1, 4 or 16); seed=0 (the decoder's initialisation, data order and
samples: the tokenizer, codes and classifier do not depend on it, so runs with other n or seeds can share them by
pointing --config.demo.shared_dir at a first run's workdir).
Any field can be overridden, e.g. --config.par.train.num_steps=2000 --config.tokenizer.train.num_steps=600.
"""

import ml_collections

from par_jax.core import config_args

# The demo builds on the experiment configs beside it, loaded by path (any working directory will do).
par_configs = config_args.sibling(__file__, "par.py")
vq_configs = config_args.sibling(__file__, "vq.py")

NUM_FRAMES, FRAME_SIZE = 17, 32


def get_config(arg: str = ""):
    a = config_args.parse_arg(arg, quick=False, n=4, seed=0)
    if a.n not in (1, 4, 16):
        raise config_args.UsageError(f"config argument n={a.n} must be 1, 4 or 16 (squares dividing the 8x8 "
                                     f"tokens of a latent frame).")
    config = ml_collections.ConfigDict()
    config.arg = arg or ""
    config.job = "demo"
    config.seed = a.seed
    config.demo = ml_collections.ConfigDict(dict(
        max_images=6_000,       # training clips that get codes: the first 6,000 (~600 per class)
        classifier_steps=500,   # the video evaluation classifier (trained once, reused)
        classifier_test_clips=1_000,
        shared_dir="",          # a finished demo's workdir whose tokenizer, codes and classifier this run reuses
        force=False,            # re-run phases that finished before
    ))

    # 1. The video tokenizer: causal 3D VQ, 17 frames of 32 px -> 5x8x8 codes from 512 entries.
    config.tokenizer = vq_configs.get_config("video")
    vq = config.tokenizer.tokenizer
    from par_jax.tokenizer import video_vq  # noqa: PLC0415 (after the arguments are checked, as configs/vq.py)
    grid = video_vq.from_config_dict(vq).latent_shape(NUM_FRAMES, FRAME_SIZE)

    # 2-5. The decoder, its data, sampling and evaluation: the PAR experiment config, made small (the image demo's
    # decoder: 4 layers of width 128, float32).
    par = par_configs.get_config(f"size=small,n={a.n},runlocal")
    par.seed = a.seed  # the decoder's initialisation (the train job's config.seed); data order and samples below
    par.model.update(num_layers=4, num_heads=4, dim=128, grid_shape=grid, vocab_size=vq.codebook_size,
                     num_classes=10, dtype="float32", attn_dropout=0.0, scan_layers=False)
    par.data.update(source="codes", split="train", views="clip", flip_views=False, extract_batch_size=32,
                    records_per_shard=20_000, extract_workers=2, read_threads=2, prefetch=4, seed=a.seed)
    # The video fields of the extract_codes job (par_jax/tokenizer/extract.py); defined here so that the command
    # line can set them.
    par.data.video_source = "moving_fashion_mnist"
    par.data.num_frames = NUM_FRAMES
    par.data.frame_size = FRAME_SIZE
    par.data.frame_stride = 1
    par.data.video_count = 0
    par.optimizer.update(lr=2e-3, warmup_steps=50, schedule="cosine", weight_decay=0.05)
    # 320 tokens per clip: a step at batch 16 costs about 1.5x the image demo's step at batch 64 (measured in one
    # process on the 2-core VM), so 800 steps take about as long as the image demo's 900.
    par.train.update(batch_size=16, num_steps=800, log_every_steps=25, checkpoint_every_steps=200,
                     sample_every_steps=0, sample_num_images=10)
    par.sample.update(num_images=40, batch_size=40, labels=",".join(str(c) for c in range(10)), guidance=3.0,
                      seed=a.seed)
    par.eval.update(num_samples=300, batch_size=100, labels="balanced", resolution=0, seed=a.seed,
                    feature_network="video_classifier", reference="moving_fashion_mnist", reference_split="test",
                    reference_count=1_000, metrics="fvd,precision_recall,class_consistency", fid_min_samples=0,
                    grid_images=40)
    config.par = par

    if a.quick:
        config.demo.update(max_images=64, classifier_steps=20, classifier_test_clips=50)
        # No tokenizer evaluation: compiling the 3D VQ's eval program costs more than the 4 steps themselves.
        config.tokenizer.train.update(num_steps=4, log_every=2, eval_every=0, checkpoint_every=4, grid_images=2,
                                      batch_size=2)
        config.tokenizer.eval.update(batch_size=4, num_images=4, final_num_images=4)
        config.tokenizer.optimizer.warmup_steps = 1
        par.optimizer.warmup_steps = 2
        par.model.update(num_layers=2, num_heads=2, dim=64)
        par.train.update(batch_size=8, num_steps=6, log_every_steps=3, checkpoint_every_steps=6)
        par.sample.update(num_images=10, batch_size=10)
        par.eval.update(num_samples=20, batch_size=20, reference_count=40, fid_min_samples=8, grid_images=10)
    return config
