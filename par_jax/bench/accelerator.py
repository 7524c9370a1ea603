r"""One call that takes the whole picture on an accelerator (issue 20, item 4): sampling speed, training MFU, peak
memory, bfloat16 against float32 logits, and the issue's targets, within a time budget.

    python -m par_jax.bench.accelerator [--out=bench_accelerator] [--budget_s=480]

Writes OUT/accelerator.json and OUT/accelerator.md, both rewritten after every measurement, so that a run stopped
at any point keeps what it measured. Nothing is downloaded: every model has random weights.

What it measures, in bfloat16 (PAR_SPEC sections 6 and 7; models from par_jax.model.model_config):
  sampler   PAR-XL and PAR-3B, n = 1, 4, 16, 24x24 tokens (384 px), guidance 1.5, batch 1 and 64: seconds per
            batch (median of --runs calls after a warm-up call), seconds per image, images/s, ms per step; the
            weight bytes read per second against the card's vendor bandwidth (bench.common.table_bandwidth; its
            "bandwidth floor" is steps x weight bytes per step / bandwidth, the floor of a batch-1 call), and the
            speed-up over n = 1 against the step ratio (rows of the same size and batch, from this run; a ratio of
            medians of rows run one after the other, not in interleaved rounds: each row's runs are in the JSON).
  train     the real train step of PAR-XL-4x at 384 px (bench.train.bench_size): its MFU against the vendor
            bfloat16 peak (training.flops), at the largest per-device batch of 64, 32, ... whose memory
            training.memory.estimate puts under 85% of the device's memory (the row says so).
  memory    device.memory_stats() where the backend has it (the process's peak, recorded after every row), and
            XLA's memory analysis of the compiled train step on every backend; each sampler row also carries an
            estimate of what it holds (float32 weights, their compute-dtype copy, the KV cache).
  logits    PAR-XL-4x's teacher-forced logits (Sampler(..., teacher_forced=True).score, guided) in bfloat16 and
            in float32 on the same weights, for the same random tokens: largest and mean absolute difference,
            mean KL(float32 || bfloat16) per token, top-1 agreement.
  targets   each met / not met / not measured: PAR-3B-4x under 0.4 s per image at batch 1 on an H100 (on another
            card the 0.4 s is scaled by its bandwidth over the H100's, and the target says so); a speed-up over
            n = 1 of at least 3.8x at n = 4 and 10.5x at n = 16 (XL and 3B, batch 1); at least 40 images/s for
            PAR-XL-4x at batch 64; training PAR-XL at 40% MFU or more.

Budget: the rows run in order of importance (the targets' rows first). Before each row the script estimates its
seconds (from the rows already measured: compile times and weight bytes per second; before any, a guess) and its
memory; a row that would not fit in the remaining --budget_s or in the device's memory is skipped and recorded
with the reason, as is a row that fails (its error's first line). Progress and an ETA (the sum of the remaining
estimates) are printed after every row.

On a CPU (or with --tiny) the same program runs on tiny stand-ins, so that CI runs the script: PAR-XL becomes size
tiny and PAR-3B size small, 8x8 tokens, a 512-word vocabulary, 10 classes, batch 1 and 64, the train step at batch
4; the peak the MFU divides by is then a bfloat16 matmul chain measured after each step (training.flops.MatmulProbe),
and every target is labelled as a check of the mechanics, not a verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from par_jax.bench import common
from par_jax.bench import train as bench_train
from par_jax.bench.sample import add_speedups, copy_bandwidth, interleaved, weight_bytes_per_step
from par_jax.core import config_args
from par_jax.core import mesh as mesh_lib, sharding as sharding_lib
from par_jax.model import ParTransformer, from_config_dict, model_config
from par_jax.sampling.sampler import SampleSettings, Sampler
from par_jax.training import flops, memory

GUIDANCE = 1.5
DTYPE = "bfloat16"
H100 = "H100"  # the card target 1 is stated for
TARGET_3B_S_PER_IMAGE = 0.4          # PAR-3B-4x, batch 1, on an H100
TARGET_SPEEDUP = {4: 3.8, 16: 10.5}  # over n = 1, batch 1
TARGET_XL_IMAGES_PER_S = 40.0        # PAR-XL-4x, batch 64
TARGET_MFU = 0.40                    # PAR-XL train step
MEMORY_SHARE = 0.85                  # of the device's memory a row may plan to use
TRAIN_DEVICE_BATCHES = (64, 32, 16, 8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The sizes and shapes one run measures: the real ones, or the tiny stand-ins CPU runs use."""
    tiny: bool
    sizes: dict            # role (what the issue names: "XL", "3B") -> model_config size
    grid: tuple
    vocab: int
    num_classes: int
    batches: tuple
    ns: tuple
    train_res: int
    cache_chunks: int      # Sampler(cache_chunks=...): 1 for 64 tokens, where splitting the cache saves nothing


    @classmethod
    def make(cls, tiny: bool) -> "Setup":
        if tiny:
            return cls(True, {"XL": "tiny", "3B": "small"}, (8, 8), 512, 10, (1, 64), (1, 4, 16), 128, 1)
        return cls(False, {"XL": "XL", "3B": "3B"}, (24, 24), 16384, 1000, (1, 64), (1, 4, 16), 384, 4)

    def model_cfg(self, role: str, n: int, dtype: str = DTYPE):
        return model_config(self.sizes[role], n=n, grid_shape=self.grid, vocab_size=self.vocab,
                            num_classes=self.num_classes, dtype=dtype)


