"""Checkpoints: the training run's orbax CheckpointManager, and params-only checkpoints for sampling and evaluation.

One layout for both. A checkpoint directory holds orbax items:

    params/         float32 parameters (a pure dict in the model's own nesting)
    model_config/   the ModelConfig as JSON (so a checkpoint rebuilds its model with no experiment config)
    ema/            EMA parameters (training runs with EMA only)
    optimizer/      {"step", "state"}: the step counter and the optax state (training only)
    data/           the grain iterator state, one file per process (training only)

A training run writes one such directory per saved step under `WORKDIR/checkpoints/<step>/`; `save_params` writes a
single one. `load_params` reads either; `restore_model` also finds the latest step of a workdir.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import signal
import threading
from typing import Any, Iterator, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from par_jax.model import ModelConfig, ParTransformer

CHECKPOINTS_DIR = "checkpoints"
ITEMS = ("params", "model_config", "ema", "optimizer", "data")

# Fields that change only how the model runs, not what its parameters mean: a checkpoint loads under any value.
RUNTIME_FIELDS = frozenset({"dtype", "remat", "embed_dropout", "resid_dropout", "mlp_dropout", "attn_dropout",
                            "class_dropout", "init_std"})


# ----- model config <-> JSON -----

def config_to_json(cfg) -> dict:
    """A model's config dataclass (ModelConfig, or any other such as the tokenizer's) as JSON-ready data."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_json(d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"checkpoint model_config has fields {unknown} that this version of ModelConfig does not "
                         f"know; it was written by a different par_jax version.")
    d = dict(d)
    d["grid_shape"] = tuple(d["grid_shape"])
    return ModelConfig(**d)


def check_compatible(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raise if `wanted` would give the saved parameters a different shape or meaning."""
    diffs = [f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs requested {getattr(wanted, f.name)!r}"
             for f in dataclasses.fields(ModelConfig)
             if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(wanted, f.name)]
    if diffs:
        raise ValueError(f"checkpoint {where} does not match the requested model config:\n  " + "\n  ".join(diffs)
                         + f"\nPass cfg=None to use the checkpoint's own config (only {sorted(RUNTIME_FIELDS)} "
                           f"may differ).")


# ----- params-only checkpoints -----

def params_of(model: ParTransformer) -> dict:
    """The model's parameters as a pure nested dict of arrays (the checkpoint's `params` item)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, abstract params pure dict) with nothing allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def model_from_params(cfg: ModelConfig, params: dict) -> ParTransformer:
    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, params)


def save_params(directory, model: ParTransformer) -> epath.Path:
    """Write a params-only checkpoint (parameters + model config JSON) to `directory`, which must not exist.

    Works for any NNX model with a dataclass `.config` (the tokenizer uses it too); `load_params` rebuilds
    ParTransformers."""
    directory = as_path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new directory for save_params.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params_of(model)),
            model_config=ocp.args.JsonSave(config_to_json(model.config))))
    return directory


def as_path(path) -> epath.Path:
    """A checkpoint location as orbax wants it: local paths made absolute (a relative path is an error there)."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def read_model_config(directory) -> ModelConfig:
    directory = as_path(directory)
    path = directory / "model_config"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a par_jax checkpoint: it has no model_config item.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        d = ckptr.restore(directory, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return config_from_json(d["model_config"])


def load_params(directory, cfg: Optional[ModelConfig] = None, *, item: str = "params",
                shardings: Any = None) -> ParTransformer:
    """Restore a ParTransformer from a checkpoint directory (params-only, or one step of a training run).

    cfg: None uses the checkpoint's own config; otherwise it must agree with it in every field except the runtime
    ones (dtype, remat, dropouts), e.g. to sample in bfloat16 from float32 training. item: "params" or "ema".
    shardings: optional pytree of shardings matching the params (default: the first local device).
    """
    directory = as_path(directory)
    saved = read_model_config(directory)
    if cfg is None:
        cfg = saved
    else:
        check_compatible(saved, cfg, str(directory))
    if not (directory / item).exists():
        raise FileNotFoundError(f"checkpoint {directory} has no {item!r} item (it has "
                                f"{sorted(p.name for p in directory.iterdir() if p.is_dir())}).")
    graphdef, abstract = abstract_model(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(directory, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    return nnx.merge(graphdef, restored[item])


def latest_step_dir(path) -> Optional[epath.Path]:
    """The newest finished step directory of a training run's checkpoints (`path` = workdir or its checkpoints/)."""
    path = as_path(path)
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).exists() else path
    if not root.exists():
        return None
    steps = ocp.utils.checkpoint_steps(root)  # finalized steps only (not a save cut off half-way)
    return root / str(max(steps)) if steps else None


