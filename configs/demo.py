r"""The newcomer's demo: PAR end to end on Fashion-MNIST, on one 2-core CPU, in about 16 minutes (docs/demo.md).

Phases (each resumes or is reused when re-run): train the small VQ tokenizer -> extract codes of 12k training
images (config.demo.max_images; 0 = all 60k) -> train a small PAR-4x decoder on them -> sample a grid with a row per class -> evaluate (FID / IS /
precision / recall and class consistency with the project's own Fashion-MNIST classifier) -> report.

    python -m par_jax.main --config=configs/demo.py --workdir=workdirs/demo
Quick variant (tiny sizes, few steps; what CI runs):
    python -m par_jax.main --config=configs/demo.py:quick --workdir=/tmp/demo_quick
Any field can be overridden, e.g. --config.par.train.num_steps=3000 --config.tokenizer.train.num_steps=3000.
"""

import ml_collections

from par_jax.core import config_args

# The demo builds on the two experiment configs beside it, loaded by path (any working directory will do).
par_configs = config_args.sibling(__file__, "par.py")
vq_configs = config_args.sibling(__file__, "vq.py")


def get_config(arg: str = ""):
    a = config_args.parse_arg(arg, quick=False)
    config = ml_collections.ConfigDict()
    config.arg = arg or ""
    config.job = "demo"
    config.seed = 0
    config.demo = ml_collections.ConfigDict(dict(
        max_images=12_000,     # training images that get codes (0: all 60k); the first ones, ~1200 per class
        classifier_steps=800,  # the evaluation classifier (trained once, reused)
        force=False,           # re-run phases that finished before
    ))

    # 1. The tokenizer: 28x28 padded to 32x32 -> 8x8 tokens from 512 codes.
    config.tokenizer = vq_configs.get_config("fmnist")
    config.tokenizer.train.update(num_steps=400, eval_every=400, checkpoint_every=200)
    config.tokenizer.eval.update(final_num_images=2000)
    config.tokenizer.optimizer.warmup_steps = 50

    # 2-5. The decoder, its data, sampling and evaluation: the PAR experiment config, made small.
    par = par_configs.get_config("size=small,n=4,runlocal")
    vq = config.tokenizer.tokenizer
    tokens_per_side = vq.image_size // 2 ** (len(vq.channel_mult) - 1)
    # Unscanned layers: 20% faster steps on XLA:CPU for a 4-layer model (0.65 vs 0.81 s at batch 64, 2 idle cores).
    par.model.update(num_layers=4, num_heads=4, dim=128, grid_shape=(tokens_per_side, tokens_per_side),
                     vocab_size=vq.codebook_size, num_classes=10, dtype="float32", attn_dropout=0.0,
                     scan_layers=False)
    par.data.update(source="codes", image_source="fashion_mnist", split="train", image_size=vq.image_size,
                    views="pad", flip_views=False, extract_batch_size=256, records_per_shard=20_000,
                    extract_workers=2, read_threads=2, prefetch=4)
    par.optimizer.update(lr=2e-3, warmup_steps=50, schedule="cosine", weight_decay=0.05)
    par.train.update(batch_size=64, num_steps=900, log_every_steps=25, checkpoint_every_steps=200,
                     sample_every_steps=200, sample_num_images=20)
    par.sample.update(num_images=100, batch_size=100, labels=",".join(str(c) for c in range(10)), guidance=3.0)
    par.eval.update(num_samples=300, batch_size=150, labels="balanced", resolution=0,
                    feature_network="fmnist_classifier", reference="fashion_mnist", reference_split="test",
                    reference_count=0, metrics="fid,is,precision_recall,class_consistency", fid_min_samples=0,
                    grid_images=100)
    config.par = par

    if a.quick:
        config.demo.update(max_images=512, classifier_steps=100)
        config.tokenizer.train.update(num_steps=30, log_every=10, eval_every=30, checkpoint_every=30,
                                      grid_images=8)
        config.tokenizer.eval.update(num_images=64, batch_size=64, final_num_images=64)
        config.tokenizer.optimizer.warmup_steps = 5
        par.optimizer.warmup_steps = 5
        par.model.update(num_layers=2, num_heads=2, dim=64)
        par.train.update(batch_size=16, num_steps=20, log_every_steps=10, checkpoint_every_steps=10,
                         sample_every_steps=0)
        par.sample.update(num_images=20, batch_size=20)
        par.eval.update(num_samples=40, batch_size=40, reference_count=200, fid_min_samples=16, grid_images=20)
    return config
