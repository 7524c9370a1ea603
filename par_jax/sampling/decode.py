"""One decoding step of the PAR decoder: the model's math over weights and a KV cache laid out for decoding.

Same computation as `ParTransformer` (pre-norm RMSNorm in float32, fused q|k|v, permuted RoPE, block-causal attention
with float32 scores, SwiGLU, final norm, float32 logits; PAR_SPEC section 6), arranged for a few rows per step, where
a step only streams the weights once and the layout decides the speed. Measured on a 2-core Xeon (XLA:CPU, size B,
see docs/benchmarks.md):
- one buffer per layer and matrix: a `scan` over stacked layers slices every matrix out of its stack at every step,
  which XLA materialises as a copy (2x the time per step);
- matrices cast to the compute dtype once per call, not at every step;
- q|k|v as a plain (rows, dim) x (dim, 3*dim) matmul (the training layer's q|k|v-major output made XLA transpose the
  whole weight at every step);
- on CPU, matrices split into column blocks of `block_cols`: XLA:CPU runs 2 to 32-row matmuls 1.4-2.5x faster on
  narrow blocks than on one wide matrix (accelerators take whole matrices: block_cols=0);
- KV cache per layer with keys and values both stored (B, heads, head_dim, S): one contiguous block per (batch, head)
  that both attention products stream along S (2x faster than (B, S, heads, head_dim); keys as (.., S, head_dim)
  were 10-35% slower for 4 to 16 queries);
- on CPU in float32, attention over the cache by a C++ kernel (cpu_attention.py, `attention="cpu_kernel"`): XLA:CPU
  runs it on one thread at ~3-7 GB/s, the kernel on every core (2-3x faster at 4-16 queries; the whole sampler
  0.83-0.93x the time).
tests/test_sampler.py checks the result against the training forward at every position.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax import ordering
from par_jax.model import ModelConfig, ParTransformer
from par_jax.model import rope as rope_lib
from par_jax.sampling import cpu_attention

Weights = dict[str, Any]   # see prepare()
Cache = list               # per layer {"k": (B, heads, head_dim, S), "v": (B, heads, head_dim, S)}


CPU_BLOCK_COLS = 256   # fastest of 128/256/512/1024 on XLA:CPU


def default_block_cols() -> int:
    """Column-block width for the current backend: CPU_BLOCK_COLS on CPU, whole matrices (0) on accelerators.

    Also for 2-row steps (n=1, batch 1, guided), although the weight matmuls alone run faster on whole matrices
    there: the whole sampler was 4-10% slower with them (paired runs, docs/benchmarks.md).
    """
    return CPU_BLOCK_COLS if jax.default_backend() == "cpu" else 0


ATTENTION = ("xla", "cpu_kernel")   # how a step attends over the cache: XLA's ops, or cpu_attention.cc


def _cpu_kernel_unavailable(dtype, num_devices: int) -> str | None:
    """Why attention="cpu_kernel" cannot run here, or None. The build is tried last (only where it would be used)."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU backend only (this is {jax.default_backend()})"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it takes float32 models, this one computes in {jnp.dtype(dtype)}"
    if num_devices != 1:
        return f"it needs one device (the batch is sharded over {num_devices})"
    if not cpu_attention.available():
        return f"it is unavailable: {cpu_attention.unavailable_reason()}"
    return None


def default_attention(dtype, num_devices: int) -> str:
    """"cpu_kernel" where it applies (CPU backend, float32, one device, kernel built), else "xla".

    The kernel was 1.8-3x faster than XLA's attention at 1 to 16 queries per step on a 2-core Xeon
    (docs/benchmarks.md#sampling); with several devices the batch is sharded by XLA, which cannot split a custom call.
    """
    return "xla" if _cpu_kernel_unavailable(dtype, num_devices) else "cpu_kernel"


