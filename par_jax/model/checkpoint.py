"""The decoder's checkpoints: a ParTransformer from a checkpoint directory or a training workdir.

The layout and the rule for finding the directory are `par_jax.core.checkpoint`'s; this module adds what is the
decoder's own: its config as JSON, which config fields may differ at load time, and building the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from absl import logging
from flax import nnx

from par_jax.core import checkpoint as core_ckpt
from par_jax.core.checkpoint import params_of, save_params  # noqa: F401 (the decoder's save/params API)
from par_jax.model.config import ModelConfig
from par_jax.model.transformer import ParTransformer

# Fields that change only how the model runs, not what its parameters mean: a checkpoint loads under any value.
RUNTIME_FIELDS = frozenset({"dtype", "remat", "embed_dropout", "resid_dropout", "mlp_dropout", "attn_dropout",
                            "class_dropout", "init_std", "attention"})


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
    diffs = core_ckpt.config_diffs(core_ckpt.config_to_json(saved), core_ckpt.config_to_json(wanted),
                                   ignore=RUNTIME_FIELDS)
    if diffs:
        raise ValueError(f"checkpoint {where} does not match the requested model config:\n  " + "\n  ".join(diffs)
                         + f"\nPass cfg=None to use the checkpoint's own config (only {sorted(RUNTIME_FIELDS)} "
                           f"may differ).")


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, abstract params pure dict) with nothing allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def model_from_params(cfg: ModelConfig, params: dict) -> ParTransformer:
    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, params)


def read_model_config(directory) -> ModelConfig:
    return config_from_json(core_ckpt.read_config_json(directory))


def load_params(directory, cfg: Optional[ModelConfig] = None, *, item: str = "params",
                shardings: Any = None) -> ParTransformer:
    """Restore a ParTransformer from a checkpoint directory (params-only, or one step of a training run).

    cfg: None uses the checkpoint's own config; otherwise it must agree with it in every field except the runtime
    ones (dtype, remat, dropouts), e.g. to sample in bfloat16 from float32 training. item: "params" or "ema".
    shardings: optional pytree of shardings matching the params (default: the first local device).
    """
    directory = core_ckpt.as_path(directory)
    saved = read_model_config(directory)
    if cfg is None:
        cfg = saved
    else:
        check_compatible(saved, cfg, str(directory))
    graphdef, abstract = abstract_model(cfg)
    return nnx.merge(graphdef, core_ckpt.restore_item(directory, item, abstract, shardings))


def restore_model(workdir_or_path, cfg: Optional[ModelConfig] = None, *, shardings: Any = None,
                  prefer_ema: bool = True) -> ParTransformer:
    """A model from a training workdir (its latest step; EMA parameters when saved) or a checkpoint directory."""
    found = core_ckpt.resolve(workdir_or_path, prefer_ema=prefer_ema, what="par_jax checkpoint")
    logging.info("restoring %s from %s", found.item, found.directory)
    return load_params(found.directory, cfg, item=found.item, shardings=shardings)