def random_model(cfg) -> ParTransformer:
    """Initialised weights, and a random vocabulary head (initialised to zeros) so that logits and samples vary."""
    model = ParTransformer(cfg, rngs=nnx.Rngs(0))
    model.output[...] = jax.random.normal(jax.random.key(1), model.output.shape) * cfg.init_std
    return model


def param_bytes(cfg) -> int:
    """Bytes of the model's float32 parameters, from abstract shapes (nothing allocated)."""
    state = nnx.state(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def sampler_bytes_estimate(cfg, batch: int) -> int:
    """What a guided sampler holds: float32 weights, their compute-dtype copy, and a KV cache over the sequence."""
    weights = param_bytes(cfg)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    cache = 2 * cfg.num_layers * (2 * batch) * cfg.layout.seq_len * cfg.dim * itemsize
    return weights + weights * itemsize // 4 + cache


def device_memory() -> dict | None:
    """device.memory_stats() of the first local device (bytes in use, the process's peak, the limit), or None."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def one_chip() -> jax.sharding.Mesh:
    """A mesh of the first local device: the sampler rows measure one chip, also on a host with several (a TPU VM
    has 4-8; without a mesh the sampler would split the batch over all of them and a batch of 1 could not run)."""
    return mesh_lib.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


# ----- the rows -----

def sampler_row(setup: Setup, role: str, n: int, batch: int, runs: int, card_bandwidth: float) -> dict:
    """One sampler configuration: compile, one warm-up call, `runs` timed calls (bench.sample.interleaved)."""
    cfg = setup.model_cfg(role, n)
    model = random_model(cfg)
    sampler = Sampler(model, SampleSettings(guidance=GUIDANCE), batch_size=batch, cache_chunks=setup.cache_chunks,
                      mesh=one_chip())
    compile_s = sampler.compile()
    labels = np.arange(batch, dtype=np.int32) % cfg.num_classes
    key = jax.random.key(0)
    jax.block_until_ready(sampler(labels, key))
    times, steal = interleaved({"sampler": lambda: sampler(labels, key)}, runs)
    times = times["sampler"]
    per_batch = statistics.median(times)
    steps = cfg.layout.num_steps
    wbytes = weight_bytes_per_step(model)
    floor = steps * wbytes / card_bandwidth
    del model, sampler
    return {
        "role": role, "size": setup.sizes[role], "n": n, "batch": batch, "grid": list(cfg.grid_shape),
        "guidance": GUIDANCE, "dtype": cfg.dtype, "steps": steps, "compile_s": compile_s, "s_per_batch": per_batch,
        "s_per_batch_runs": times, "steal_s_runs": steal["sampler"], "s_per_image": per_batch / batch,
        "images_per_s": batch / per_batch, "ms_per_step": 1e3 * per_batch / steps,
        "weight_bytes_per_step": wbytes, "weights_GBps": steps * wbytes / per_batch / 1e9,
        "bandwidth_GBps": card_bandwidth / 1e9, "of_bandwidth": steps * wbytes / per_batch / card_bandwidth,
        "bandwidth_floor_s": floor, "vs_bandwidth_floor": per_batch / floor,
        "held_bytes_estimate": sampler_bytes_estimate(cfg, batch),
    }


def train_config(setup: Setup):
    """configs/par.py for PAR-XL-4x at the setup's resolution (tiny: its vocabulary and classes too)."""
    spec = (os.path.join(common.CHECKOUT_CONFIGS, "par.py"), "", {})
    config = common.experiment(spec, f"size={setup.sizes['XL']}", f"res={setup.train_res}", "n=4")
    config.model.dtype = DTYPE
    if setup.tiny:
        config.model.vocab_size, config.model.num_classes = setup.vocab, setup.num_classes
    return config


def train_device_batch(config, limit: int | None) -> tuple[int, str, int | None]:
    """(per-device batch, why, estimated bytes): the largest of TRAIN_DEVICE_BATCHES whose step
    training.memory.estimate puts under MEMORY_SHARE of `limit`; 4 where no limit is known (CPU)."""
    if limit is None:
        return 4, "no device memory limit known (CPU): batch 4 per device", None
    devices = jax.device_count()
    mesh_shape = dict(zip(mesh_lib.AXES, mesh_lib.mesh_shape(config.mesh, devices)))
    rules = sharding_lib.rules_from_config(config.mesh.get("rules"))
    cfg = from_config_dict(config.model)
    for batch in TRAIN_DEVICE_BATCHES:
        need = memory.estimate(cfg, mesh_shape, rules, global_batch=batch * devices,
                               ema=float(config.optimizer.ema_decay) > 0).total
        if need <= MEMORY_SHARE * limit:
            return batch, (f"the largest of {TRAIN_DEVICE_BATCHES} per device whose step training.memory.estimate "
                           f"puts under {MEMORY_SHARE:.0%} of the device's {limit / 2**30:.1f} GiB "
                           f"({need / 2**30:.1f} GiB)"), need
    raise MemoryError(f"even batch 1 per device needs an estimated {need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB")


def train_row(setup: Setup, runs: int, limit: int | None) -> dict:
    config = train_config(setup)
    device_batch, why, need = train_device_batch(config, limit)
    device = jax.local_devices()[0]
    peak = flops.table_peak_flops(device, DTYPE)
    probe = None if peak is not None else flops.MatmulProbe(DTYPE, 256 if setup.tiny else 2048)
    args = types.SimpleNamespace(dtype=DTYPE, runs=runs)
    row = bench_train.bench_size(config, device_batch * jax.device_count(), args, probe)
    if probe is not None:
        peak = statistics.median(row["matmul_flops_per_s_runs"])
        source = f"median of {DTYPE} matmul chains ({probe.a.shape[0]}^2) timed after each step"
    else:
        source = f"vendor table ({device.device_kind}, {DTYPE})"
    row.update(role="XL", device_batch=device_batch, device_batch_why=why, memory_estimate_bytes=need,
               peak_flops_per_device=peak, peak_source=source,
               mfu=row["achieved_flops_per_s"] / (peak * jax.device_count()),
               flops_floor_s=row["model_flops_per_step"] / (peak * jax.device_count()))
    return row


def logits_row(setup: Setup) -> dict:
    """PAR-XL-4x's guided teacher-forced logits in float32 and bfloat16 from the same weights and tokens."""
    cfg32 = setup.model_cfg("XL", 4, "float32")
    model32 = random_model(cfg32)
    cfg16 = cfg32.replace(dtype=DTYPE)
    graphdef16 = nnx.graphdef(nnx.eval_shape(lambda: ParTransformer(cfg16, rngs=nnx.Rngs(0))))
    model16 = nnx.merge(graphdef16, nnx.state(model32))  # the very same float32 parameter arrays
    tokens = np.random.default_rng(0).integers(0, cfg32.vocab_size, (1, cfg32.num_tokens), dtype=np.int32)
    labels = np.zeros((1,), np.int32)
    settings = SampleSettings(guidance=GUIDANCE)
    out = {}
    for name, model in (("float32", model32), (DTYPE, model16)):
        sampler = Sampler(model, settings, 1, teacher_forced=True, cache_chunks=setup.cache_chunks, mesh=one_chip())
        out[name] = np.asarray(sampler.score(tokens, labels), np.float64)
    a, b = out["float32"], out[DTYPE]
    logp_a = a - _logsumexp(a)
    logp_b = b - _logsumexp(b)
    kl = np.sum(np.exp(logp_a) * (logp_a - logp_b), axis=-1)
    diff = np.abs(a - b)
    return {"role": "XL", "size": setup.sizes["XL"], "n": 4, "grid": list(cfg32.grid_shape), "guidance": GUIDANCE,
            "positions": int(a.shape[1]), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "float32_logits_std": float(a.std()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1)))}


