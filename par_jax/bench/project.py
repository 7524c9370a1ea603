r"""Projected sampling floors on Cloud TPUs, from the sampler's own program compiled for them (no TPU needed).

    TPUENV/bin/python -m par_jax.bench.project --accelerator=v5e,v5p,v6e --size=XL,3B --n=1,4,16 \
        --json=docs/bench/tpu_projection.json

TPUENV is a virtual environment with libtpu (`python -m venv --system-site-packages TPUENV &&
TPUENV/bin/pip install "jax[tpu]==<this jax>"`; libtpu compiles for any Cloud TPU generation on a Linux machine
without one). `--accelerator=cpu` compiles the same programs for this machine's CPU (the tests do).

For every accelerator, size, n and batch (default: 1 and 64 images, guidance 1.5, 24x24 tokens, bfloat16, random
weights), the sampler's whole program (`sampler._generate_jit`: all the steps of one call) is lowered with abstract
arguments placed on one chip and compiled by XLA for that chip, with the accelerator choices of
`sampling/backend.py` (whole matrices, the (B, S, heads, head_dim) KV cache, XLA's attention). From the compiled
program:

  memory   XLA's memory analysis: arguments (the prepared bfloat16 weights, float32 embeddings), temporaries (the KV
           cache, logits) and outputs. A `Sampler` also keeps the float32 parameters it was given, so "fits" asks
           whether program + float32 parameters stay within the chip's HBM. A program XLA cannot fit in HBM fails
           to compile; the row then says "does not fit" with XLA's figure.
  cost     XLA's cost analysis: bytes accessed and flops of one call. XLA counts the body of a while loop once,
           whatever its trip count (measured with libtpu 0.0.42.1 and XLA:CPU: a `lax.scan` of 2 and of 10 matmul
           steps report the same cost), and the sampler is a few scans over steps (`sampler.plan_chunks`). So each
           scan's body is compiled alone (`sampler._step` at that scan's width and cache length) and
           (trips - 1) x its cost is added; the compiled program's while loops are checked against the scans first.
  floor    max(bytes / bandwidth, flops / bf16 peak) for one call over the batch: seconds per image if the chip ran
           at its published limits (bandwidth: bench.common.DEVICE_BANDWIDTH; peak: training.flops.PEAK_BF16_FLOPS),
           and which of the two binds. A projection, never a
           measurement: real programs add launch gaps, imperfect overlap and under-filled matrix units.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from par_jax.bench.common import table_bandwidth
from par_jax.core import config_args
from par_jax.model import SIZES, count_params, model_config
from par_jax.sampling import sampler as sampler_lib
from par_jax.sampling.backend import Backend
from par_jax.sampling.sampler import SampleSettings
from par_jax.training import flops as flops_lib
from par_jax.training import memory

GiB = 2**30
TPUS = ("v5e", "v5p", "v6e", "v4")   # one chip of each generation
# What the sampler runs on an accelerator (Backend.choose off the CPU), built explicitly: the compile is offline.
ACCELERATOR_BACKEND = Backend(attention="xla", block_cols=0, seq_last=False,
                              attention_why="as Backend.choose picks on accelerators")


@dataclasses.dataclass(frozen=True)
class Target:
    """One chip to compile for."""
    name: str                      # "v5e", ..., or "cpu"
    device: Any                    # a compile-only TPU device, or this machine's CPU device
    hbm_bytes: int                 # 0: unknown (CPU)
    bandwidth: Optional[float]     # bytes/s, published
    bf16_peak: Optional[float]     # flop/s, published

    @property
    def kind(self) -> str:
        return self.device.device_kind


def target(name: str, hbm_bytes: Optional[int] = None) -> Target:
    """One chip of the TPU generation `name` (the first device of its smallest slice: libtpu builds no 1-chip
    topology, and a one-device program does not depend on the rest), or this machine's CPU ("cpu")."""
    if name == "cpu":
        device = jax.devices("cpu")[0]
        return Target(name, device, hbm_bytes or 0, None, None)
    if name not in TPUS:
        raise config_args.UsageError(f"--accelerator: unknown {name!r}; use {', '.join(TPUS)} or cpu.")
    if not memory.tpu_compiler_available():
        raise config_args.UsageError(
            f"--accelerator={name} compiles for a TPU and needs libtpu, which this Python lacks: run with a venv "
            f"that has it (python -m venv --system-site-packages DIR && DIR/bin/pip install "
            f"'jax[tpu]=={jax.__version__}'), or use --accelerator=cpu.")
    _, cores_per_chip, _, _ = memory.TPU_CHIPS[name]
    acc = memory.accelerator(f"{name}-{4 * cores_per_chip}")
    device = memory.target_devices(acc)[0]
    return Target(name, device, acc.hbm_bytes if hbm_bytes is None else hbm_bytes, table_bandwidth(device.device_kind),
                  flops_lib.table_peak_flops(device, "bfloat16"))


