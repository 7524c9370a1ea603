r"""Sampling speed against floors measured in the same process.

    python -m par_jax.bench.sample --size=B --n=1,4,16 --grid=24x24 --batch=1 --guidance=1.5 --dtype=float32
    python -m par_jax.bench.sample --config=configs/par.py:size=B,res=384 --n=1,4,16 --dtype=float32
    python -m par_jax.bench.sample --size=B --n=1,4,16 --grid=5x16x16    # video: 17 frames at 128 px (PAR_SPEC 14)
    python -m par_jax.bench.sample --config=configs/demo_video.py --n=1,4,16 --batch=1   # the video demo's decoder

The model and sampling settings come from the flags (--size, --grid, --vocab, --num_classes, --dtype, --n,
--guidance, --temperature, --top_k, --top_p) or, with --config, from its `model` and `sample` blocks (a demo's
`par` block; an explicit flag still wins; --n defaults to the config's n). The config's model is benchmarked as it
is, with its num_layers / num_heads / dim overrides of the named size, unless --size is given.

For each n: compile time, seconds per batch (median of --runs timed calls after a warm-up call), ms per step, steps,
images/s, and two floors:
  matmul floor     the same steps' weight matmuls alone (every layer's q|k|v, output, w1, w3, w2 and the vocabulary
                   head, at the same row counts, chained through the same scans), nothing else. The fastest of a few
                   formulations is taken, so the ratio says how far the sampler is from what this machine's matrix
                   units allow at these shapes. The sampler and the floor run in alternation (one call each per
                   round), and "x floor" is the median of the per-round ratios: on a shared VM whose speed drifts by
                   10-30% over minutes, both sides of every ratio see the same conditions. Hypervisor steal time is
                   recorded per call (Linux).
  bandwidth floor  the weight bytes read per step over a measured memory-copy bandwidth (the larger of a NumPy copy
                   and an XLA copy of a buffer larger than the caches; bytes read + written per second, as STREAM).
  flops floor      the weight matmuls' FLOPs (2 x rows x weights, every step) over the best float32 rate a tuned
                   BLAS reaches here (large square matmuls through NumPy's BLAS and, if installed, PyTorch's; best of a
                   few sizes), measured once, after the copy bandwidth. With the bandwidth floor it bounds any
                   implementation: the physical floor is the larger of the two, and "x physical" the distance to it.
Also: the weight bytes read per second ("weights GB/s") and, on accelerators in bench.common.DEVICE_BANDWIDTH, its
share of the card's vendor bandwidth (a batch-1 step is bandwidth-bound there: this is how close it gets); and with
n=1 in the same run, PAR's wall-clock speed-up over n=1 next to the step ratio.
Also the first call of each freshly compiled sampler (wall time, and process CPU time against a later call's).
--matmul / --attention pick the sampler's options (backend.MATMUL, backend.ATTENTION); --baseline_matmul /
--baseline_attention time a second sampler with another choice in the same rounds (the paired ratio).
Weights are random (the head too), so nothing is downloaded.

With --release=DIR (a checkout of the PyTorch release, github.com/YuqingWang1029/PAR; bench.release) the release's
own sampling loop runs in the same rounds, on the same random weights: its GPT is built with random weights and
par_jax's model converted from them, and their training-forward logits are compared before anything is timed. Its
speed-up is the median of the per-round ratios (release seconds / par_jax seconds). Without --release the release's
figures for size B, 24x24 tokens, batch 1, guidance 1.5 on a 2-core CPU (40 s, 15.7 s, 7.9 s per image for n = 1, 4,
16) come from another day's run: they are shown as quoted, never divided into a speed-up.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from par_jax.bench import release as release_lib
from par_jax.bench.common import loadavg, machine, steal_seconds, table_bandwidth
from par_jax.core import config_args
from par_jax.model import SIZES, ParTransformer, model_config
from par_jax.model.transformer import dense
from par_jax.sampling import backend
from par_jax.sampling.sampler import SampleSettings, Sampler, plan_chunks

# PyTorch release, size B, 24x24, batch 1, guidance 1.5, float32, 2-core CPU: seconds per image QUOTED from another
# day's run (issue 3), for orientation only; not a measurement of this run.
TORCH_RELEASE_CPU_S_QUOTED = {1: 40.0, 4: 15.7, 16: 7.9}


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def copy_bandwidth(num_bytes: int = 1 << 30, runs: int = 5) -> float:
    """Memory-copy bandwidth in bytes/s (read + write), the larger of a NumPy copy and an XLA copy."""
    src = np.ones(num_bytes // 4, np.float32)
    dst = np.empty_like(src)
    best_np = min(timed(lambda: np.copyto(dst, src), runs))
    x = jnp.asarray(src)
    del src, dst
    copy = jax.jit(lambda a: a[::-1])  # a real read of every element and a write of every element
    copy(x).block_until_ready()
    best_xla = min(timed(lambda: copy(x), runs))
    return 2 * num_bytes / min(best_np, best_xla)


def blas_matmul_rate(sizes=(1024, 2048), runs: int = 3) -> dict:
    """The best float32 FLOP/s of large square matmuls through a tuned BLAS: NumPy's and, if installed, PyTorch's
    (MKL on x86); {"flops_per_s", "library", "size"} of the fastest."""
    libs = {"numpy": lambda a, b: np.matmul(a, b)}
    try:
        import torch  # noqa: PLC0415
        libs[f"torch {torch.__version__}"] = lambda a, b: torch.mm(a, b)
    except ImportError:
        torch = None
    best = {"flops_per_s": 0.0}
    rng = np.random.default_rng(0)
    for size in sizes:
        a, b = (rng.standard_normal((size, size), np.float32) for _ in range(2))
        for name, mm in libs.items():
            x, y = (torch.from_numpy(a), torch.from_numpy(b)) if name != "numpy" else (a, b)
            mm(x, y)  # warm-up: thread pools, page faults of the output
            rate = 2 * size ** 3 / min(timed(lambda: mm(x, y), runs))
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "library": name, "size": size}
    return best


def weight_bytes_per_step(model: ParTransformer) -> int:
    """Bytes of the weight matrices one sampling step reads (every layer's and the vocabulary head), compute dtype."""
    cfg = model.config
    per_layer = cfg.dim * 3 * cfg.dim + cfg.dim * cfg.dim + 3 * cfg.dim * cfg.mlp_hidden
    return (cfg.num_layers * per_layer + cfg.dim * cfg.vocab_size) * jnp.dtype(cfg.dtype).itemsize


def matmul_floor_fn(cfg, chunks, rows_per_token: int, graphdef):
    """A jitted function running only the weight matmuls of every step on prepared weights (Backend.prepare: its
    graphdef, and the state to call it with), at the sampler's row counts and in scans of the same lengths. Every
    output element is used (q+k+v feeds the output projection, the logits' row means feed the next step), so XLA
    cannot drop any part of a matmul."""
    dt = jnp.dtype(cfg.dtype)

    def one_step(h, model):
        for layer in model.layers:
            qkv = dense(h, layer.attention.wqkv, dt)                  # (rows, q|k|v, heads, head_dim)
            h = h + dense(qkv.sum(axis=1), layer.attention.wo, dt)
            mlp = layer.feed_forward
            h = h + dense(dense(h, mlp.w1, dt) * dense(h, mlp.w3, dt), mlp.w2, dt)
        return h + jnp.mean(dense(h, model.output, dt), axis=-1, keepdims=True) * 1e-6

    @jax.jit
    def run(state):
        model = nnx.merge(graphdef, state)
        h = jnp.full((rows_per_token, 1, cfg.dim), 1e-3, dt)
        for width, count in chunks:  # chained like the sampler's scans (independent scans could overlap)
            h = jnp.broadcast_to(h[:, :1], (rows_per_token, width, cfg.dim)).reshape(-1, cfg.dim)
            h, _ = jax.lax.scan(lambda h, _: (one_step(h, model), None), h, None, length=count)
            h = h.reshape(rows_per_token, width, cfg.dim)
        return h.sum()
    return run


def call_cost(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, every thread) of one call. CPU time is what a call costs even
    when other jobs share the cores (then wall time is mostly waiting)."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict, runs: int) -> tuple[dict, dict]:
    """Time every function once per round, `runs` rounds: {name: [seconds]}, {name: [steal seconds]}.

    Interleaving puts the sampler and its floors under the same machine conditions in every round (on a shared VM the
    speed drifts by 10-30% over minutes), so the per-round ratio is steadier than a ratio of separate medians.
    """
    times = {k: [] for k in fns}
    steal = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            s0 = steal_seconds()
            times[k] += timed(fn, 1)
            s1 = steal_seconds()
            steal[k].append(None if s0 is None else s1 - s0)
    return times, steal


def bench_one(args, n: int, bandwidth: float, blas: dict) -> dict:
    cfg = model_config(args.size, n=n, grid_shape=args.grid, vocab_size=args.vocab, num_classes=args.num_classes,
                       dtype=args.dtype, **args.shape)
    release = None
    if args.release:  # both hold the release's random weights; the logits are compared before any timing
        release = release_lib.Release(args.release, cfg)
        model = release.par_jax_model()
        diff, scale = release_lib.max_logits_difference(release, model)
        if not diff <= 1e-4 * max(scale, 1.0):
            raise RuntimeError(f"the release's logits and par_jax's differ by up to {diff:.3g} (largest logit "
                               f"{scale:.3g}) on the same weights: the comparison would not be of the same model.")
        print(f"  n={n}: release and par_jax logits agree (largest difference {diff:.2e}, largest logit "
              f"{scale:.2f})", flush=True)
    else:
        model = ParTransformer(cfg, rngs=nnx.Rngs(0))
        model.output[...] = jax.random.normal(jax.random.key(1), model.output.shape) * cfg.init_std  # non-trivial head
    settings = SampleSettings(guidance=args.guidance, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p)
    attention = None if args.attention == "auto" else args.attention
    matmul = None if args.matmul == "auto" else args.matmul
    sampler = Sampler(model, settings, batch_size=args.batch, cache_chunks=args.cache_chunks, attention=attention,
                      matmul=matmul)
    compile_s = sampler.compile()
    baseline = None
    if args.baseline_attention or args.baseline_matmul:  # the same sampler, another option, in the same rounds
        baseline = Sampler(model, settings, batch_size=args.batch, cache_chunks=args.cache_chunks,
                           attention=args.baseline_attention or attention, matmul=args.baseline_matmul or matmul)
        baseline.compile()
    labels = np.arange(args.batch, dtype=np.int32) % cfg.num_classes
    key = jax.random.key(0)
    steps = cfg.layout.num_steps

    # Scans of the same lengths as the sampler's (step widths x cache chunks), without attention or sampling.
    chunks = [(c.width, len(c.starts)) for c in plan_chunks(cfg.layout, sampler.plan.cache_chunks)]
    rows_per_token = args.batch * (2 if settings.guided else 1)
    floor_fn = matmul_floor_fn(cfg, chunks, rows_per_token, sampler._graphdef)
    fns = {"sampler": lambda: sampler(labels, key)}
    if baseline is not None:
        fns["baseline"] = lambda: baseline(labels, key)
    if release is not None:
        fns["release"] = lambda: release.sample(labels, args.guidance, args.temperature, args.top_k, args.top_p)
    used = sampler.backend
    own = (used.matmul, used.block_cols if used.matmul == "xla" else None)
    forms = {own}
    if args.floor_forms == "both":  # XLA's dots on whole matrices and on column blocks, whatever the sampler chose
        forms |= {("xla", 0), ("xla", backend.default_block_cols())}
    for matmul, block_cols in sorted(forms, key=str, reverse=True):
        weights = (sampler.weights if (matmul, block_cols) == own else
                   dataclasses.replace(used, matmul=matmul, block_cols=block_cols or 0).prepare(model)[1])
        name = "matmul=cpu_kernel" if block_cols is None else f"matmul=xla,block_cols={block_cols}"
        fns[name] = functools.partial(floor_fn, weights)
    first = call_cost(fns["sampler"])  # the compiled program's first run (what a one-off sample() pays)
    for i in range(args.warmup):
        for name, fn in fns.items():
            if i or name != "sampler":
                jax.block_until_ready(fn())
    runs, steal = interleaved(fns, args.runs)
    later = call_cost(fns["sampler"])
    times = runs.pop("sampler")
    base_times = runs.pop("baseline", None)
    release_times = runs.pop("release", None)
    steal.pop("baseline", None)
    steal.pop("release", None)
    floor_runs = [min(r) for r in zip(*runs.values())]  # the fastest form in each round
    xla_forms = [v for k, v in runs.items() if k.startswith("matmul=xla")]
    xla_floor_runs = [min(r) for r in zip(*xla_forms)] if xla_forms else None
    per_batch = statistics.median(times)
    matmul_floor = statistics.median(floor_runs)
    floors = {k: statistics.median(v) for k, v in runs.items()}
    del fns
    wbytes = weight_bytes_per_step(model)
    bw_floor = steps * wbytes / bandwidth
    positions = sum(width * count for width, count in chunks)  # sequence positions fed, all steps
    flops = 2 * rows_per_token * positions * wbytes // jnp.dtype(cfg.dtype).itemsize
    flops_floor = flops / blas["flops_per_s"]
    physical = max(bw_floor, flops_floor)
    row = {
        "size": args.size, "layers": cfg.num_layers, "heads": cfg.num_heads, "dim": cfg.dim, "n": n,
        "grid": list(cfg.grid_shape), "batch": args.batch, "guidance": args.guidance,
        "dtype": args.dtype, "attention": used.attention, "attention_why": used.attention_why, "matmul": used.matmul,
        "sampler": sampler.describe(), "steps": steps, "compile_s": compile_s,
        "s_per_batch": per_batch,
        "s_per_batch_runs": times, "ms_per_step": 1e3 * per_batch / steps, "images_per_s": args.batch / per_batch,
        "s_per_sample": per_batch / args.batch,  # an image, or a whole clip for a (t, h, w) video grid
        "matmul_floor_s": matmul_floor, "matmul_floor_runs": floor_runs, "matmul_floor_by_form_s": floors,
        "vs_matmul_floor": statistics.median([t / f for t, f in zip(times, floor_runs)]),
        "vs_matmul_floor_of_medians": per_batch / matmul_floor, "steal_s_runs": steal,
        "xla_matmul_floor_s": xla_floor_runs and statistics.median(xla_floor_runs),
        "vs_xla_matmul_floor": xla_floor_runs and statistics.median([t / f for t, f in zip(times, xla_floor_runs)]),
        "weight_bytes_per_step": wbytes, "bandwidth_floor_s": bw_floor, "vs_bandwidth_floor": per_batch / bw_floor,
        "weights_GBps": steps * wbytes / per_batch / 1e9,
        "first_call_s": first[0], "first_call_vs_median": first[0] / per_batch, "first_call_cpu_s": first[1],
        "later_call_cpu_s": later[1], "first_call_cpu_vs_later": first[1] / later[1],
        "weight_matmul_flops": flops, "blas": blas, "flops_floor_s": flops_floor,
        "vs_flops_floor": per_batch / flops_floor, "physical_floor_s": physical,
        "physical_floor_is": "bandwidth" if bw_floor >= flops_floor else "flops",
        "vs_physical_floor": per_batch / physical,
    }
    card = table_bandwidth(jax.devices()[0].device_kind)
    if card is not None:
        row.update(device_bandwidth_GBps=card / 1e9, vs_device_bandwidth=row["weights_GBps"] * 1e9 / card)
    if base_times is not None:
        row.update(baseline_attention=baseline.backend.attention, baseline_matmul=baseline.backend.matmul,
                   baseline_s_per_batch=statistics.median(base_times),
                   baseline_s_per_batch_runs=base_times,
                   vs_baseline=statistics.median([t / b for t, b in zip(times, base_times)]))
    if release_times is not None:
        import torch  # noqa: PLC0415
        row.update(release_s_per_batch=statistics.median(release_times), release_s_per_batch_runs=release_times,
                   speedup_vs_release=statistics.median([r / t for r, t in zip(release_times, times)]),
                   release_logits_max_abs_diff=diff, release_logits_max_abs=scale,
                   release_torch=torch.__version__, release_torch_threads=torch.get_num_threads())
    ref = TORCH_RELEASE_CPU_S_QUOTED.get(n)
    same_setting = ((cfg.num_layers, cfg.num_heads, cfg.dim) == SIZES["B"] and tuple(cfg.grid_shape) == (24, 24)
                    and args.batch == 1)
    if release is None and ref and same_setting and jax.devices()[0].platform == "cpu":
        row["torch_release_s_per_image_quoted"] = ref  # another day's figure: no ratio is formed with it
    del model, sampler, baseline, release
    return row


def add_speedups(rows: list[dict]) -> None:
    """PAR's own speed-up: seconds per batch at n=1 over those at n, next to the step ratio, when n=1 was run too.

    (PAR reports 3.6x at n=4 and 9.5x at n=16 on an A100 against step ratios of 3.9x and 11.3x.)
    """
    base = next((r for r in rows if r["n"] == 1), None)
    if base is None:
        return
    for r in rows:
        r["speedup_vs_n1"] = base["s_per_batch"] / r["s_per_batch"]
        r["step_ratio_vs_n1"] = base["steps"] / r["steps"]


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else spec.format(value)


def parse_grid(text: str) -> tuple[int, ...]:
    return tuple(int(g) for g in text.lower().split("x"))


def define_flags(fv: flags.FlagValues, argv) -> None:
    config_args.define_config(fv, argv, "Optional experiment config whose model and sample blocks set the defaults "
                              "below, e.g. configs/par.py:size=B,res=384.")
    flags.DEFINE_string("size", "B", "Model size.", flag_values=fv)
    flags.DEFINE_string("n", "1,4,16", "Comma-separated tokens per step, one row each.", flag_values=fv)
    flags.DEFINE_string("grid", "24x24", "HxW or TxHxW tokens.", flag_values=fv)
    flags.DEFINE_integer("batch", 1, "Images per call.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("guidance", 1.5, "Classifier-free guidance scale.", flag_values=fv)
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "Top-k (0: off).", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "Top-p (1: off).", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "Compute dtype.", flag_values=fv)
    flags.DEFINE_integer("vocab", 16384, "Vocabulary size.", flag_values=fv)
    flags.DEFINE_integer("num_classes", 1000, "Classes.", flag_values=fv)
    flags.DEFINE_integer("cache_chunks", 4, "Sampler(cache_chunks=...).", flag_values=fv)
    flags.DEFINE_enum("attention", "auto", ("auto",) + backend.ATTENTION,
                      "Sampler(attention=...); auto: the CPU kernel for float32 on one CPU device, else xla.",
                      flag_values=fv)
    flags.DEFINE_enum("baseline_attention", "", ("",) + backend.ATTENTION,
                      "Also time the sampler with this attention in the same rounds (reports the paired ratio).",
                      flag_values=fv)
    flags.DEFINE_enum("matmul", "auto", ("auto",) + backend.MATMUL,
                      "Sampler(matmul=...); auto: the CPU kernel for float32 on one CPU device, else xla.",
                      flag_values=fv)
    flags.DEFINE_enum("baseline_matmul", "", ("",) + backend.MATMUL,
                      "Also time the sampler with these weight matmuls in the same rounds (reports the paired ratio).",
                      flag_values=fv)
    flags.DEFINE_enum("floor_forms", "both", ("both", "sampler"),
                      "Weight layouts timed for the matmul floor: whole matrices and (on CPU) 256-column blocks "
                      "(both), or only the sampler's own (halves the floor's time for long throughput runs).",
                      flag_values=fv)
    flags.DEFINE_string("release", "", "A checkout of the PyTorch PAR release (github.com/YuqingWang1029/PAR): "
                        "time its sampling loop in the same rounds, on the same random weights.", flag_values=fv)
    flags.DEFINE_integer("runs", 3, "Timed calls after the warm-up (median reported); at least 3.", lower_bound=3,
                         flag_values=fv)
    flags.DEFINE_integer("warmup", 1, "Untimed calls first.", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("json", "bench_sample.json", "Where the rows go (rewritten after every n).", flag_values=fv)


def settings_from_flags(f: flags.FlagValues):
    """The run's settings as one namespace: each flag, or (when --config is given and the flag is not) the config's
    model and sample fields."""
    names = ("size", "n", "grid", "batch", "guidance", "temperature", "top_k", "top_p", "dtype", "vocab",
             "num_classes", "cache_chunks", "attention", "matmul", "baseline_attention", "baseline_matmul",
             "floor_forms", "release", "runs", "warmup", "json")
    args = {k: f[k].value for k in names}
    args["shape"] = {}  # a config's num_layers / num_heads / dim overrides of its named size
    config = f.config
    if config is not None:
        if "model" not in config and "par" in config:  # a demo config: its decoder experiment is config.par
            config = config.par
        m, s = config.model, config.sample
        from_config = dict(size=m.size, n=str(m.n), grid="x".join(map(str, m.grid_shape)), dtype=m.dtype,
                           vocab=m.vocab_size, num_classes=m.num_classes, guidance=s.guidance,
                           temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        args.update({k: v for k, v in from_config.items() if not f[k].present})
        if not f["size"].present:  # the config's model exactly, not the named size it starts from
            args["shape"] = {k: m[k] for k in ("num_layers", "num_heads", "dim") if k in m}
    try:
        args["grid"] = parse_grid(args["grid"])
        [int(x) for x in args["n"].split(",")]
    except ValueError:
        raise config_args.UsageError(f"--grid is HxW (e.g. 24x24) or TxHxW for video (e.g. 5x16x16) and --n "
                                     f"comma-separated integers; got {args['grid']!r} and {args['n']!r}.") from None
    if len(args["grid"]) not in (2, 3) or min(args["grid"]) < 1:
        raise config_args.UsageError(f"--grid is HxW (e.g. 24x24) or TxHxW for video (e.g. 5x16x16), every size "
                                     f"positive; got {'x'.join(map(str, args['grid']))}.")
    if args["release"]:
        release_lib.check_checkout(args["release"])
    return types.SimpleNamespace(**args)


def main(argv=None):
    args = settings_from_flags(config_args.parse_flags(argv, define_flags, doc=__doc__))

    info = machine()
    bandwidth = copy_bandwidth()
    info["copy_bandwidth_GBps"] = bandwidth / 1e9
    blas = blas_matmul_rate()
    info["blas"] = blas
    print(f"# {info['cpu']} ({info['cpu_count']} cores), {info['platform']} x{info['device_count']}, jax "
          f"{info['jax']}, copy bandwidth {bandwidth / 1e9:.1f} GB/s, BLAS float32 {blas['flops_per_s'] / 1e9:.0f} "
          f"GFLOP/s ({blas['library']}), load average {info['loadavg_start']:.2f}")
    rows = []

    def write_json():
        with open(args.json, "w") as f:
            recorded = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
            recorded["json"] = os.path.basename(args.json)  # the file names itself, not this machine's folders
            if args.release:  # the checkout's folder name, not where it lies on this machine
                recorded["release"] = os.path.basename(os.path.normpath(args.release))
            json.dump({"machine": info, "args": recorded, "results": rows}, f, indent=2)

    for n in (int(x) for x in args.n.split(",")):
        rows.append(bench_one(args, n, bandwidth, blas))
        r = rows[-1]
        print(f"  n={n}: {r['s_per_batch']:.2f} s/batch (runs {', '.join(f'{t:.2f}' for t in r['s_per_batch_runs'])}; "
              f"floor {', '.join(f'{t:.2f}' for t in r['matmul_floor_runs'])})", flush=True)
        write_json()  # after every n: long throughput runs keep what they measured if stopped
    info["loadavg_end"] = loadavg()
    add_speedups(rows)

    head = (f"{'n':>3} {'steps':>5} {'compile s':>9} {'s/batch':>8} {'ms/step':>8} {'img/s':>7} {'matmul floor':>12} "
            f"{'x floor':>7} {'bw floor':>8} {'x bw':>5} {'flops floor':>11} {'x flops':>7} {'x physical':>10} "
            f"{'GB/s':>7} {'of card':>7} {'vs n=1':>6} {'step x':>6} {'release s':>9} {'speed-up':>8} "
            f"{'release s, quoted':>17}")
    blas = rows[0]["blas"]
    print(f"\nsize {args.size} ({rows[0]['layers']} layers, dim {rows[0]['dim']}), "
          f"grid {'x'.join(map(str, args.grid))}, batch {args.batch}, guidance {args.guidance}, "
          f"{args.dtype}, attention {rows[0]['attention']} ({rows[0]['attention_why']}), median of {args.runs} runs; "
          f"BLAS float32 peak {blas['flops_per_s'] / 1e9:.0f} GFLOP/s ({blas['library']}, {blas['size']}^2)")
    print(head)
    for r in rows:
        print(f"{r['n']:>3} {r['steps']:>5} {r['compile_s']:>9.1f} {r['s_per_batch']:>8.2f} {r['ms_per_step']:>8.1f} "
              f"{r['images_per_s']:>7.2f} {r['matmul_floor_s']:>12.2f} {r['vs_matmul_floor']:>6.2f}x "
              f"{r['bandwidth_floor_s']:>8.2f} {r['vs_bandwidth_floor']:>4.2f}x {r['flops_floor_s']:>11.2f} "
              f"{r['vs_flops_floor']:>6.2f}x {r['vs_physical_floor']:>9.2f}x {r['weights_GBps']:>7.1f} "
              f"{_fmt(r.get('vs_device_bandwidth'), '{:7.0%}', 7)} {_fmt(r.get('speedup_vs_n1'), '{:5.2f}x', 6)} "
              f"{_fmt(r.get('step_ratio_vs_n1'), '{:5.2f}x', 6)} {_fmt(r.get('release_s_per_batch'), '{:9.2f}', 9)} "
              f"{_fmt(r.get('speedup_vs_release'), '{:7.2f}x', 8)} "
              f"{_fmt(r.get('torch_release_s_per_image_quoted'), '{:17.1f}', 17)}")
    print("x physical: over the larger of the bandwidth and flops floors; speed-up: the release's seconds over "
          "par_jax's, median of per-round ratios (same rounds, same weights)")
    if len(args.grid) == 3:  # video: a sample is a whole clip of t latent frames
        for r in rows:
            print(f"n={r['n']}: {r['steps']} steps, {r['s_per_sample']:.3f} s per video ({args.grid[0]} latent "
                  f"frames of {args.grid[1]}x{args.grid[2]} tokens)")
    for r in rows:
        print(f"n={r['n']}: first call of the compiled sampler {r['first_call_s']:.2f} s = "
              f"{r['first_call_vs_median']:.2f}x the median call; process CPU {r['first_call_cpu_s']:.2f} s vs "
              f"{r['later_call_cpu_s']:.2f} s for a later call = {r['first_call_cpu_vs_later']:.2f}x")
        if "vs_baseline" in r:
            print(f"n={r['n']}: {r['s_per_batch']:.2f} s with {r['attention']} attention and {r['matmul']} matmuls, "
                  f"{r['baseline_s_per_batch']:.2f} s with {r['baseline_attention']} and {r['baseline_matmul']}: "
                  f"{r['vs_baseline']:.2f}x (median of per-round ratios)")
        if r["vs_xla_matmul_floor"] is not None:
            print(f"n={r['n']}: {r['vs_xla_matmul_floor']:.2f}x XLA's matmul floor ({r['xla_matmul_floor_s']:.2f} s); "
                  f"floor by form: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["matmul_floor_by_form_s"].items()))
    write_json()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    config_args.run(main)