def check_attention(attention: str, dtype, num_devices: int) -> None:
    """A clear error for an attention choice that cannot run here."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}.")
    reason = _cpu_kernel_unavailable(dtype, num_devices) if attention == "cpu_kernel" else None
    if reason:
        raise ValueError(f"attention='cpu_kernel' cannot run here: {reason}; use attention='xla'.")


def _blocks(w, block_cols: int) -> list:
    if not block_cols or w.shape[1] <= block_cols:
        return [w]
    parts = -(-w.shape[1] // block_cols)
    return jnp.array_split(w, parts, axis=1)


def prepare(model: ParTransformer, block_cols: int) -> Weights:
    """Decoding weights from the model's parameters (under jit; the sampler keeps them for all its calls).

    Every matrix as (in, out) in the compute dtype, split into column blocks; norms and embeddings as they are.
    """
    cfg = model.config
    dt = jnp.dtype(cfg.dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if cfg.scan_layers:
        layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.num_layers)]
    else:
        layers = [params["layers"][i] for i in range(cfg.num_layers)]
    mat = lambda w, rows: _blocks(w.reshape(rows, -1).astype(dt), block_cols)
    out = {
        "tok_embeddings": params["tok_embeddings"],
        "cls_embedding": params["cls_embedding"],
        "norm": params["norm"]["weight"],
        "output": mat(params["output"], cfg.dim),
        "layers": [{
            "attention_norm": p["attention_norm"]["weight"],
            "wqkv": mat(p["attention"]["wqkv"], cfg.dim),                        # (dim, q|k|v * heads * head_dim)
            "wo": mat(p["attention"]["wo"], cfg.num_heads * cfg.head_dim),
            "ffn_norm": p["ffn_norm"]["weight"],
            "w1": mat(p["feed_forward"]["w1"], cfg.dim),
            "w3": mat(p["feed_forward"]["w3"], cfg.dim),
            "w2": mat(p["feed_forward"]["w2"], cfg.mlp_hidden),
        } for p in layers],
    }
    if cfg.num_transition:
        out["transition"] = params["transition"]
    return out


def prepare_weights(model: ParTransformer, block_cols: int, sharding=None) -> Weights:
    """`prepare` compiled and run once; `sharding` (e.g. replicated over a mesh) places the parameters first."""
    graphdef, state = nnx.split(model)
    if sharding is not None:
        state = jax.device_put(state, sharding)
    return _prepare_jit(graphdef, state, block_cols=block_cols)


@functools.partial(jax.jit, static_argnames=("graphdef", "block_cols"))
def _prepare_jit(graphdef, state, *, block_cols):
    return prepare(nnx.merge(graphdef, state), block_cols)


def init_cache(cfg: ModelConfig, rows: int, length: int) -> Cache:
    shape = (rows, cfg.num_heads, cfg.head_dim, length)
    return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)} for _ in range(cfg.num_layers)]


def grow_cache(cache: Cache, length: int) -> Cache:
    """Zero-pad every layer's keys and values to `length` positions."""
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])])
    return [{"k": pad(c["k"]), "v": pad(c["v"])} for c in cache]


def _dense(x, blocks):
    """x (rows, in) @ the matrix given as column blocks."""
    outs = [x @ b for b in blocks]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


def _rms_norm(x, weight, eps: float):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight).astype(x.dtype)


def embed(cfg: ModelConfig, w: Weights, kind, index, tokens, labels):
    """Input embeddings (rows, Q, dim); kind/index (Q,) may be traced (they change from step to step)."""
    h = jnp.take(w["tok_embeddings"], tokens, axis=0)
    cls = jnp.take(w["cls_embedding"], labels, axis=0)[:, None, :]
    h = jnp.where((kind == ordering.TOKEN)[None, :, None], h, cls)
    if cfg.num_transition:
        tr = jnp.take(w["transition"], jnp.clip(index, 0, cfg.num_transition - 1), axis=0)
        h = jnp.where((kind == ordering.TRANSITION)[None, :, None], tr[None], h)
    return h.astype(jnp.dtype(cfg.dtype))


def layers(cfg: ModelConfig, w: Weights, h, cos, sin, mask, cache: Cache, index, attention: str = "xla"):
    """Every decoder layer for Q new positions starting at sequence position `index`.

    h (rows, Q, dim); cos/sin (Q, head_dim/2); mask (Q, S) over the cache's S positions. Writes the new keys and
    values into the cache at `index` (dynamic_update_slice) and returns (h, cache). attention: one of ATTENTION.
    """
    rows, q_len, dim = h.shape
    heads, hd, dt = cfg.num_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
    new_cache = []
    for p, c in zip(w["layers"], cache):
        x = _rms_norm(h, p["attention_norm"], cfg.norm_eps).reshape(rows * q_len, dim)
        qkv = _dense(x, p["wqkv"]).reshape(rows, q_len, 3, heads, hd)
        q = rope_lib.apply_rope(qkv[:, :, 0], cos, sin)
        k = rope_lib.apply_rope(qkv[:, :, 1], cos, sin)
        to_cache = lambda x: jnp.transpose(x, (0, 2, 3, 1)).astype(dt)   # (rows, Q, heads, hd) -> (rows, heads, hd, Q)
        ck = jax.lax.dynamic_update_slice(c["k"], to_cache(k), (0, 0, 0, index))
        cv = jax.lax.dynamic_update_slice(c["v"], to_cache(qkv[:, :, 2]), (0, 0, 0, index))
        new_cache.append({"k": ck, "v": cv})
        if attention == "cpu_kernel":
            out = cpu_attention.attend(q.astype(dt), ck, cv, mask).reshape(rows * q_len, heads * hd)
        else:
            scores = jnp.einsum("bqhk,bhks->bhqs", q, ck, preferred_element_type=jnp.float32) * (1.0 / np.sqrt(hd))
            scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bhqs,bhks->bqhk", probs, cv).reshape(rows * q_len, heads * hd)
        h = h + _dense(out, p["wo"]).reshape(rows, q_len, dim)
        x = _rms_norm(h, p["ffn_norm"], cfg.norm_eps).reshape(rows * q_len, dim)
        up = jax.nn.silu(_dense(x, p["w1"])) * _dense(x, p["w3"])
        h = h + _dense(up, p["w2"]).reshape(rows, q_len, dim)
    return h, new_cache


def head(cfg: ModelConfig, w: Weights, h):
    """Final norm and vocabulary head: float32 logits (rows, Q, vocab)."""
    rows, q_len, dim = h.shape
    x = _rms_norm(h, w["norm"], cfg.norm_eps).reshape(rows * q_len, dim)
    return _dense(x, w["output"]).astype(jnp.float32).reshape(rows, q_len, -1)
