r"""Input-pipeline benchmark: how fast the data side runs next to what training and extraction need.

    python -m par_jax.bench.data [--config=configs/par.py:size=XL,n=4,res=384] [--records=4096] [--batch=256] \
        [--repeats=5] [--out=bench_data.json]

The codes have the config's grid, vocabulary and classes (default: the checkout's configs/par.py:size=XL,n=4,
res=384, ImageNet at 384 px: 24x24 tokens) and its data settings (--config.data.prefetch=...); --read_threads
sets config.data.read_threads.

Rows (medians over `repeats` runs; ratios against the raw ArrayRecord read of the same records in this process):
  raw read          ArrayRecord bytes only (the baseline)
  train loader      make_train_loader on ImageNet-384-shaped codes (10 views of 24x24 uint16), per-sample view pick
  synthetic loader  make_train_loader with source=synthetic (24x24 grids, 2 views: the smoke-run default)
  ten_crop views    host-side view making for extraction: one 500x375 photo -> 10 views at 384 px, one thread
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from absl import flags

from par_jax.bench import common
from par_jax.core import config_args
from par_jax.data import codes as codes_lib
from par_jax.data import pipeline, views


def _median_rate(fn, items: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)


DEFAULT_CONFIG = "par.py:size=XL,n=4,res=384"


def define_flags(fv: flags.FlagValues, argv) -> None:
    common.define_config(fv, argv, DEFAULT_CONFIG)
    flags.DEFINE_integer("records", 4096, "Records of 10 views written and read.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch", 256, "Samples per batch.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "Runs per row (median reported).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("read_threads", 4, "config.data.read_threads of the loaders.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("out", "bench_data.json", "Where the rows go.", flag_values=fv)


def main(argv=None):
    args = config_args.parse_flags(argv, define_flags, doc=__doc__)
    spec = common.experiment_spec(args, DEFAULT_CONFIG)
    base = common.experiment(spec)
    grid, num_views, vocab = tuple(base.model.grid_shape), 10, int(base.model.vocab_size)
    num_classes = int(base.model.num_classes)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        records = ((rng.integers(0, vocab, (num_views, *grid)), int(rng.integers(num_classes)))
                   for _ in range(args.records))
        codes_lib.write_codes(tmp, records, grid_shape=grid, num_views=num_views, vocab_size=vocab,
                              num_classes=num_classes, records_per_shard=1024)
        config = common.experiment(spec)
        config.data.update(source="codes", codes_dir=tmp, read_threads=args.read_threads)
        steps = args.records // args.batch
        source = codes_lib.CodesSource(tmp)

        def raw_read():
            for start in range(0, args.records, args.batch):
                source._records.__getitems__(range(start, min(start + args.batch, args.records)))

        def loader_run(cfg):
            def run():
                it = iter(pipeline.make_train_loader(cfg, global_batch_size=args.batch))
                for _ in range(steps):
                    next(it)
            return run

        synthetic = common.experiment(spec)
        synthetic.data.update(source="synthetic", synthetic_count=args.records, synthetic_views=2,
                              read_threads=args.read_threads)
        photo = rng.integers(0, 256, (375, 500, 3), np.uint8)
        samples = steps * args.batch
        rows = {
            "raw read": _median_rate(raw_read, args.records, args.repeats),
            "train loader": _median_rate(loader_run(config), samples, args.repeats),
            "synthetic loader": _median_rate(loader_run(synthetic), samples, args.repeats),
            "ten_crop views": _median_rate(lambda: [views.make_views(photo, "ten_crop", int(base.data.image_size))
                                                          for _ in range(20)],
                                           20, args.repeats),
        }
    base = rows["raw read"]
    print(f"{'what':<18} {'items/s':>10} {'vs raw read':>12}   (median of {args.repeats}; items = samples or images)")
    for name, rate in rows.items():
        print(f"{name:<18} {rate:>10.0f} {rate / base:>11.2f}x")
    result = dict(rows=rows, config=common.describe(spec), grid=list(grid), records=args.records, batch=args.batch,
                  repeats=args.repeats, read_threads=args.read_threads, machine=dict(platform=platform.platform(),
                                                               processor=platform.processor(),
                                                               cpus=os.cpu_count()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    config_args.run(main)
