r"""Training speed: step time, tokens/s and MFU of the real train step, against a matmul peak measured in this run.

    python -m par_jax.bench.train [--sizes=tiny,B] [--batch=16,2] [--res=256] [--n=4] [--runs=5] [--json=bench_train.json]

For each size, the compiled step of `par_jax.training.train` (AdamW, clipping, dropout on, donated state, the
config's mesh over all local devices) runs on random codes: one warm-up step, then `--runs` steps each timed to
completion; the median is reported. MFU = model FLOPs per step (par_jax.training.flops: matmuls, 3x forward) per
second over the peak: on CPU (or an accelerator missing from the vendor table) the median FLOP/s of a chain of
square matmuls timed right after each step in the same process, so that on a shared machine the step and its peak
see the same load and MFU says how close the step comes to what the matmul units give at that moment; on known
accelerators the vendor bfloat16 figure. Compile time and XLA's temporary memory are reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from configs import common
from par_jax.bench.common import machine
from par_jax.core import mesh as mesh_lib, optim
from par_jax.training import flops, train


def bench_size(size: str, batch: int, args, probe: flops.MatmulProbe | None) -> dict:
    config = common.par_config(f"size={size},n={args.n},res={args.res}")
    config.model.dtype = args.dtype
    config.train.batch_size = batch
    mesh = mesh_lib.create_mesh(config.mesh)
    schedule = optim.learning_rate_schedule(config.optimizer, total_steps=1000, warmup=0)
    trainer = train.make_trainer(config, mesh, schedule)
    cfg = trainer.model_cfg
    start = time.perf_counter()
    compiled = trainer.compile(batch)
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state = trainer.init()
    rng = np.random.default_rng(0)
    batches = [trainer.put({"tokens": rng.integers(0, cfg.vocab_size, (batch, cfg.num_tokens), dtype=np.int32),
                            "label": rng.integers(0, cfg.num_classes, (batch,), dtype=np.int32)})
               for _ in range(2)]
    state, metrics = compiled(state, batches[0])  # warm-up
    jax.block_until_ready(metrics)
    times, matmul = [], []
    for i in range(args.runs):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        if probe is not None:  # the matmul peak right after each step, under the same machine load
            matmul.append(max(probe.run(), probe.run()))
    step_s = statistics.median(times)
    model_flops = flops.train_flops_per_example(cfg) * batch
    tokens = batch * cfg.num_tokens
    return {
        "size": size, "params": int(sum(x.size for x in jax.tree.leaves(trainer.abstract_state["params"]))),
        "n": cfg.n, "grid": list(cfg.grid_shape), "batch": batch, "dtype": cfg.dtype, "mesh": dict(mesh.shape),
        "tokens_per_step": tokens, "compile_s": compile_s, "step_s": step_s, "step_s_runs": times,
        "tokens_per_s": tokens / step_s, "model_flops_per_step": model_flops,
        "achieved_flops_per_s": model_flops / step_s, "matmul_flops_per_s_runs": matmul,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None), "loss": float(metrics["loss"]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,B")
    p.add_argument("--batch", default="16,2", help="global batch per size (comma-separated, same order)")
    p.add_argument("--res", default=256, type=int, help="image resolution (tokens per side = res / 16)")
    p.add_argument("--n", default=4, type=int)
    p.add_argument("--dtype", default="float32" if jax.devices()[0].platform == "cpu" else "bfloat16")
    p.add_argument("--runs", default=5, type=int, help="timed steps after the warm-up (median reported)")
    p.add_argument("--json", default="bench_train.json")
    args = p.parse_args(argv)
    sizes, batches = args.sizes.split(","), [int(b) for b in args.batch.split(",")]
    if len(batches) != len(sizes):
        p.error(f"--batch needs one value per size ({len(sizes)}), got {len(batches)}.")
    if args.runs < 3:
        p.error("--runs must be at least 3 (the median of several runs is reported).")

    info = machine()
    table_peak = flops.table_peak_flops(jax.local_devices()[0], args.dtype)
    probe = None
    if table_peak is None:  # CPU or an unknown accelerator: the matmul chain size that runs fastest here
        probes = [flops.MatmulProbe(args.dtype, size) for size in (1024, 2048)]
        probe = max(probes, key=lambda pr: max(pr.run() for _ in range(3)))
        source = f"median of {args.dtype} matmul chains ({probe.a.shape[0]}^2) timed after each step"
    else:
        source = f"vendor table ({jax.local_devices()[0].device_kind}, {args.dtype})"
    print(f"# {info['cpu']} ({info['cpu_count']} cores), {info['platform']} x{info['device_count']}, jax "
          f"{info['jax']}, load average {info['loadavg_start']:.2f}")
    rows = []
    for size, batch in zip(sizes, batches):
        r = bench_size(size, batch, args, probe)
        peak = statistics.median(r["matmul_flops_per_s_runs"]) if probe else table_peak
        r.update(peak_flops_per_device=peak, peak_source=source,
                 mfu=r["achieved_flops_per_s"] / (peak * jax.device_count()))
        rows.append(r)
    print(f"{'size':<5} {'params':>11} {'batch':>5} {'tokens':>6} {'compile s':>9} {'step ms':>9} "
          f"{'tokens/s':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'peak GFLOP/s':>12} {'MFU':>6}")
    for r in rows:
        print(f"{r['size']:<5} {r['params']:>11,} {r['batch']:>5} {r['tokens_per_step']:>6} {r['compile_s']:>9.1f} "
              f"{1e3 * r['step_s']:>9.1f} {r['tokens_per_s']:>9.0f} {r['model_flops_per_step'] / 1e9:>10.1f} "
              f"{r['achieved_flops_per_s'] / 1e9:>8.1f} {r['peak_flops_per_device'] / 1e9:>12.1f} "
              f"{100 * r['mfu']:>5.1f}%")
    print(f"(medians of {args.runs} steps; {args.res}px = {rows[0]['grid'][0]}x{rows[0]['grid'][1]} tokens, "
          f"n={args.n}, {args.dtype}; peak per device: {source})")
    with open(args.json, "w") as f:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
