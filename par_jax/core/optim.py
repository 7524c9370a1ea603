"""The optimizer (PAR_SPEC section 10): AdamW with betas (0.9, 0.95), weight decay on matrices and embeddings only,
linear warmup then cosine decay to zero (or a constant rate, as the release), and global-norm gradient clipping.

Gradient accumulation and EMA live in the train step (`par_jax.training.train`), not in the optax chain: the step
splits its batch into micro-batches under one compiled program, and EMA weights are a copy of the parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from par_jax.core import sharding

SCHEDULES = ("cosine", "constant")


def warmup_steps(opt: Mapping[str, Any], steps_per_epoch: float) -> int:
    """`optimizer.warmup_steps` when set (>= 0), else `optimizer.warmup_epochs` converted with the epoch length."""
    if opt["warmup_steps"] >= 0:
        return int(opt["warmup_steps"])
    return int(round(opt["warmup_epochs"] * steps_per_epoch))


def learning_rate_schedule(opt: Mapping[str, Any], total_steps: int, warmup: int) -> optax.Schedule:
    """Linear warmup from 0 to `optimizer.lr` over `warmup` steps, then cosine decay to 0 at `total_steps`, or
    constant."""
    lr, schedule = float(opt["lr"]), opt["schedule"]
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown optimizer.schedule {schedule!r}; choose one of {SCHEDULES}.")
    if warmup < 0 or warmup > total_steps:
        raise ValueError(f"warmup ({warmup} steps) must lie within the run ({total_steps} steps).")
    if schedule == "cosine":
        if warmup == total_steps:
            raise ValueError(f"a cosine schedule needs steps after warmup; warmup = total = {total_steps}.")
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                                  decay_steps=total_steps, end_value=0.0)
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def decay_mask(specs: Any) -> Any:
    """True for parameters that get weight decay: every matrix and embedding table, not the norm gains.

    Decided by logical axis names rather than by rank, because with stacked (scanned) layers a norm gain is 2-D.
    """
    return jax.tree.map(lambda names: "norm" not in names, specs, is_leaf=sharding.is_logical_names)


def make_optimizer(opt: Mapping[str, Any], schedule: optax.Schedule, specs: Any) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW (decoupled decay lr * wd * param, as torch.optim.AdamW)."""
    for key in ("b1", "b2"):
        if not 0.0 <= opt[key] < 1.0:
            raise ValueError(f"optimizer.{key} must be in [0, 1), got {opt[key]}.")
    if opt["weight_decay"] < 0 or opt["grad_clip"] < 0:
        raise ValueError("optimizer.weight_decay and optimizer.grad_clip must be >= 0 (grad_clip 0 = no clipping).")
    mask = decay_mask(specs)
    adamw = optax.adamw(schedule, b1=opt["b1"], b2=opt["b2"], eps=opt["eps"], weight_decay=opt["weight_decay"],
                        mask=lambda params: mask)
    if opt["grad_clip"] > 0:
        return optax.chain(optax.clip_by_global_norm(opt["grad_clip"]), adamw)
    return adamw


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
