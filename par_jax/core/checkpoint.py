"""Checkpoints of any NNX model and of any training run: orbax, one directory layout, one way to find what to restore.

A checkpoint directory holds orbax items:

    params/         float32 parameters (a pure dict in the model's own nesting)
    model_config/   the model's config dataclass as JSON (a checkpoint rebuilds its model with no experiment config)
    ema/            EMA parameters (training runs with EMA only)
    optimizer/      {"step", "state"}: the step counter and the optax state (training only)
    data/           the grain iterator state, one file per process (training only)

A training run writes one such directory per saved step under `WORKDIR/checkpoints/<step>/`; `save_params` writes a
single one. `resolve` turns a workdir, its checkpoints/ folder or one checkpoint directory into the directory and
item to restore. Nothing here knows which model it holds: the decoder's restore is `par_jax.model.checkpoint`, the
tokenizer's `par_jax.tokenizer.load`.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from par_jax.core.paths import as_path  # noqa: F401 (a checkpoint location as orbax wants it: absolute)

CHECKPOINTS_DIR = "checkpoints"


def config_to_json(cfg) -> dict:
    """A model's config dataclass as JSON-ready data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_diffs(saved: dict, wanted: dict, ignore=frozenset()) -> list[str]:
    """Fields that differ between two configs as JSON, one line each (`ignore`: fields free to differ)."""
    keys = sorted((set(saved) | set(wanted)) - set(ignore))
    return [f"{k}: checkpoint {saved.get(k)!r} vs requested {wanted.get(k)!r}" for k in keys
            if _plain(saved.get(k)) != _plain(wanted.get(k))]


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def params_of(model: nnx.Module) -> dict:
    """A model's parameters as a pure nested dict of arrays (the checkpoint's `params` item)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_params(directory, model: nnx.Module) -> epath.Path:
    """Write a params-only checkpoint (parameters + the model's dataclass `.config` as JSON) to `directory`, which
    must not exist."""
    directory = as_path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new directory for save_params.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params_of(model)),
            model_config=ocp.args.JsonSave(config_to_json(model.config))))
    return directory


def read_config_json(directory) -> dict:
    """The `model_config` item of a checkpoint directory as a dict."""
    directory = as_path(directory)
    if not (directory / "model_config").exists():
        raise FileNotFoundError(f"{directory} is not a par_jax checkpoint: it has no model_config item.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(directory, args=ocp.args.Composite(
            model_config=ocp.args.JsonRestore()))["model_config"])


def restore_item(directory, item: str, abstract: Any, shardings: Any = None) -> Any:
    """One pytree item of a checkpoint directory, restored into the shapes of `abstract` (default placement: the
    first local device)."""
    directory = as_path(directory)
    if not (directory / item).exists():
        raise FileNotFoundError(f"checkpoint {directory} has no {item!r} item (it has "
                                f"{sorted(p.name for p in directory.iterdir() if p.is_dir())}).")
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(directory, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]


def latest_step_dir(path) -> Optional[epath.Path]:
    """The newest finished step directory of a training run's checkpoints (`path` = workdir or its checkpoints/)."""
    path = as_path(path)
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).exists() else path
    if not root.exists():
        return None
    steps = ocp.utils.checkpoint_steps(root)  # finalized steps only (not a save cut off half-way)
    return root / str(max(steps)) if steps else None


class Resolved(NamedTuple):
    """What to restore: a checkpoint directory, its training step (-1 for a params-only export) and the item."""
    directory: epath.Path
    step: int
    item: str   # "ema" when the checkpoint has EMA weights and they are preferred, else "params"


def resolve(path, *, prefer_ema: bool = True, what: str = "checkpoint") -> Resolved:
    """The one rule for finding weights: a checkpoint directory (params-only export or one training step) is used as
    it is; a training workdir (or its checkpoints/ folder) gives its latest finished step; EMA weights win when saved
    and `prefer_ema`."""
    path = as_path(path)
    directory = path if (path / "model_config").exists() else latest_step_dir(path)
    if directory is None:
        raise FileNotFoundError(f"no {what} in {path}: expected a checkpoint directory with params/ and "
                                f"model_config/ (an export or one training step) or a training workdir with "
                                f"{CHECKPOINTS_DIR}/<step>/.")
    step = int(directory.name) if directory.name.isdigit() else -1
    item = "ema" if prefer_ema and (directory / "ema").exists() else "params"
    return Resolved(directory, step, item)


# ----- training runs -----

class _QuietOrbax:
    """A logging filter dropping orbax's INFO chatter (dozens of lines per save); its warnings and errors stay."""

    def filter(self, record) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno >= std_logging.WARNING:
            # A failed save is reported once, by the run, with its cause; orbax's threads would add a traceback each.
            record.exc_info = record.exc_text = None
            return True
        return False