def restore_model(workdir_or_path, cfg: Optional[ModelConfig] = None, *, shardings: Any = None,
                  prefer_ema: bool = True) -> ParTransformer:
    """A model from a training workdir (its latest step; EMA parameters when saved) or a checkpoint directory."""
    path = as_path(workdir_or_path)
    step_dir = path if (path / "model_config").exists() else latest_step_dir(path)
    if step_dir is None:
        raise FileNotFoundError(f"no par_jax checkpoint in {path}: expected a directory with params/ and "
                                f"model_config/ (save_params) or a training workdir with {CHECKPOINTS_DIR}/<step>/.")
    item = "ema" if prefer_ema and (step_dir / "ema").exists() else "params"
    logging.info("restoring %s from %s", item, step_dir)
    return load_params(step_dir, cfg, item=item, shardings=shardings)


# ----- training checkpoints -----

class _QuietOrbax:
    """A logging filter dropping orbax's INFO chatter (dozens of lines per save); its warnings and errors stay."""

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
    logger = logging.get_absl_logger()
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
        logger.addFilter(_QuietOrbax())


class TrainCheckpointer:
    """CheckpointManager for training state + data iterator: asynchronous, keeps the latest few, and saves on
    preemption (SIGTERM here; on TPU pods and multi-host jobs also JAX's preemption sync point).

    state is a dict {"step", "params", "opt_state", "ema"?}, as built by `par_jax.training.train`.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, save_every_steps: int = 1000, asynchronous: bool = True):
        quiet_orbax_logs()
        self.directory = as_path(workdir) / CHECKPOINTS_DIR
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every_steps, create=True,
            enable_async_checkpointing=asynchronous))
        self._sigterm = threading.Event()
        self._previous_handler = None

    # Preemption: a SIGTERM only sets a flag; the loop saves at the next step boundary and exits.
    def install_sigterm_handler(self) -> None:
        # Several processes must stop at the same step: there JAX's preemption service (started by
        # jax.distributed.initialize) owns SIGTERM and `reached_preemption` agrees on the step across processes.
        if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            return
        def handler(signum, frame):
            del frame
            logging.warning("received signal %d: saving a checkpoint at the next step and stopping.", signum)
            self._sigterm.set()
        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def preempted(self, step: int) -> bool:
        return self._sigterm.is_set() or self.manager.reached_preemption(step)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iter: Iterator, model_cfg: ModelConfig, *, force: bool = False
             ) -> bool:
        items = dict(
            params=ocp.args.StandardSave(state["params"]),
            optimizer=ocp.args.StandardSave({"step": state["step"], "state": state["opt_state"]}),
            model_config=ocp.args.JsonSave(config_to_json(model_cfg)),
            data=_grain_save(data_iter),
        )
        if state.get("ema") is not None:
            items["ema"] = ocp.args.StandardSave(state["ema"])
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def _grain_save(data_iter):
    import grain  # noqa: PLC0415 (registers grain's orbax handler)
    return grain.checkpoint.CheckpointSave(data_iter)


def _grain_restore(data_iter):
    import grain  # noqa: PLC0415
    return grain.checkpoint.CheckpointRestore(data_iter)