def _logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ----- the plan, its estimates and the targets -----

def plan(roles, ns, batches, parts) -> list[dict]:
    """The jobs in order of importance: the targets' rows, the train step, the batch-1 rows the speed-up targets
    need, the bfloat16/float32 logits, then the remaining throughput rows."""
    big = max(batches)
    jobs = []
    if "sample" in parts:
        jobs += [{"kind": "sample", "role": r, "n": n, "batch": b} for r in roles for n in ns for b in batches]
    if "train" in parts and "XL" in roles:
        jobs.append({"kind": "train", "role": "XL"})
    if "logits" in parts and "XL" in roles:
        jobs.append({"kind": "logits", "role": "XL"})

    def importance(job):
        if job["kind"] != "sample":
            return 2 if job["kind"] == "train" else 4
        if (job["role"], job["n"], job["batch"]) == ("3B", 4, 1):
            return 0
        if (job["role"], job["n"], job["batch"]) == ("XL", 4, big):
            return 1
        return 3 if job["batch"] == 1 else 5
    return sorted(jobs, key=importance)  # stable: sizes, n and batches keep their order within a group


def job_name(job: dict) -> str:
    if job["kind"] == "sample":
        return f"sample {job['role']} n={job['n']} batch {job['batch']}"
    return f"{job['kind']} {job['role']}"


