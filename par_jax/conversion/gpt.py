"""PyTorch PAR / LlamaGen GPT state dicts <-> par_jax's `ParTransformer`, both ways (PAR_SPEC sections 6 and 9).

Layouts, PyTorch -> ours:
  linear weights                  (out, in)                             -> (in, out)
  layers.i.attention.wqkv.weight  (3*dim, dim): rows q|k|v, head-major  -> wqkv (dim, 3, heads, head_dim)
  layers.i.attention.wo.weight    (dim, dim): input columns head-major  -> wo (heads, head_dim, dim)
  spe_tok_embeddings.special_embeddings.weight (n-1, dim)               -> transition (absent for n = 1, LlamaGen)
  one key per layer                                                     -> stacked on a leading layer axis when
                                                                           scan_layers, else one Block per layer
The number of layers, dim, vocabulary, classes and n are read from the weights and checked against the config. The
head count and the token grid are not stored in the weights: they come from the config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax.conversion import checks
from par_jax.core import state_dict as state_dict_lib
from par_jax.model import SIZES, ModelConfig, ParTransformer, from_config_dict

# Tensors of the PyTorch model that are not parameters: the rotary table, the attention mask and KV caches.
IGNORED = re.compile(r"freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache")
TRANSITION_KEY = "spe_tok_embeddings.special_embeddings.weight"
_LAYER_KEY = re.compile(r"layers\.(\d+)\..+")


def _same(w):
    return w


def _transpose(w):
    return w.T


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor: where it goes in our model and how its layout changes."""
    path: tuple            # our parameter path (for a per-layer tensor: inside one Block, under "layers")
    shape: tuple           # its PyTorch shape
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    layer: Optional[int] = None


def torch_layout(cfg: ModelConfig) -> dict[str, Entry]:
    """Every PyTorch state-dict key a model with this config has, in the release's order."""
    d, v, hidden = cfg.dim, cfg.vocab_size, cfg.mlp_hidden
    heads, hd = cfg.num_heads, cfg.head_dim
    layout = {
        "cls_embedding.embedding_table.weight": Entry(("cls_embedding",), (cfg.num_classes + 1, d), _same, _same),
        "tok_embeddings.weight": Entry(("tok_embeddings",), (v, d), _same, _same),
    }
    if cfg.num_transition:
        layout[TRANSITION_KEY] = Entry(("transition",), (cfg.num_transition, d), _same, _same)
    block = {
        # (3*dim, dim) with rows [q | k | v], each head-major -> (dim, 3, heads, head_dim).
        "attention.wqkv.weight": (("attention", "wqkv"), (3 * d, d),
                                  lambda w: w.T.reshape(d, 3, heads, hd), lambda w: w.reshape(d, 3 * d).T),
        # (dim, heads*head_dim): the attention output is flattened head-major before the projection.
        "attention.wo.weight": (("attention", "wo"), (d, d),
                                lambda w: w.T.reshape(heads, hd, d), lambda w: w.reshape(heads * hd, d).T),
        "feed_forward.w1.weight": (("feed_forward", "w1"), (hidden, d), _transpose, _transpose),
        "feed_forward.w3.weight": (("feed_forward", "w3"), (hidden, d), _transpose, _transpose),
        "feed_forward.w2.weight": (("feed_forward", "w2"), (d, hidden), _transpose, _transpose),
        "attention_norm.weight": (("attention_norm", "weight"), (d,), _same, _same),
        "ffn_norm.weight": (("ffn_norm", "weight"), (d,), _same, _same),
    }
    for i in range(cfg.num_layers):
        for name, (path, shape, to_ours, to_torch) in block.items():
            layout[f"layers.{i}.{name}"] = Entry(path, shape, to_ours, to_torch, layer=i)
    layout["norm.weight"] = Entry(("norm", "weight"), (d,), _same, _same)
    layout["output.weight"] = Entry(("output",), (v, d), _transpose, _transpose)
    return layout


