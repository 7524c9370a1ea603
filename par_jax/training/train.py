r"""Training: `train_and_evaluate(config, workdir)`, the PAR decoder trained on token codes.

Reads top to bottom: logging, mesh, input, model and optimizer, sharding, update step (compiled ahead of time),
checkpoint, evaluators, loop.

  python -m par_jax.main --config=configs/par.py:size=XL,n=4 --workdir=DIR
  python -m par_jax.main --config=configs/par.py:runlocal --workdir=/tmp/par_local      # CPU, minutes

The machinery around the update step is the loop kit's (`par_jax.core.loop`, docs/reliability.md): the run owns
its workdir, resumes by itself from the newest intact checkpoint in WORKDIR/checkpoints (model, optimizer, step and
the data iterator's position), saves and stops at the next step on SIGTERM (preemption), stops at once on a
non-finite loss or norm and never saves such a state, and stops at the next step when a save failed. Evaluators and
sample grids are plug-ins (`par_jax.training.evaluators`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from par_jax.core import checkpoint, loop, optim, sharding
from par_jax.core import mesh as mesh_lib
from par_jax.core.config_args import UsageError
from par_jax.data import pipeline
from par_jax.model import ModelConfig, ParTransformer, from_config_dict
from par_jax.model import checkpoint as model_ckpt
from par_jax.training import evaluators as evaluators_lib
from par_jax.training import flops as flops_lib


# The loop kit's error, under the name the decoder's docs and tests use.
NonFiniteLossError = loop.NonFiniteError

NONFINITE_HINT = ("Usual causes: a learning rate too high or too little warmup (optimizer.lr, optimizer.warmup_*), "
                  "float16 overflow (use model.dtype=bfloat16), or a corrupt batch (token ids outside "
                  "[0, vocab_size)).")


# ----- the train step -----

def loss_fn(params, graphdef, tokens, labels, rng, batch_sharding=None):
    model = nnx.merge(graphdef, params)
    loss, _ = model(tokens, labels, rng=rng, return_logits=False, batch_sharding=batch_sharding)
    return loss


def train_step(state: dict, batch: Mapping[str, jax.Array], *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, dropout_key: jax.Array, grad_accum_steps: int, ema_decay: float,
               micro_sharding: NamedSharding | None):
    """One optimizer update. Per-step dropout keys: fold_in(dropout_key, step) (then the micro-batch index)."""
    step = state["step"]
    key = jax.random.fold_in(dropout_key, step)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, batch_sharding=micro_sharding))
    tokens, labels = batch["tokens"], batch["label"]
    if grad_accum_steps == 1:
        loss, grads = grad_fn(state["params"], graphdef, tokens, labels, key)
    else:
        k = grad_accum_steps

        def micro(x):
            # Row b*k + j goes to micro-batch j: each device keeps its own rows (no data movement).
            x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
            return x if micro_sharding is None else jax.lax.with_sharding_constraint(
                x, NamedSharding(micro_sharding.mesh, P(None, *micro_sharding.spec[:1], *([None] * (x.ndim - 2)))))

        def body(carry, xs):
            loss_sum, grad_sum = carry
            t, lab, j = xs
            loss, grads = grad_fn(state["params"], graphdef, t, lab, jax.random.fold_in(key, j))
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                        (micro(tokens), micro(labels), jnp.arange(k)))
        loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
        new_state["ema"] = optim.ema_update(state["ema"], params, ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
               "update_norm": optax.global_norm(updates), "lr": schedule(step)}
    return new_state, metrics


# ----- state, shardings and the compiled step -----

@dataclasses.dataclass
class Trainer:
    """Everything that turns a batch into an update on a given mesh: built once per run (and by the benchmark)."""
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    graphdef: Any
    init: Callable[[], dict]                  # () -> state, born sharded
    step: Any                                 # jitted (state, batch) -> (state, metrics); state donated
    abstract_state: dict                      # ShapeDtypeStructs carrying the shardings
    state_shardings: dict
    batch_shardings: dict

    def put(self, batch: Mapping[str, np.ndarray]) -> dict:
        """This process's part of the batch -> global arrays split over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(batch[k]))
                for k in self.batch_shardings}

    def abstract_batch(self, global_batch: int) -> dict:
        shapes = {"tokens": ((global_batch, self.model_cfg.num_tokens), jnp.int32), "label": ((global_batch,),
                                                                                              jnp.int32)}
        return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_shardings[k]) for k, (s, d) in shapes.items()}

    def compile(self, global_batch: int):
        """Ahead-of-time compile for the real shapes and shardings, logging XLA's memory and cost analysis."""
        start = time.perf_counter()
        compiled = self.step.lower(self.abstract_state, self.abstract_batch(global_batch)).compile()
        logging.info("train step compiled in %.1fs", time.perf_counter() - start)
        log_memory_analysis(compiled)
        return compiled

    def model(self, state: dict, ema: bool = True) -> ParTransformer:
        return nnx.merge(self.graphdef, state["ema"] if ema and "ema" in state else state["params"])


