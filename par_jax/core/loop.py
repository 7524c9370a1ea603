"""The loop kit: what every training loop (the decoder's, the tokenizer's, the evaluation classifier's) does around
its own update step, written once.

    run = loop.Run(workdir, config, job="train", total_steps=T, log_every=L, checkpoint=loop.CheckpointSettings(...))
    start, state = run.resume(abstract_state, data_iter, model_config, runtime_fields)  # (0, None): start fresh
    for step in range(start + 1, T + 1):
        state, metrics = update(state, batch)
        run.step_done(step)                       # progress, and a failed asynchronous save stops the run here
        if run.should_save(step) or last or run.preempted(step):
            run.save(step, state, data_iter, model_config, health=metrics)  # refuses a non-finite state
    run.close()

Promises (docs/reliability.md): one run owns a workdir (`core.workdir.WorkdirLock`); a state whose health metrics
(loss, gradient, update and parameter norms of the state being saved) are not all finite is never saved; a failed
save stops the run at the next step with the step, the path and the cause; a damaged checkpoint is moved aside and
the previous one restored; a workdir is never resumed with a model of another shape.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from par_jax.core import checkpoint as ckpt_lib
from par_jax.core import config_args
from par_jax.core import workdir as workdir_lib


class NonFiniteError(FloatingPointError):
    """A health metric (loss, a norm) became NaN or infinite; the run stopped without saving that state."""


class IncompatibleCheckpointError(config_args.UsageError):
    """The workdir's checkpoints hold a model of another shape than the one configured."""


# A run that stopped on purpose and said why in its message: entry points print the message, not a traceback.
STOPS = (NonFiniteError, IncompatibleCheckpointError, ckpt_lib.CheckpointSaveError, ckpt_lib.DamagedCheckpointsError,
         workdir_lib.WorkdirInUseError)


def check_finite(step: int, values: Mapping[str, Any], *, kept: Callable[[], str], hint: str = "") -> None:
    """Raise NonFiniteError when any of `values` (scalars) is NaN or infinite. `kept()` says what the user still has
    (called only on failure: it may wait for a save in flight)."""
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(values.items()))
        raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step} ({shown}). Training stopped without saving "
                             f"this state; {kept()}." + (f" {hint}" if hint else ""))


def as_workdir(workdir) -> epath.Path:
    """The workdir as an absolute path (orbax rejects relative local paths), created on process 0."""
    path = ckpt_lib.as_path(workdir)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
    return path


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; values that are not scalars become strings (TensorBoard hparams)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int
    keep: int = 3
    asynchronous: bool = True


class Run:
    """One training run's workdir: its lock, writer, hyperparameters, checkpoints and progress."""

    def __init__(self, workdir, config, *, job: str, total_steps: int, log_every: int,
                 checkpoint: CheckpointSettings):
        self.workdir = as_workdir(workdir)
        self.lock = workdir_lib.WorkdirLock(self.workdir, job=job)
        self.lock.acquire()
        try:
            self.writer = metric_writers.create_default_writer(os.fspath(self.workdir),
                                                               just_logging=jax.process_index() > 0)
            if jax.process_index() == 0:
                (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
                self.writer.write_hparams(flatten(config.to_dict()))
            self.checkpointer = ckpt_lib.TrainCheckpointer(
                self.workdir, max_to_keep=checkpoint.keep, save_every_steps=checkpoint.every_steps,
                asynchronous=checkpoint.asynchronous)
        except BaseException:
            self.lock.release()
            raise
        self.checkpointer.install_sigterm_handler()
        self.progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=self.writer,
                                                        every_steps=log_every)

    # ----- resume -----

    def resume(self, abstract_state: dict, data_iter: Iterator, model_config,
               runtime_fields=frozenset()) -> tuple[int, Optional[dict]]:
        """(step, state) from the newest intact checkpoint, or (0, None) when there is none. Refuses a workdir whose
        checkpoints hold another model (every config field but `runtime_fields` must agree) before reading weights."""
        wanted = ckpt_lib.config_to_json(model_config)

        def check(step: int, saved: dict) -> None:
            diffs = ckpt_lib.config_diffs(saved, wanted, ignore=runtime_fields)
            if diffs:
                raise IncompatibleCheckpointError(
                    f"the checkpoints in {self.checkpointer.directory} (step {step}) hold another model than the "
                    f"configured one:\n  " + "\n  ".join(diffs) + "\nUse a new --workdir for the new model, or "
                    "set the model fields back to the checkpoint's values to resume.")

        step, state = self.checkpointer.restore_latest_intact(abstract_state, data_iter, check=check)
        if step is None:
            return 0, None
        logging.info("resumed from step %d (%s)", step, self.checkpointer.directory / str(step))
        return step, state

    # ----- per step -----

    def step_done(self, step: int) -> None:
        self.checkpointer.check_saved()
        self.progress(step)

    def should_save(self, step: int) -> bool:
        return self.checkpointer.should_save(step)

    def preempted(self, step: int) -> bool:
        return self.checkpointer.preempted(step)

    def kept(self) -> str:
        """What a user still has, for error messages: the last good checkpoint, or none."""
        self.checkpointer.wait()
        good = self.checkpointer.latest_step()
        return (f"the last good checkpoint is step {good} in {self.checkpointer.directory}; rerunning the same "
                f"command resumes from it" if good is not None else "no checkpoint had been saved yet")

    def check_health(self, step: int, health: Mapping[str, Any], hint: str = "") -> None:
        values = {k: v for k, v in jax.device_get(dict(health)).items() if np.ndim(v) == 0}
        check_finite(step, values, kept=self.kept, hint=hint)

    def save(self, step: int, state: dict, data_iter: Iterator, model_config, *, health: Mapping[str, Any],
             force: bool = False, hint: str = "") -> bool:
        """Save `state` after checking that every scalar of `health` (metrics of this very state) is finite and
        that this run still owns the workdir."""
        self.check_health(step, health, hint)
        self.lock.check()
        return self.checkpointer.save(step, state, data_iter, model_config, force=force)

    def close(self) -> None:
        try:
            self.checkpointer.close()
            self.writer.flush()
        finally:
            self.lock.release()