class Estimator:
    """Seconds and bytes a job will take, from what this run has measured so far (before that, a guess)."""

    def __init__(self, setup: Setup, runs: int, bandwidth: float, accelerator: bool):
        self.setup, self.runs, self.bandwidth = setup, runs, bandwidth
        self.compile_guess = 45.0 if accelerator else 8.0
        self.train_guess = 150.0 if accelerator else 20.0  # compile, warm-up and timed steps
        self.compiles: list[float] = []
        self.rates: dict[int, float] = {}  # batch -> the lowest weight bytes per second seen

    def learn(self, job: dict, row: dict) -> None:
        if job["kind"] == "sample":
            self.compiles.append(row["compile_s"])
            rate = row["weights_GBps"] * 1e9
            self.rates[job["batch"]] = min(rate, self.rates.get(job["batch"], rate))

    def compile_s(self) -> float:
        return max(self.compiles, default=self.compile_guess)

    def call_s(self, cfg, batch: int) -> float:
        rate = self.rates.get(batch)
        if rate is None:  # a guess: a quarter of the bandwidth at batch 1, less for larger batches
            rate = self.rates.get(1, 0.25 * self.bandwidth) / (1 if batch == 1 else 4)
        return cfg.layout.num_steps * weight_bytes_per_step_of(cfg) / rate

    def seconds(self, job: dict) -> float:
        s = self.setup
        if job["kind"] == "sample":
            cfg = s.model_cfg(job["role"], job["n"])
            return self.compile_s() + (1 + self.runs) * self.call_s(cfg, job["batch"])
        if job["kind"] == "logits":  # two teacher-forced samplers, one call each
            return 2 * (self.compile_s() + self.call_s(s.model_cfg("XL", 4), 1))
        return self.train_guess

    def bytes(self, job: dict) -> int | None:
        if job["kind"] == "sample":
            return sampler_bytes_estimate(self.setup.model_cfg(job["role"], job["n"]), job["batch"])
        if job["kind"] == "logits":
            return 2 * sampler_bytes_estimate(self.setup.model_cfg("XL", 4, "float32"), 1)
        return None  # the train row picks a batch that fits itself