def make_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, schedule: optax.Schedule,
                 model_cfg: ModelConfig | None = None) -> Trainer:
    model_cfg = model_cfg or from_config_dict(config.model)
    rules = sharding.rules_from_config(config.mesh.get("rules"))
    abstract_model = nnx.eval_shape(lambda: ParTransformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, model_state = nnx.split(abstract_model)
    specs = sharding.logical_specs(model_state)
    tx = optim.make_optimizer(config.optimizer, schedule, specs)
    ema_decay = float(config.optimizer.ema_decay)
    if not 0.0 <= ema_decay < 1.0:
        raise UsageError(f"optimizer.ema_decay must be in [0, 1) (0 = no EMA), got {ema_decay}.")
    seed = int(config.seed)

    def init() -> dict:
        params = checkpoint.params_of(ParTransformer(model_cfg, rngs=nnx.Rngs(seed)))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if ema_decay > 0:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    abstract = jax.eval_shape(init)
    param_sh = sharding.param_shardings(abstract["params"], specs, mesh, rules)
    replicated = sharding.replicated(mesh)
    state_sh = {"step": replicated, "params": param_sh,
                "opt_state": optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], param_sh,
                                                   transform_non_params=lambda _: replicated)}
    if "ema" in abstract:
        state_sh["ema"] = param_sh
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
    batch_sh = {"tokens": sharding.batch_sharding(mesh, rules, 2), "label": sharding.batch_sharding(mesh, rules, 1)}
    step = functools.partial(
        train_step, graphdef=graphdef, tx=tx, schedule=schedule,
        dropout_key=jax.random.fold_in(jax.random.key(seed), 1), grad_accum_steps=int(config.train.grad_accum_steps),
        ema_decay=ema_decay, micro_sharding=batch_sh["tokens"])
    return Trainer(
        model_cfg=model_cfg, mesh=mesh, graphdef=graphdef,
        init=jax.jit(init, out_shardings=state_sh),
        step=jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                     donate_argnums=0),
        abstract_state=abstract_state, state_shardings=state_sh, batch_shardings=batch_sh)


def log_memory_analysis(compiled) -> None:
    try:
        mem = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        mem = None
    if mem is None:
        logging.info("memory analysis: not available on this backend")
        return
    gib = 2.0**30
    logging.info("train step memory per device: arguments %.3f GiB, outputs %.3f GiB, temporaries %.3f GiB, "
                 "aliased (donated) %.3f GiB, code %.3f GiB",
                 mem.argument_size_in_bytes / gib, mem.output_size_in_bytes / gib, mem.temp_size_in_bytes / gib,
                 mem.alias_size_in_bytes / gib, mem.generated_code_size_in_bytes / gib)


# ----- run length -----