def inspect_gpt_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What the weights say about their model: num_layers, dim, vocab_size, num_classes, n, mlp_hidden, and the
    named size with that many layers and that dim (None if none). Entries that cannot be read are left out."""
    sd = checks.drop_ignored(state_dict_lib.normalize(state_dict), IGNORED)
    info: dict[str, Any] = {}
    layers = [int(m.group(1)) for k in sd if (m := _LAYER_KEY.fullmatch(k))]
    if layers:
        info["num_layers"] = max(layers) + 1
    tok = sd.get("tok_embeddings.weight")
    if tok is not None and tok.ndim == 2:
        info["vocab_size"], info["dim"] = map(int, tok.shape)
    cls = sd.get("cls_embedding.embedding_table.weight")
    if cls is not None and cls.ndim == 2:
        info["num_classes"] = int(cls.shape[0]) - 1  # the last row is the null class
    tr = sd.get(TRANSITION_KEY)
    info["n"] = 1 if tr is None else int(tr.shape[0]) + 1
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1.ndim == 2:
        info["mlp_hidden"] = int(w1.shape[0])
    info["size"] = next((name for name, (layers_, _, dim) in SIZES.items()
                         if (layers_, dim) == (info.get("num_layers"), info.get("dim"))), None)
    return info


def _config_problems(found: Mapping[str, Any], cfg: ModelConfig) -> list[str]:
    problems = []
    dim = found.get("dim", cfg.dim)
    if dim % cfg.num_heads:
        problems.append(f"num_heads: the config's {cfg.num_heads} heads do not divide the weights' dim={dim} "
                        "(the head count is not stored in the weights; it comes from the config's size)")
    for name in ("num_layers", "dim", "vocab_size", "num_classes", "n", "mlp_hidden"):
        want = getattr(cfg, name)
        if name in found and found[name] != want:
            note = " (no spe_tok_embeddings: a LlamaGen model)" if name == "n" and found[name] == 1 else ""
            problems.append(f"{name}: the weights have {found[name]}{note}, the config has {want}")
    return problems


def _hint(found: Mapping[str, Any], sd: Mapping[str, Any]) -> str:
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
        return "These are the weights of a VQ tokenizer (encoder.*, decoder.*, quantize.*): use --kind=vq."
    desc = ", ".join(f"{k}={found[k]}" for k in ("num_layers", "dim", "vocab_size", "num_classes", "n") if k in found)
    hint = f"The weights look like: {desc}."
    if found.get("size"):
        hint += (f" That is size={found['size']}: pass e.g. --config=configs/par.py:size={found['size']},n={found['n']}"
                 f",res=384 (the token grid is not stored in the weights: res=384 gives 24x24 tokens, res=256 16x16).")
    return hint


def _as_model_config(cfg) -> ModelConfig:
    return cfg if isinstance(cfg, ModelConfig) else from_config_dict(cfg)


def check_gpt_state_dict(state_dict: Mapping[str, Any], cfg, *, check_values: bool = True) -> dict[str, np.ndarray]:
    """The state dict's parameters as NumPy arrays (non-parameters dropped), or a ConversionError listing every key
    that does not fit `cfg` (missing, unexpected, wrong shape or dtype), every setting that disagrees and, unless
    check_values=False, every parameter holding NaN, inf or absurdly large values (checks.ABSURD_MAGNITUDE)."""
    cfg = _as_model_config(cfg)
    sd = checks.drop_ignored(state_dict_lib.normalize(state_dict), IGNORED)
    found = inspect_gpt_state_dict(sd)
    expected = {k: e.shape for k, e in torch_layout(cfg).items()}
    misfits = _config_problems(found, cfg) + checks.key_problems(expected, sd)
    bad_values = checks.value_problems(sd, list(expected)) if check_values else []
    if misfits:
        raise checks.ConversionError(
            f"the GPT state dict does not fit the config (num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, "
            f"dim={cfg.dim}, vocab_size={cfg.vocab_size}, num_classes={cfg.num_classes}, n={cfg.n}, "
            f"grid_shape={cfg.grid_shape})", misfits + bad_values,
            _hint(found, sd) + ("\n" + checks.VALUES_HINT if bad_values else ""))
    if bad_values:
        raise checks.ConversionError("the GPT weights hold non-finite or absurd values", bad_values, checks.VALUES_HINT)
    return sd


def _by_variable(cfg: ModelConfig) -> dict[tuple, list[tuple[str, Entry]]]:
    """Our parameter paths -> the PyTorch keys stored in each (all layers' keys for a stacked parameter)."""
    groups: dict[tuple, list[tuple[str, Entry]]] = {}
    for key, entry in torch_layout(cfg).items():
        if entry.layer is None:
            path = entry.path
        elif cfg.scan_layers:
            path = ("layers",) + entry.path
        else:
            path = ("layers", entry.layer) + entry.path
        groups.setdefault(path, []).append((key, entry))
    return groups


def gpt_from_state_dict(state_dict: Mapping[str, Any], cfg, *, check_values: bool = True) -> ParTransformer:
    """A `ParTransformer` holding the weights of a PyTorch PAR or LlamaGen GPT state dict.

    state_dict: names -> arrays (NumPy, JAX or torch tensors), e.g. from `load_state_dict(path)`.
    cfg: a `ModelConfig` or a `config.model` block; its layers, dim, vocabulary, classes and n must match the
    weights, and it supplies the head count, the token grid and the compute dtype. Parameters are float32.
    check_values: refuse parameters holding NaN, inf or absurdly large values (a damaged file); False accepts them.
    """
    cfg = _as_model_config(cfg)
    sd = check_gpt_state_dict(state_dict, cfg, check_values=check_values)
    abstract = nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    for path, items in _by_variable(cfg).items():
        variable = variables[path]
        if cfg.scan_layers and items[0][1].layer is not None:
            value = np.empty(variable.shape, np.float32)
            for key, entry in items:
                value[entry.layer] = entry.to_ours(np.asarray(sd[key], np.float32))
        else:
            (key, entry), = items
            value = entry.to_ours(np.asarray(sd[key], np.float32))
        if tuple(variable.shape) != value.shape:  # a bug in torch_layout, not in the user's file
            raise AssertionError(f"converted {path} has shape {value.shape}, the model expects {variable.shape}")
        variable.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


def gpt_to_state_dict(model: ParTransformer) -> dict[str, np.ndarray]:
    """The model's parameters as a PyTorch PAR / LlamaGen state dict (float32 NumPy arrays, release key names).

    Save it with `save_state_dict(sd, "model.safetensors")` or `.pt`; the release loads it with
    `model.load_state_dict(sd)` (wrap it as {"model": sd} for its sampling scripts).
    """
    cfg = model.config
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for path, items in _by_variable(cfg).items():
        value = np.asarray(jax.device_get(variables[path][...]), np.float32)
        for key, entry in items:
            layer_value = value[entry.layer] if cfg.scan_layers and entry.layer is not None else value
            out[key] = np.ascontiguousarray(entry.to_torch(layer_value))
    return {key: out[key] for key in torch_layout(cfg)}