# ----- the programs -----

def _on(device, tree):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _plan(cfg, settings: SampleSettings, batch: int, cache_chunks: int):
    # As Sampler builds it for one device.
    return sampler_lib._Plan(batch=batch, guided=settings.guided, schedule=settings.guidance_schedule,
                             greedy=settings.temperature == 0, top_k=min(int(settings.top_k), cfg.vocab_size),
                             use_top_p=settings.top_p < 1.0, teacher_forced=False, cache_chunks=cache_chunks,
                             backend=ACCELERATOR_BACKEND)


def _scalars(device, batch: int):
    """Abstract (key, guidance, stop_step, temperature, top_p, forced) as the Sampler passes them."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    f32, i32 = jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
    return _on(device, (key, f32, i32, f32, f32, jax.ShapeDtypeStruct((batch, 1), jnp.int32)))


def compile_call(cfg, settings: SampleSettings, batch: int, device, cache_chunks: int = 4):
    """The sampler's whole program for one call, compiled for `device`, and the plan it ran with."""
    plan = _plan(cfg, settings, batch, cache_chunks)
    graphdef, weights = ACCELERATOR_BACKEND.prepare_abstract(cfg)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    args = _on(device, (weights, labels)) + _scalars(device, batch)
    lowered = sampler_lib._generate_jit.lower(*args, graphdef=graphdef, plan=plan)
    return lowered.compile(), plan


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "width"), donate_argnums=(2,))
def _one_step(weights, consts, carry, xs, *, graphdef, plan, width):
    return sampler_lib._step(nnx.merge(graphdef, weights), plan, consts, carry, xs, width=width)


def compile_step(cfg, plan, chunk, device):
    """One step of a scan (`sampler._step` at the chunk's width over its cache length), compiled for `device`; the
    carry (KV cache, tokens) is donated, as it is updated in place inside the scan."""
    graphdef, weights = ACCELERATOR_BACKEND.prepare_abstract(cfg)
    rows = plan.batch * (2 if plan.guided else 1)
    cache = jax.eval_shape(lambda w: plan.backend.init_cache(nnx.merge(graphdef, w), rows, chunk.cache_len), weights)
    key, guidance, stop_step, temperature, top_p, forced = _scalars(device, plan.batch)
    rows_labels = jax.ShapeDtypeStruct((rows,), jnp.int32)
    gen = jax.ShapeDtypeStruct((plan.batch, cfg.num_tokens), jnp.int32)
    consts = (_on(device, rows_labels), key, guidance, stop_step, temperature, top_p, forced)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = _one_step.lower(_on(device, weights), consts, _on(device, (cache, gen)), _on(device, (i32, i32)),
                              graphdef=graphdef, plan=plan, width=chunk.width)
    return lowered.compile()


_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"condition=%([\w.\-]+)")
_LIMIT = re.compile(r"= s32\[\]\S* constant\((\d+)\)")


def _block(text: str, start: int) -> str:
    return text[start:text.index("\n}", start)]


def loop_trip_counts(compiled) -> list[int]:
    """The trip counts of the outermost while loops of a compiled program (those of its ENTRY computation in the
    HLO text), sorted: XLA's known_trip_count where it records one (XLA:CPU), else the constant the loop's
    condition compares its counter with (`i < N`; a scan's counter starts at 0). Inner loops are not listed (XLA:CPU
    runs threefry's rounds as one)."""
    text = compiled.as_text()
    counts = []
    for line in _block(text, text.index("\nENTRY")).splitlines():
        if " while(" not in line:
            continue
        known = _TRIP.search(line)
        if known:
            counts.append(int(known.group(1)))
            continue
        condition = _block(text, text.index(f"\n%{_CONDITION.search(line).group(1)} "))
        limits = _LIMIT.findall(condition) if "direction=LT" in condition else []
        if len(limits) != 1:
            raise RuntimeError(f"cannot read the trip count of a while loop from its condition:\n{condition}")
        counts.append(int(limits[0]))
    return sorted(counts)


def cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"bytes": float(analysis["bytes accessed"]), "flops": float(analysis["flops"])}