def run_length(config: ml_collections.ConfigDict, num_examples: Callable[[], int]) -> tuple[int, int]:
    """(total steps, warmup steps) from train.num_steps or train.num_epochs, and the optimizer's warmup."""
    tc, oc = config.train, config.optimizer
    steps_per_epoch = None
    if tc.num_steps > 0:
        total = int(tc.num_steps)
    else:
        steps_per_epoch = num_examples() / tc.batch_size
        total = int(math.ceil(tc.num_epochs * steps_per_epoch))
        if total < 1:
            raise UsageError(f"train.num_epochs={tc.num_epochs} gives no steps; set train.num_steps or num_epochs.")
    if oc.warmup_steps < 0 and steps_per_epoch is None:
        steps_per_epoch = num_examples() / tc.batch_size
    return total, optim.warmup_steps(oc, steps_per_epoch or 0.0)


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Errors a run would otherwise hit late (after compiling, or at the first checkpoint)."""
    tc = config.train
    shards, k = mesh_lib.num_batch_shards(mesh), int(tc.grad_accum_steps)
    if k < 1:
        raise UsageError(f"train.grad_accum_steps must be >= 1, got {k}.")
    if tc.batch_size % (shards * k):
        raise UsageError(f"train.batch_size={tc.batch_size} must be divisible by grad_accum_steps ({k}) x the "
                         f"batch shards of the mesh (data x fsdp = {shards}).")
    if tc.batch_size % jax.process_count():
        raise UsageError(f"train.batch_size={tc.batch_size} must be divisible by the {jax.process_count()} processes.")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if tc[key] < 1:
            raise UsageError(f"train.{key} must be >= 1, got {tc[key]}.")
    if tc.sample_every_steps < 0:
        raise UsageError("train.sample_every_steps must be >= 0 (0 = no sample grids).")


# ----- health metrics, progress and the non-finite check -----

class MetricsLog:
    """Fetches every step's metrics (one step late, so the device stays busy), stops the run on a non-finite one,
    and writes scalars every `every` steps with throughput: steps/s, tokens/s and MFU over the last window."""

    def __init__(self, run: loop.Run, every: int, tokens_per_step: int, flops_per_step: float, peak_flops: float):
        self.run, self.writer, self.every = run, run.writer, every
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.last_loss = float("nan")

    def record(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        self.run.check_health(step, values, NONFINITE_HINT)
        self.last_loss = values["loss"]
        self.window_steps += 1
        if step % self.every == 0:
            elapsed = time.perf_counter() - self.window_start
            steps_per_sec = self.window_steps / elapsed
            values["steps_per_sec"] = steps_per_sec
            values["tokens_per_sec"] = steps_per_sec * self.tokens_per_step
            values["mfu"] = steps_per_sec * self.flops_per_step / (self.peak_flops * jax.device_count())
            self.writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
            self.window_start, self.window_steps = time.perf_counter(), 0


# ----- the loop -----

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from `workdir` if it has checkpoints) and return the final train metrics."""
    model_cfg = from_config_dict(config.model)
    tc = config.train
    mesh = mesh_lib.create_mesh(config.mesh)
    check_config(config, mesh)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)

    loader = pipeline.make_train_loader(config, global_batch_size=tc.batch_size)
    data_iter = iter(loader)
    total_steps, warmup = run_length(config, lambda: pipeline.num_records(config))
    schedule = optim.learning_rate_schedule(config.optimizer, total_steps, warmup)

    trainer = make_trainer(config, mesh, schedule, model_cfg)
    logging.info("model %s: %d parameters; %d steps (%d warmup) at batch %d", config.model.get("size", "?"),
                 sum(x.size for x in jax.tree.leaves(trainer.abstract_state["params"])), total_steps, warmup,
                 tc.batch_size)
    evaluators = evaluators_lib.Evaluators(config)

    run = loop.Run(workdir, config, job="train", total_steps=total_steps, log_every=tc.log_every_steps,
                   checkpoint=loop.CheckpointSettings(every_steps=tc.checkpoint_every_steps,
                                                      keep=tc.keep_checkpoints, asynchronous=tc.async_checkpoints))
    try:
        return _loop(config, run, trainer, data_iter, evaluators, total_steps)
    finally:
        run.close()


def _loop(config, run: loop.Run, trainer: Trainer, data_iter, evaluators, total_steps: int) -> dict:
    tc, model_cfg = config.train, trainer.model_cfg
    # No context mesh: every array carries its sharding, and samplers/evaluators set up their own devices.
    start, state = run.resume(trainer.abstract_state, data_iter, model_cfg, model_ckpt.RUNTIME_FIELDS)
    if state is None:
        state = trainer.init()
    if start >= total_steps:
        logging.info("nothing to do: step %d of %d already reached", start, total_steps)
        return {}
    compiled = trainer.compile(tc.batch_size)

    peak, source = flops_lib.peak_flops_per_device(model_cfg.dtype, float(tc.peak_flops))
    flops_per_step = flops_lib.train_flops_per_example(model_cfg) * tc.batch_size
    logging.info("MFU against %.3g FLOP/s per device (%s); %.3g model FLOPs per step", peak, source,
                 flops_per_step)
    log = MetricsLog(run, tc.log_every_steps, tc.batch_size * model_cfg.num_tokens, flops_per_step, peak)
    pending = None
    for step in range(start + 1, total_steps + 1):  # `step` = updates done once this iteration ends
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = compiled(state, trainer.put(next(data_iter)))
        if pending is not None:
            log.record(*pending)
        pending = (step, metrics)
        run.step_done(step)
        last, preempted = step == total_steps, run.preempted(step)
        if last or preempted or run.should_save(step):
            log.record(*pending)
            pending = None
            # The metrics include the norms of the parameters just computed: the state saved is the state checked.
            run.save(step, state, data_iter, model_cfg, health=metrics, force=last or preempted,
                     hint=NONFINITE_HINT)
        due = evaluators.due(step, last)
        if due:  # plug-ins from config.evals, and the sample grids of train.sample_every_steps
            with run.progress.timed("eval"):
                results = evaluators.run(due, trainer.model(state), config, step=step, workdir=run.workdir,
                                         writer=run.writer)
                if results:
                    run.writer.write_scalars(step, results)
        if preempted:
            logging.warning("preempted: saved step %d, stopping", step)
            break
    if pending is not None:
        log.record(*pending)
    return {"step": step, "loss": log.last_loss}