def quiet_orbax_logs() -> None:
    """Drop orbax's INFO lines from the absl log. Called once by the entry point (`par_jax.main`), not by library
    code, so that importing or using par_jax never changes a caller's logging."""
    logger = logging.get_absl_logger()
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
        logger.addFilter(_QuietOrbax())


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, a bucket error): the run stops at once."""


class DamagedCheckpointsError(RuntimeError):
    """Every checkpoint of a run failed to restore: the run refuses to start over silently."""


# Failures that say nothing about the files (a bucket or the machine having a bad moment): not a damaged checkpoint.
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "Out of memory", "out of memory")


class TrainCheckpointer:
    """CheckpointManager for a training state + data iterator: asynchronous, keeps the latest few, saves on
    preemption, and never resumes from a damaged step.

    state is a dict {"step", "params", "opt_state", "ema"?}; `config` is the model's config dataclass, saved as JSON.
    Preemption: orbax's preemption policy answers on multi-process jobs (JAX's preemption service, started by
    jax.distributed.initialize, owns SIGTERM there and agrees on the step); a single process has no such service, so
    a SIGTERM handler sets a flag that the loop reads at the next step.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, save_every_steps: int = 1000, asynchronous: bool = True):
        self.directory = as_path(workdir) / CHECKPOINTS_DIR
        policies = ocp.checkpoint_managers
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every_steps), policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.LatestN(max_to_keep),
            create=True, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True))  # a save cut off by SIGKILL leaves a *.orbax-checkpoint-tmp folder
        self._sigterm = threading.Event()
        self._previous_handler = None
        self._pending_step: Optional[int] = None

    def install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            return

        def handler(signum, frame):
            del frame
            logging.warning("received signal %d: saving a checkpoint at the next step and stopping.", signum)
            self._sigterm.set()
        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def preempted(self, step: int) -> bool:
        return self._sigterm.is_set() or self.manager.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def check_saved(self) -> None:
        """Raise CheckpointSaveError if the last asynchronous save failed (call once per step: cheap)."""
        if self._pending_step is None:
            return
        try:
            self.manager.check_for_errors()
            if not self.manager.is_saving_in_progress():
                # orbax's own finalize thread may have consumed the error already; waiting on a finished save
                # returns at once and raises what it left.
                self.manager.wait_until_finished()
                self._pending_step = None
        except Exception as e:  # noqa: BLE001 (whatever the storage raised, the run must stop and say why)
            step, self._pending_step = self._pending_step, None
            raise CheckpointSaveError(_save_failure(step, self.directory, e)) from e

    def save(self, step: int, state: dict, data_iter: Iterator, config, *, force: bool = False) -> bool:
        self.check_saved()
        items = dict(
            params=ocp.args.StandardSave(state["params"]),
            optimizer=ocp.args.StandardSave({"step": state["step"], "state": state["opt_state"]}),
            model_config=ocp.args.JsonSave(config_to_json(config)),
            data=_grain_save(data_iter),
        )
        if state.get("ema") is not None:
            items["ema"] = ocp.args.StandardSave(state["ema"])
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001
            raise CheckpointSaveError(_save_failure(step, self.directory, e)) from e
        if saved:
            self._pending_step = step
        return saved

    def saved_config(self, step: int) -> dict:
        return read_config_json(self.directory / str(step))

    def restore(self, step: int, abstract_state: dict, data_iter: Iterator) -> dict:
        """Restore step `step` into the shapes and shardings of `abstract_state`; `data_iter` is restored in place."""
        step_dir = self.directory / str(step)
        items = dict(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            optimizer=ocp.args.StandardRestore({"step": abstract_state["step"],
                                                "state": abstract_state["opt_state"]}),
            data=_grain_restore(data_iter),
        )
        want_ema = abstract_state.get("ema") is not None
        if want_ema and (step_dir / "ema").exists():
            items["ema"] = ocp.args.StandardRestore(abstract_state["ema"])
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = {"step": restored["optimizer"]["step"], "params": restored["params"],
                 "opt_state": restored["optimizer"]["state"]}
        if want_ema:
            if "ema" in items:
                state["ema"] = restored["ema"]
            else:  # EMA switched on mid-run: start it from the restored parameters.
                logging.warning("checkpoint %s has no EMA; starting EMA from its parameters.", step_dir)
                state["ema"] = jax.tree.map(lambda x: x.copy(), restored["params"])
        return state

    def restore_latest_intact(self, abstract_state: dict, data_iter: Iterator,
                              check: Optional[Callable[[int, dict], None]] = None
                              ) -> tuple[Optional[int], Optional[dict]]:
        """(step, state) of the newest step that restores, or (None, None) with no checkpoint.

        `check(step, saved model config JSON)` runs before any weight is read and may raise (a model of another
        shape). A step that fails to read (truncated or corrupt files) is moved aside to `<step>.damaged-<time>`
        (never deleted) with a warning naming it, and the next older step is tried."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                saved = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 (an unreadable step: fall back to an older one)
                self._set_aside(step, e)
                continue
            if check is not None:
                check(step, saved)
            try:
                return step, self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, e)
        if steps:  # never start from scratch silently over a run's damaged checkpoints
            raise DamagedCheckpointsError(
                f"every checkpoint in {self.directory} (steps {sorted(steps)}) is damaged and was moved aside "
                f"(*.damaged-*); nothing to resume from. Start over in a new --workdir, or remove the damaged "
                f"folders to start over here.")
        return None, None

    def _set_aside(self, step: int, error: BaseException) -> None:
        if any(word in str(error) for word in _TRANSIENT):  # the storage or the machine, not the files: retry later
            raise error
        damaged = self.directory / str(step)
        aside = self.directory / f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            damaged.rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        logging.warning("checkpoint step %d in %s is damaged and cannot be restored (%s: %s); moved aside to %s "
                        "(not deleted), trying the previous step.", step, self.directory, type(error).__name__,
                        _first_line(error), aside.name)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.check_saved()
        finally:
            self.manager.close()
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _save_failure(step: int, directory, e: BaseException) -> str:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:  # the storage's own error is innermost
        cause = cause.__cause__ or cause.__context__
    return (f"saving the checkpoint of step {step} to {directory} failed: {type(cause).__name__}: "
            f"{_first_line(cause)}. Training stopped; the previous checkpoints are kept. Free space (or fix the "
            f"permissions) and rerun the same command to resume.")


def _grain_save(data_iter):
    import grain  # noqa: PLC0415 (registers grain's orbax handler)
    return grain.checkpoint.CheckpointSave(data_iter)


def _grain_restore(data_iter):
    import grain  # noqa: PLC0415
    return grain.checkpoint.CheckpointRestore(data_iter)