def call_cost(cfg, plan, compiled, device) -> tuple[dict, dict]:
    """(cost of one call with every scan counted trips times, the details): XLA's cost of the whole program plus
    (trips - 1) x the cost of each scan's body compiled alone (XLA counts a while loop's body once)."""
    chunks = sampler_lib.plan_chunks(cfg.layout, plan.cache_chunks)
    scans = sorted(len(c.starts) for c in chunks if len(c.starts) > 1)
    loops = loop_trip_counts(compiled)
    if loops != scans:
        raise RuntimeError(f"the compiled program's while loops run {loops} times, the sampler's scans {scans}: "
                           f"XLA changed the loops (unrolled some?), so the trip-count correction does not apply.")
    total = cost(compiled)
    per_scan = []
    for chunk in chunks:
        trips = len(chunk.starts)
        body = cost(compile_step(cfg, plan, chunk, device)) if trips > 1 else {"bytes": 0.0, "flops": 0.0}
        per_scan.append({"width": chunk.width, "trips": trips, "cache_len": chunk.cache_len, **body})
        for k in total:
            total[k] += (trips - 1) * body[k]
    return total, {"uncorrected": cost(compiled), "scans": per_scan}


# ----- one row -----

def floor(bytes_accessed: float, flops: float, bandwidth: Optional[float], peak: Optional[float]):
    """(seconds, "bandwidth" | "compute"): the slower of moving the bytes and doing the flops at the chip's limits;
    (None, None) without published figures."""
    if not bandwidth or not peak:
        return None, None
    memory_s, compute_s = bytes_accessed / bandwidth, flops / peak
    return max(memory_s, compute_s), ("bandwidth" if memory_s >= compute_s else "compute")


def project(tgt: Target, size: str, n: int, batch: int, settings: SampleSettings, *, grid=(24, 24),
            dtype: str = "bfloat16", cache_chunks: int = 4, overrides: Optional[dict] = None) -> dict:
    """One row: memory, cost and floor of one sampling call of PAR-`size`-`n` at `batch` images on one chip."""
    cfg = model_config(size, n=n, grid_shape=tuple(grid), dtype=dtype, **(overrides or {}))
    f32_params = 4 * count_params(cfg)
    row = {"label": "projection", "accelerator": tgt.name, "device_kind": tgt.kind, "size": size, "n": n,
           "batch": batch, "guidance": settings.guidance, "grid": list(grid), "dtype": dtype,
           "steps": cfg.layout.num_steps, "hbm_gib": tgt.hbm_bytes / GiB,
           "float32_params_gib": f32_params / GiB}
    try:
        compiled, plan = compile_call(cfg, settings, batch, tgt.device, cache_chunks)
    except jax.errors.JaxRuntimeError as e:
        need = memory.oom_temporaries(e)
        if need is None:
            raise
        row.update(fits=False, temporaries_gib=need / GiB, note=f"does not fit: XLA needs {need / GiB:.1f} GiB "
                   f"of temporaries (of {tgt.hbm_bytes / GiB:.0f} GiB) to compile it")
        return row
    stats = compiled.memory_analysis()
    parts = {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
             "outputs": stats.output_size_in_bytes - stats.alias_size_in_bytes,
             "code": stats.generated_code_size_in_bytes}
    program = sum(parts.values())
    row.update(program_gib=program / GiB, parts_gib={k: v / GiB for k, v in parts.items()})
    if tgt.hbm_bytes:
        row["fits"] = program + f32_params <= tgt.hbm_bytes
        if not row["fits"]:
            row["note"] = (f"does not fit: program {program / GiB:.1f} GiB + float32 parameters "
                           f"{f32_params / GiB:.1f} GiB > {tgt.hbm_bytes / GiB:.0f} GiB")
    total, details = call_cost(cfg, plan, compiled, tgt.device)
    seconds, bound = floor(total["bytes"], total["flops"], tgt.bandwidth, tgt.bf16_peak)
    row.update(bytes_accessed=total["bytes"], flops=total["flops"], cost_details=details,
               bandwidth=tgt.bandwidth, bf16_peak=tgt.bf16_peak,
               floor_s_per_call=seconds, floor_s_per_image=None if seconds is None else seconds / batch,
               images_per_s=None if seconds is None else batch / seconds, bound=bound)
    return row


# ----- output -----

