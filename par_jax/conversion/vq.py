"""PyTorch LlamaGen VQ tokenizer state dicts (VQ-16: `vq_ds16_c2i.pt`) <-> par_jax's `VQModel` (PAR_SPEC section 8).

Our modules carry the release's names, so keys map one to one; only the leaves change:
  conv  `<name>.weight` (out, in, kh, kw)  -> `<name>.kernel` (kh, kw, in, out);  `<name>.bias` -> `<name>.bias`
  GroupNorm `<name>.weight` (C,)           -> `<name>.scale`;                     `<name>.bias` -> `<name>.bias`
  `quantize.embedding.weight` (K, D)       -> `quantize.embedding` (normalised when used, as in the release)
The `quantize.codebook_used` buffer (codebook usage statistics of training) is ignored.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax.conversion import checks
from par_jax.core import state_dict as state_dict_lib
from par_jax.tokenizer.vq import VQConfig, VQModel, from_config_dict

IGNORED = re.compile(r"quantize\.codebook_used")
CODEBOOK_KEY = "quantize.embedding.weight"


def _torch_key(path: tuple) -> str:
    *module, leaf = (str(p) for p in path)
    if module == ["quantize"] and leaf == "embedding":
        return CODEBOOK_KEY
    return ".".join(module + [{"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]])


def _is_kernel(path: tuple) -> bool:
    return path[-1] == "kernel"


def _to_ours(path: tuple, w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0) if _is_kernel(path) else w


def _to_torch(path: tuple, w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1) if _is_kernel(path) else w


def _as_vq_config(cfg) -> VQConfig:
    return cfg if isinstance(cfg, VQConfig) else from_config_dict(cfg)


def _abstract(cfg: VQConfig):
    return nnx.eval_shape(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))


def torch_layout(cfg: VQConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """PyTorch key -> (our parameter path, PyTorch shape) for every parameter of a tokenizer with this config."""
    return {key: (path, shape) for key, path, shape in _layout(cfg)}


@functools.lru_cache(maxsize=8)
def _layout(cfg: VQConfig) -> tuple:
    # Tracing the tokenizer's construction takes seconds: do it once per config.
    out = []
    for path, var in nnx.to_flat_state(nnx.state(_abstract(cfg), nnx.Param)):
        shape = tuple(var.shape)
        out.append((_torch_key(path), path, (shape[3], shape[2], shape[0], shape[1]) if _is_kernel(path) else shape))
    return tuple(out)


def inspect_vq_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What the weights say about their tokenizer (the VQConfig fields that fix parameter shapes); entries that
    cannot be read are left out."""
    sd = checks.drop_ignored(state_dict_lib.normalize(state_dict), IGNORED)
    info: dict[str, Any] = {}

    def shape(key):
        return tuple(sd[key].shape) if key in sd else None

    if (s := shape(CODEBOOK_KEY)) and len(s) == 2:
        info["codebook_size"], info["codebook_dim"] = s
    if (s := shape("encoder.conv_in.weight")) and len(s) == 4:
        info["base_channels"], info["in_channels"] = s[0], s[1]
    if (s := shape("encoder.conv_out.weight")) and len(s) == 4:
        info["z_channels"] = s[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    if levels:
        res = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
        info["num_res_blocks"] = max(res) + 1 if res else 0
        widths = [shape(f"encoder.conv_blocks.{i}.res.{info['num_res_blocks'] - 1}.conv2.weight") for i in levels]
        if "base_channels" in info and all(widths):
            info["channel_mult"] = tuple(w[0] // info["base_channels"] for w in widths)
        info["attn_levels"] = tuple(i for i in levels if f"encoder.conv_blocks.{i}.attn.0.q.weight" in sd)
    return info


def check_vq_state_dict(state_dict: Mapping[str, Any], cfg, *, check_values: bool = True) -> dict[str, np.ndarray]:
    """The state dict's parameters as NumPy arrays, or a ConversionError listing every key that does not fit and,
    unless check_values=False, every parameter holding NaN, inf or absurdly large values."""
    cfg = _as_vq_config(cfg)
    sd = checks.drop_ignored(state_dict_lib.normalize(state_dict), IGNORED)
    found = inspect_vq_state_dict(sd)
    misfits = [f"{name}: the weights have {value}, the config has {getattr(cfg, name)}"
               for name, value in found.items() if value != getattr(cfg, name)]
    expected = {key: shape for key, (_, shape) in torch_layout(cfg).items()}
    misfits += checks.key_problems(expected, sd)
    bad_values = checks.value_problems(sd, list(expected)) if check_values else []
    if misfits:
        fields = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("codebook_size", "codebook_dim", "base_channels",
                                                               "channel_mult", "num_res_blocks", "z_channels"))
        hint = "The weights look like: " + ", ".join(f"{k}={v}" for k, v in found.items()) + "."
        if "tok_embeddings.weight" in sd:
            hint = "These are the weights of a GPT decoder (tok_embeddings, layers.*): convert them with --kind=gpt."
        raise checks.ConversionError(f"the VQ state dict does not fit the tokenizer config ({fields})",
                                     misfits + bad_values, hint + ("\n" + checks.VALUES_HINT if bad_values else ""))
    if bad_values:
        raise checks.ConversionError("the VQ weights hold non-finite or absurd values", bad_values, checks.VALUES_HINT)
    return sd


def vq_from_state_dict(state_dict: Mapping[str, Any], vq_cfg, *, check_values: bool = True) -> VQModel:
    """A `VQModel` holding the weights of a PyTorch LlamaGen VQ state dict (e.g. VQ-16's `vq_ds16_c2i.pt`).

    state_dict: names -> arrays (NumPy, JAX or torch tensors); vq_cfg: a `VQConfig` (e.g. `vq_config("vq16")`) or a
    `config.tokenizer` block whose shapes match the weights. Parameters are float32. check_values: refuse
    parameters holding NaN, inf or absurdly large values (a damaged file); False accepts them.
    """
    cfg = _as_vq_config(vq_cfg)
    sd = check_vq_state_dict(state_dict, cfg, check_values=check_values)
    # Dropout keeps random state that an abstract model cannot provide: build a real one then.
    model = VQModel(cfg, rngs=nnx.Rngs(0)) if cfg.dropout else _abstract(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    variables = dict(nnx.to_flat_state(params))
    for key, (path, _) in torch_layout(cfg).items():
        variables[path].set_value(jnp.asarray(_to_ours(path, np.asarray(sd[key], np.float32))))
    return nnx.merge(graphdef, params, rest)


def vq_to_state_dict(model: VQModel) -> dict[str, np.ndarray]:
    """The tokenizer's parameters as a PyTorch LlamaGen VQ state dict (float32 NumPy arrays, release key names)."""
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {key: np.ascontiguousarray(_to_torch(path, np.asarray(jax.device_get(variables[path][...]), np.float32)))
            for key, (path, _) in torch_layout(model.config).items()}
