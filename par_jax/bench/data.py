r"""Input-pipeline benchmark: how fast the data side runs next to what training and extraction need.

    python -m par_jax.bench.data [--records=4096] [--batch=256] [--repeats=5] [--out=bench_data.json]

Rows (medians over `repeats` runs; ratios against the raw ArrayRecord read of the same records in this process):
  raw read          ArrayRecord bytes only (the baseline)
  train loader      make_train_loader on ImageNet-384-shaped codes (10 views of 24x24 uint16), per-sample view pick
  synthetic loader  make_train_loader with source=synthetic (24x24 grids, 2 views: the smoke-run default)
  ten_crop views    host-side view making for extraction: one 500x375 photo -> 10 views at 384 px, one thread
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from configs import common
from par_jax.data import codes as codes_lib
from par_jax.data import pipeline, views


def _median_rate(fn, items: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--read_threads", type=int, default=4)
    parser.add_argument("--out", default="bench_data.json")
    args = parser.parse_args(argv)

    grid, num_views, vocab = (24, 24), 10, 16384
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        records = ((rng.integers(0, vocab, (num_views, *grid)), int(rng.integers(1000))) for _ in range(args.records))
        codes_lib.write_codes(tmp, records, grid_shape=grid, num_views=num_views, vocab_size=vocab, num_classes=1000,
                              records_per_shard=1024)
        config = common.par_config("size=XL,n=4,res=384")
        config.data.update(codes_dir=tmp, read_threads=args.read_threads, prefetch=8)
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

        synthetic = common.par_config("size=XL,n=4,res=384")
        synthetic.data.update(source="synthetic", synthetic_count=args.records, synthetic_views=2,
                              read_threads=args.read_threads, prefetch=8)
        photo = rng.integers(0, 256, (375, 500, 3), np.uint8)
        samples = steps * args.batch
        rows = {
            "raw read": _median_rate(raw_read, args.records, args.repeats),
            "train loader": _median_rate(loader_run(config), samples, args.repeats),
            "synthetic loader": _median_rate(loader_run(synthetic), samples, args.repeats),
            "ten_crop views": _median_rate(lambda: [views.make_views(photo, "ten_crop", 384) for _ in range(20)],
                                           20, args.repeats),
        }
    base = rows["raw read"]
    print(f"{'what':<18} {'items/s':>10} {'vs raw read':>12}   (median of {args.repeats}; items = samples or images)")
    for name, rate in rows.items():
        print(f"{name:<18} {rate:>10.0f} {rate / base:>11.2f}x")
    result = dict(rows=rows, records=args.records, batch=args.batch, repeats=args.repeats,
                  read_threads=args.read_threads, machine=dict(platform=platform.platform(),
                                                               processor=platform.processor(),
                                                               cpus=os.cpu_count()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
