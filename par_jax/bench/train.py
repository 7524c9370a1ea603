r"""Training speed: step time, tokens/s and MFU of the real train step, against a matmul peak measured in this run.

    python -m par_jax.bench.train [--config=configs/par.py:res=256] [--sizes=tiny,B] [--batch=16,2] [--runs=5] \
        [--json=bench_train.json]

The experiment is --config (default: the checkout's configs/par.py:res=256), overrides included
(--config.model.remat=full); --sizes, --res and --n are its size, res and n arguments (one row per size; each
may be given in --config or as the flag, not both). --batch is the global batch per size (default 16 for tiny,
else 2).

For each size, the compiled step of `par_jax.training.train` (AdamW, clipping, dropout on, donated state, the
config's mesh over all local devices) runs on random codes: one warm-up step, then `--runs` steps each timed to
completion; the median is reported. MFU = model FLOPs per step (par_jax.training.flops: matmuls, 3x forward) per
second over the peak: on CPU (or an accelerator missing from the vendor table) the median FLOP/s of a chain of
square matmuls timed right after each step in the same process, so that on a shared machine the step and its peak
see the same load and MFU says how close the step comes to what the matmul units give at that moment; on known
accelerators the vendor bfloat16 figure. Compile time and XLA's temporary memory are reported too.
"""

from __future__ import annotations

import json
import statistics
import time
import types

import jax
import numpy as np
from absl import flags

from par_jax.bench import common
from par_jax.bench.common import machine
from par_jax.core import config_args
from par_jax.core import mesh as mesh_lib, optim
from par_jax.training import flops, train


def bench_size(config, batch: int, args, probe: flops.MatmulProbe | None) -> dict:
    size = config.model.size
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
        "program_memory": {k: getattr(memory, f"{k}_size_in_bytes", None) for k in ("argument", "output", "temp",
                                                                                    "alias")},
    }


DEFAULT_CONFIG = "par.py:res=256"


def define_flags(fv: flags.FlagValues, argv) -> None:
    common.define_config(fv, argv, DEFAULT_CONFIG)
    flags.DEFINE_list("sizes", None, "Model sizes, one row each (default: the config's size= argument, else tiny,B).",
                      flag_values=fv)
    flags.DEFINE_list("batch", None, "Global batch per size, same order (default: 16 for tiny, else 2).",
                      flag_values=fv)
    flags.DEFINE_integer("res", None, "Image resolution, the config's res= argument (tokens per side = res / 16).",
                         flag_values=fv)
    flags.DEFINE_integer("n", None, "Tokens per parallel step, the config's n= argument.", flag_values=fv)
    flags.DEFINE_string("dtype", None, "Compute dtype (default: float32 on CPU, else bfloat16).", flag_values=fv)
    flags.DEFINE_integer("runs", 5, "Timed steps after the warm-up (median reported); at least 3.", lower_bound=3,
                         flag_values=fv)
    flags.DEFINE_string("json", "bench_train.json", "Where the rows go.", flag_values=fv)


def experiments(f: flags.FlagValues) -> list:
    """One experiment config per size: --config with the size (and --res, --n when given) as arguments."""
    spec = common.experiment_spec(f, DEFAULT_CONFIG)
    given = common.arg_keys(spec[1]) if f["config"].value is not None else set()  # the default's give way
    extra = []
    for key in ("res", "n"):
        if f[key].value is not None:
            if key in given:
                raise config_args.UsageError(f"{key} is given twice: in --config ({spec[1]}) and as --{key}.")
            extra.append(f"{key}={f[key].value}")
    if f.sizes and "size" in given:
        raise config_args.UsageError(f"size is given twice: in --config ({spec[1]}) and as --sizes.")
    sizes = f.sizes or ([None] if "size" in given else ["tiny", "B"])
    return [common.experiment(spec, *extra, *([f"size={s}"] if s else [])) for s in sizes]


def main(argv=None):
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    configs = experiments(f)
    sizes = [c.model.size for c in configs]
    batches = [int(b) for b in f.batch] if f.batch else [16 if s == "tiny" else 2 for s in sizes]
    if len(batches) != len(sizes):
        raise config_args.UsageError(f"--batch needs one value per size ({len(sizes)}), got {len(batches)}.")
    dtype = f.dtype or ("float32" if jax.devices()[0].platform == "cpu" else "bfloat16")
    args = types.SimpleNamespace(sizes=",".join(sizes), batch=",".join(map(str, batches)), dtype=dtype,
                                 res=configs[0].model.grid_shape[0] * 16, n=configs[0].model.n, runs=f.runs,
                                 json=f.json, config=common.describe(common.experiment_spec(f, DEFAULT_CONFIG)))

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
    for config, batch in zip(configs, batches):
        r = bench_size(config, batch, args, probe)
        r["config_arg"] = config.arg
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
    config_args.run(main)