def weight_bytes_per_step_of(cfg) -> int:
    """bench.sample.weight_bytes_per_step of a model with this config, without building it."""
    return weight_bytes_per_step(types.SimpleNamespace(config=cfg))


def find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with its threshold, the measured value, and met (True / False / None: not measured)."""
    rows, big = result["sampler"], max(result["setup"]["batches"])
    kind = result["machine"]["device_kind"]
    card = common.table_bandwidth(kind)
    h100 = common.table_bandwidth(H100)
    tiny_note = "tiny stand-ins: a check of the mechanics, not a verdict" if result["setup"]["tiny"] else ""
    out = []

    def add(name, value, threshold, at_least: bool, note=""):
        met = None if value is None else (value >= threshold if at_least else value < threshold)
        out.append({"target": name, "value": value, "threshold": threshold,
                    "comparison": ">=" if at_least else "<", "met": met,
                    "note": "; ".join(x for x in (note, tiny_note) if x)})

    r = find(rows, role="3B", n=4, batch=1)
    if card is not None:
        scale, note = h100 / card, f"0.4 s on an H100, scaled by its bandwidth over this card's ({kind})"
    else:
        bw = result["machine"]["copy_bandwidth_GBps"] * 1e9
        scale, note = h100 / bw, "0.4 s on an H100, scaled by its bandwidth over this machine's measured copy bandwidth"
    add("PAR-3B-4x s/image, batch 1", r and r["s_per_image"], TARGET_3B_S_PER_IMAGE * scale, False,
        note if card is None or card != h100 else "")
    for role in ("3B", "XL"):
        for n, threshold in TARGET_SPEEDUP.items():
            r = find(rows, role=role, n=n, batch=1)
            add(f"PAR-{role} speed-up n={n} over n=1, batch 1", r and r.get("speedup_vs_n1"), threshold, True,
                r and r.get("step_ratio_vs_n1") and f"step ratio {r['step_ratio_vs_n1']:.2f}x")
    r = find(rows, role="XL", n=4, batch=big)
    add(f"PAR-XL-4x images/s, batch {big}", r and r["images_per_s"], TARGET_XL_IMAGES_PER_S, True,
        "" if big == 64 else "the issue states it at batch 64")
    t = result["train"]
    add("PAR-XL train step MFU", t and t["mfu"], TARGET_MFU, True, t and f"batch {t['device_batch']} per device")
    return out


# ----- output -----

def markdown(result: dict) -> str:
    m, s = result["machine"], result["setup"]
    lines = [f"# par_jax on {m['device_kind']} x{m['device_count']} ({m['platform']}), jax {m['jax']}",
             "",
             ("**CPU tiny mode**: tiny stand-ins for PAR-XL and PAR-3B (sizes "
              f"{s['sizes']['XL']} and {s['sizes']['3B']}, {'x'.join(map(str, s['grid']))} tokens, vocabulary "
              f"{s['vocab']}); the figures show that the script runs, not how PAR performs." if s["tiny"] else
              f"PAR-XL and PAR-3B, {'x'.join(map(str, s['grid']))} tokens, random weights."),
             "",
             f"{DTYPE}, guidance {GUIDANCE}, median of {result['args']['runs']} calls after a warm-up; floor: "
             f"{result['floor']}. Elapsed {result['elapsed_s']:.0f} s of a {result['args']['budget_s']:.0f} s "
             f"budget.", "",
             "| model | n | batch | steps | compile s | s/batch | s/image | images/s | ms/step | weights GB/s | "
             "of bandwidth | bandwidth floor s | vs n=1 | step ratio | holds GiB (estimate) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["sampler"]:
        speed = f"{r['speedup_vs_n1']:.2f}x" if "speedup_vs_n1" in r else "-"
        ratio = f"{r['step_ratio_vs_n1']:.2f}x" if "step_ratio_vs_n1" in r else "-"
        lines.append(f"| {r['role']} ({r['size']}) | {r['n']} | {r['batch']} | {r['steps']} | {r['compile_s']:.1f} | "
                     f"{r['s_per_batch']:.4g} | {r['s_per_image']:.4g} | {r['images_per_s']:.4g} | "
                     f"{r['ms_per_step']:.3g} | {r['weights_GBps']:.3g} | {r['of_bandwidth']:.1%} | "
                     f"{r['bandwidth_floor_s']:.3g} | {speed} | {ratio} | {r['held_bytes_estimate'] / 2**30:.3g} |")
    t = result["train"]
    if t:
        lines += ["", f"Train step, {t['role']} ({t['size']}), n={t['n']}, {'x'.join(map(str, t['grid']))} tokens, "
                  f"batch {t['batch']} ({t['device_batch_why']}): {1e3 * t['step_s']:.1f} ms per step, "
                  f"{t['tokens_per_s']:.0f} tokens/s, MFU {t['mfu']:.1%} of {t['peak_flops_per_device'] / 1e12:.3g} "
                  f"TFLOP/s per device ({t['peak_source']}); floor {1e3 * t['flops_floor_s']:.1f} ms."]
    lg = result["logits"]
    if lg:
        lines += ["", f"Logits, {lg['role']} ({lg['size']}) n=4, teacher-forced and guided, bfloat16 against float32 "
                  f"on the same weights ({lg['positions']} positions): largest difference {lg['max_abs_diff']:.3g} "
                  f"(mean {lg['mean_abs_diff']:.3g}, float32 logits' std {lg['float32_logits_std']:.3g}), mean KL "
                  f"{lg['kl_mean']:.3g} nats, top-1 agreement {lg['top1_agreement']:.1%}."]
    mem = result["memory"]
    lines += ["", f"Memory: {mem['source']}; peak {_gib(mem['peak_bytes'])}."]
    lines += ["", "| target | value | threshold | met | note |", "|---|---|---|---|---|"]
    for tg in result["targets"]:
        met = {True: "met", False: "not met", None: "not measured"}[tg["met"]]
        value = "-" if tg["value"] is None else f"{tg['value']:.4g}"
        lines.append(f"| {tg['target']} | {value} | {tg['comparison']} {tg['threshold']:.3g} | {met} | "
                     f"{tg['note'] or ''} |")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k['job']} ({k['reason']})" for k in result["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.3g} GiB"


def peak_memory(train: dict | None, device: dict | None) -> dict:
    if device is not None:
        return {"source": "device.memory_stats() (the process's peak)", "peak_bytes": device.get("peak_bytes_in_use"),
                "bytes_limit": device.get("bytes_limit")}
    pm = (train or {}).get("program_memory") or {}
    if pm.get("temp") is None:
        return {"source": "not available", "peak_bytes": None}
    return {"source": "XLA's memory analysis of the compiled train step (arguments + outputs + temporaries - "
                      "donated)", "peak_bytes": pm["argument"] + pm["output"] + pm["temp"] - (pm["alias"] or 0)}


# ----- the command line -----

def define_flags(fv: flags.FlagValues, argv) -> None:
    flags.DEFINE_string("out", "bench_accelerator", "Folder for accelerator.json and accelerator.md.", flag_values=fv)
    flags.DEFINE_float("budget_s", 480.0, "Seconds the whole run may take; rows that would not fit are skipped.",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_bool("tiny", None, "Tiny stand-ins (default: on a CPU).", flag_values=fv)
    flags.DEFINE_list("sizes", ["XL", "3B"], "Which of PAR-XL and PAR-3B to sample with.", flag_values=fv)
    flags.DEFINE_list("n", ["1", "4", "16"], "Tokens per step, one sampler row each.", flag_values=fv)
    flags.DEFINE_list("batches", ["1", "64"], "Sampler batch sizes.", flag_values=fv)
    flags.DEFINE_list("parts", ["sample", "train", "logits"], "What to measure.", flag_values=fv)
    flags.DEFINE_integer("runs", 3, "Timed calls (sampler) or steps (train) after the warm-up; at least 3.",
                         lower_bound=3, flag_values=fv)


def settings(f: flags.FlagValues) -> types.SimpleNamespace:
    bad = [s for s in f.sizes if s not in ("XL", "3B")] + [p for p in f.parts if p not in ("sample", "train", "logits")]
    if bad:
        raise config_args.UsageError(f"--sizes takes XL and 3B, --parts sample, train and logits; got {bad}.")
    try:
        ns, batches = tuple(int(x) for x in f.n), tuple(int(x) for x in f.batches)
    except ValueError:
        raise config_args.UsageError(f"--n and --batches are comma-separated integers, got {f.n} and "
                                     f"{f.batches}.") from None
    if any(b < 1 for b in batches) or not batches or not ns:
        raise config_args.UsageError(f"--batches must be positive integers and --n not empty, got {f.batches}.")
    tiny = f.tiny if f.tiny is not None else jax.devices()[0].platform == "cpu"
    setup = Setup.make(tiny)
    bad_n = [n for n in ns if math.isqrt(n) ** 2 != n or setup.grid[0] % math.isqrt(n)]
    if bad_n:
        raise config_args.UsageError(f"--n: {bad_n} is not a square whose root divides the grid's "
                                     f"{setup.grid[0]} tokens per side (e.g. 1,4,16).")
    setup = dataclasses.replace(setup, batches=batches, ns=ns)
    return types.SimpleNamespace(out=f.out, budget_s=f.budget_s, setup=setup, roles=tuple(f.sizes),
                                 parts=tuple(f.parts), runs=f.runs)


def main(argv=None) -> dict:
    a = settings(config_args.parse_flags(argv, define_flags, doc=__doc__))
    start = time.perf_counter()
    setup = a.setup
    os.makedirs(a.out, exist_ok=True)
    info = common.machine()
    accelerator = info["platform"] != "cpu"
    copy_bw = copy_bandwidth(1 << 30 if accelerator else 1 << 26)
    info["copy_bandwidth_GBps"] = copy_bw / 1e9
    card = common.table_bandwidth(info["device_kind"])
    bandwidth = card or copy_bw
    floor = (f"{info['device_kind']}'s vendor bandwidth, {card / 1e9:.0f} GB/s" if card else
             f"this machine's measured copy bandwidth, {copy_bw / 1e9:.1f} GB/s (no vendor figure for "
             f"{info['device_kind']})")
    limit = (device_memory() or {}).get("bytes_limit")
    jobs = plan(a.roles, setup.ns, setup.batches, a.parts)
    estimator = Estimator(setup, a.runs, bandwidth, accelerator)
    result = {"machine": info, "args": {"budget_s": a.budget_s, "runs": a.runs, "sizes": list(a.roles),
                                        "parts": list(a.parts)},
              "setup": {**dataclasses.asdict(setup), "dtype": DTYPE, "guidance": GUIDANCE}, "floor": floor,
              "sampler": [], "train": None, "logits": None, "skipped": [], "failed": [], "device_memory": [],
              "elapsed_s": 0.0}
    print(f"# {info['device_kind']} x{info['device_count']} ({info['platform']}), jax {info['jax']}; "
          f"{'tiny stand-ins' if setup.tiny else 'full sizes'}; floor: {floor}; {len(jobs)} jobs, budget "
          f"{a.budget_s:.0f} s", flush=True)

    def write():
        result["elapsed_s"] = time.perf_counter() - start
        for group in {(r["role"], r["batch"]) for r in result["sampler"]}:
            add_speedups([r for r in result["sampler"] if (r["role"], r["batch"]) == group])
        result["memory"] = peak_memory(result["train"], device_memory())
        result["targets"] = targets(result)
        with open(os.path.join(a.out, "accelerator.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(a.out, "accelerator.md"), "w") as f:
            f.write(markdown(result))

    for i, job in enumerate(jobs):
        name = job_name(job)
        left = a.budget_s - (time.perf_counter() - start)
        need_s, need_bytes = estimator.seconds(job), estimator.bytes(job)
        if limit is not None and need_bytes is not None and need_bytes > MEMORY_SHARE * limit:
            reason = (f"needs an estimated {_gib(need_bytes)}, over {MEMORY_SHARE:.0%} of the device's "
                      f"{_gib(limit)}")
        elif need_s > left:
            reason = f"estimated {need_s:.0f} s, {max(left, 0):.0f} s of the budget left"
        else:
            reason = None
        if reason:
            result["skipped"].append({"job": name, "reason": reason})
            print(f"[{i + 1}/{len(jobs)}] {name}: skipped ({reason})", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if job["kind"] == "sample":
                row = sampler_row(setup, job["role"], job["n"], job["batch"], a.runs, bandwidth)
                result["sampler"].append(row)
                got = f"{row['s_per_batch']:.4g} s/batch, {row['images_per_s']:.4g} images/s"
            elif job["kind"] == "train":
                row = result["train"] = train_row(setup, a.runs, limit)
                got = f"{1e3 * row['step_s']:.1f} ms/step, MFU {row['mfu']:.1%}"
            else:
                row = result["logits"] = logits_row(setup)
                got = f"max |diff| {row['max_abs_diff']:.3g}, top-1 agreement {row['top1_agreement']:.1%}"
        except Exception as e:  # noqa: BLE001 -- a row that fails (out of memory, say) must not lose the others
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            result["failed"].append({"job": name, "error": f"{type(e).__name__}: {first}"})
            print(f"[{i + 1}/{len(jobs)}] {name}: FAILED ({type(e).__name__}: {first})", flush=True)
            write()
            continue
        took = time.perf_counter() - t0
        estimator.learn(job, row)
        result["device_memory"].append({"job": name, **(device_memory() or {})})
        write()
        eta = sum(estimator.seconds(j) for j in jobs[i + 1:])
        print(f"[{i + 1}/{len(jobs)}] {name}: {got} (took {took:.0f} s, estimated {need_s:.0f} s); elapsed "
              f"{time.perf_counter() - start:.0f} s, ETA {eta:.0f} s for the rest", flush=True)
    write()
    print(markdown(result))
    print(f"wrote {os.path.join(a.out, 'accelerator.json')} and accelerator.md")
    return result


if __name__ == "__main__":
    config_args.run(main)