def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table; every figure in it is a projection."""
    lines = ["| chip | model | batch | steps | program GiB (args, temps) | fits | GB accessed | TFLOP | "
             "floor s/image (projection) | images/s (projection) | bound |", "|---" * 11 + "|"]
    for r in rows:
        model = f"PAR-{r['size']}-{r['n']}x" if r["n"] > 1 else f"{r['size']}, n=1"
        batch = f"{r['batch']}" + (f", cfg {r['guidance']:g}" if r["guidance"] != 1 else "")
        fits = "-" if "fits" not in r else ("yes" if r["fits"] else "**no**")
        if "parts_gib" not in r:  # XLA could not fit the program
            lines.append(f"| {r['accelerator']} | {model} | {batch} | {r['steps']} | temps {r['temporaries_gib']:.1f} (OOM) | "
                         f"{fits} | - | - | - | - | - |")
            continue
        p = r["parts_gib"]
        floor_s = "-" if r["floor_s_per_image"] is None else f"{r['floor_s_per_image']:.4f}"
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"| {r['accelerator']} | {model} | {batch} | {r['steps']} | {r['program_gib']:.2f} "
                     f"({p['arguments']:.2f}, {p['temporaries']:.2f}) | {fits} | {r['bytes_accessed'] / 1e9:.1f} | "
                     f"{r['flops'] / 1e12:.2f} | {floor_s} | {ips} | {r['bound'] or '-'} |")
    return "\n".join(lines)


def define_flags(fv: flags.FlagValues, argv) -> None:
    flags.DEFINE_list("accelerator", list(TPUS[:3]), f"Chips to compile for: {', '.join(TPUS)} (need libtpu) or cpu.",
                      flag_values=fv)
    flags.DEFINE_list("size", ["XL", "3B"], "Model sizes.", flag_values=fv)
    flags.DEFINE_list("n", ["1", "4", "16"], "Tokens per step.", flag_values=fv)
    flags.DEFINE_list("batch", ["1", "64"], "Images per call.", flag_values=fv)
    flags.DEFINE_float("guidance", 1.5, "Classifier-free guidance scale (1: off, no batch doubling).", flag_values=fv)
    flags.DEFINE_string("grid", "24x24", "HxW tokens.", flag_values=fv)
    flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.", flag_values=fv)
    flags.DEFINE_integer("cache_chunks", 4, "Sampler(cache_chunks=...).", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("hbm_gib", None, "Memory per chip to check against instead of the chip's own.", flag_values=fv)
    flags.DEFINE_string("json", "tpu_projection.json", "Where the rows go (rewritten after every row).",
                        flag_values=fv)
    flags.DEFINE_string("markdown", "", "Also write the markdown table here.", flag_values=fv)


def _ints(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise config_args.UsageError(f"--{name} takes comma-separated integers, got {','.join(values)!r}.") from None


def main(argv=None) -> list[dict]:
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    ns, batches = _ints("n", f.n), _ints("batch", f.batch)
    try:
        grid = tuple(int(g) for g in f.grid.lower().split("x"))
        settings = SampleSettings(guidance=f.guidance)
    except ValueError as e:
        raise config_args.UsageError(f"--grid is HxW (e.g. 24x24) and --guidance a scale >= 0: {e}") from None
    unknown = [size for size in f.size if size not in SIZES]
    if unknown:
        raise config_args.UsageError(f"--size: unknown {', '.join(unknown)}; choose from {', '.join(SIZES)}.")
    tpus = [a for a in f.accelerator if a in TPUS]
    if tpus and memory.tpu_compiler_available():  # the command line is the edge: set before the first TPU use
        acc = memory.accelerator(f"{tpus[0]}-{4 * memory.TPU_CHIPS[tpus[0]][1]}")
        for var, value in memory.offline_tpu_env(acc).items():
            os.environ.setdefault(var, value)
    hbm = None if f.hbm_gib is None else int(f.hbm_gib * GiB)
    targets = [target(name, hbm) for name in f.accelerator]
    rows = []
    for size, n, batch, tgt in itertools.product(f.size, ns, batches, targets):  # the chips of a row side by side
        rows.append(project(tgt, size, n, batch, settings, grid=grid, dtype=f.dtype, cache_chunks=f.cache_chunks))
        r = rows[-1]
        print(f"{tgt.name} {size} n={n} batch={batch}: "
              + (r.get("note") or f"floor {r.get('floor_s_per_image') or 0:.4f} s/image (projection)"), flush=True)
        with open(f.json, "w") as fh:  # after every row: a long run keeps what it compiled if stopped
            json.dump({"label": "projection", "jax": jax.__version__, "libtpu": memory.libtpu_version(),
                       "rows": rows}, fh, indent=1)
    table = markdown(rows)
    print(table)
    if f.markdown:
        with open(f.markdown, "w") as fh:
            fh.write(table + "\n")
    return rows


if __name__ == "__main__":
    config_args.run(main)
