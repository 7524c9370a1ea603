"""The PAR decoder: LlamaGen's GPT with PAR's token order, transition embeddings and block-causal attention.

Pre-norm decoder without biases: RMSNorm (float32), fused q|k|v attention with permuted 2D/3D RoPE, SwiGLU MLP,
final RMSNorm and an unbiased vocabulary head (logits in float32). Parameters are float32 and carry logical axis
names (`out_sharding` metadata) that training maps onto a device mesh; compute runs in `config.dtype`.

One definition serves training and sampling: the training forward (`__call__`: raster-order tokens in, loss and
raster-order logits out) and the cached call (`step`, as Flax gemma's `Attention(x, pos, cache, mask)`: a few
sequence positions over per-layer `KVCache`s) run the same layers. How a machine runs the cached call is an option of
it, not a second copy of the math: matrices prepared as `ColumnBlocks`, the cache's layout and an attention kernel
(par_jax/sampling/backend.py chooses them). The training forward's attention kernel is likewise an option
(`ModelConfig.attention`: XLA's einsums, cuDNN through jax.nn.dot_product_attention, or Pallas splash on TPU;
par_jax/model/attention.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from par_jax import ordering
from par_jax.model import attention as attention_lib
from par_jax.model import rope as rope_lib
from par_jax.model.attention import attend
from par_jax.model.config import ModelConfig
from par_jax.utils import rng as rng_lib


def _param(rngs: nnx.Rngs, init, shape, names, fan_in_axes: int = 0) -> nnx.Param:
    # Logical axis names only (no eager sharding): training maps them onto the mesh with its own rules.
    # fan_in_axes marks a matrix (its leading input axes), so that any layer's matrices can become ColumnBlocks.
    meta = {"fan_in_axes": fan_in_axes} if fan_in_axes else {}
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names, eager_sharding=False, **meta)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["blocks"], meta_fields=["out_shape", "kernel"])
@dataclasses.dataclass(frozen=True)
class ColumnBlocks:
    """A matrix parameter prepared for many calls: flat (fan_in, fan_out), in the compute dtype, split by columns
    (why: sampling/backend.py), or packed once for a matmul kernel (`kernel.pack`, then `kernel.matmul` at every
    call; sampling/cpu_matmul.py). `dense` multiplies by it as by the parameter."""
    blocks: tuple
    out_shape: tuple
    kernel: Any = None

    @classmethod
    def of(cls, w, fan_in_axes: int, dtype, block_cols: int, kernel=None) -> "ColumnBlocks":
        out_shape = tuple(w.shape[fan_in_axes:])
        w = w.reshape(math.prod(w.shape[:fan_in_axes]), -1).astype(dtype)
        if kernel is not None:
            return cls((kernel.pack(w),), out_shape, kernel)
        parts = -(-w.shape[1] // block_cols) if block_cols else 1
        return cls(tuple(jnp.array_split(w, parts, axis=1)) if parts > 1 else (w,), out_shape)


def dense(x, w: nnx.Variable, dtype):
    """x times a matrix parameter (x's last axes against its `fan_in_axes` first ones), in `dtype`.

    The parameter may hold its ColumnBlocks instead (sampling): the same product, blockwise or by its kernel.
    """
    value, fan_in_axes = w.get_value(), w.get_metadata()["fan_in_axes"]
    if not isinstance(value, ColumnBlocks):
        return jnp.tensordot(x.astype(dtype), value.astype(dtype), fan_in_axes)
    lead = x.shape[:x.ndim - fan_in_axes]
    x = x.astype(dtype).reshape(math.prod(lead), -1)
    if value.kernel is not None:
        y = value.kernel.matmul(x, value.blocks[0], math.prod(value.out_shape))
    else:
        outs = [x @ b for b in value.blocks]
        y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
    return y.reshape(*lead, *value.out_shape)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), ("norm",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=["seq_last", "kernel"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's keys and values for cached calls, in the compute dtype (`ParTransformer.init_cache`).

    seq_last: stored (B, heads, head_dim, S) instead of (B, S, heads, head_dim). kernel: attention over this layout
    in place of `attend`, called as kernel(q, k, v, mask). With stacked layers (scan_layers) one KVCache holds them
    all along a leading layer axis.
    """
    k: jax.Array
    v: jax.Array
    seq_last: bool = False
    kernel: Optional[Callable] = None

    @property
    def length(self) -> int:
        return self.k.shape[-1 if self.seq_last else -3]

    def grow(self, length: int) -> "KVCache":
        """Zero-padded to `length` positions."""
        axis = self.k.ndim - 1 if self.seq_last else self.k.ndim - 3
        pad = [(0, 0)] * self.k.ndim
        pad[axis] = (0, length - self.length)
        return dataclasses.replace(self, k=jnp.pad(self.k, pad), v=jnp.pad(self.v, pad))

    def write(self, k, v, index) -> "KVCache":
        """Keys and values (B, Q, heads, head_dim) of sequence positions index .. index + Q - 1."""
        if self.seq_last:
            k, v = (jnp.transpose(x, (0, 2, 3, 1)) for x in (k, v))
        put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), index, 3 if self.seq_last else 1)
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))

    def attend(self, q, mask):
        if self.kernel is not None:
            return self.kernel(q, self.k, self.v, mask)
        return attend(q, self.k, self.v, mask, seq_last=self.seq_last)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        self.attn_dropout, self.resid_dropout = cfg.attn_dropout, cfg.resid_dropout
        self.attention_impl = cfg.attention  # training attention's kernel (attention.py); not the cached path's
        # One fused projection, (dim) -> (q|k|v, heads, head_dim): the release's row order, kept shardable by head.
        self.wqkv = _param(rngs, init, (cfg.dim, 3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "head_dim"),
                           fan_in_axes=1)
        self.wo = _param(rngs, init, (cfg.num_heads, cfg.head_dim, cfg.dim), ("heads", "head_dim", "embed"),
                         fan_in_axes=2)

    def __call__(self, x, cos, sin, mask, *, rng=None, cache: Optional[KVCache] = None, index=None,
                 batch_sharding: Optional[jax.sharding.NamedSharding] = None):
        """x (B, Q, dim); cos/sin (Q, head_dim/2); mask (Q, S) bool. Returns (out (B, Q, dim), cache).

        Without a cache the Q positions attend among themselves (S = Q) through `attention.attention` with the
        configured kernel (which needs the mask as NumPy data unless it is "xla"); with one, their keys and values are
        written into it at sequence position `index` and they attend over its S positions.
        """
        dt = self.dtype
        qkv = dense(x, self.wqkv, dt)                                  # (B, Q, q|k|v, heads, head_dim)
        q = rope_lib.apply_rope(qkv[:, :, 0], cos, sin)
        k = rope_lib.apply_rope(qkv[:, :, 1], cos, sin)
        v = qkv[:, :, 2]
        r_attn, r_resid = rng_lib.split(rng, 2)
        if cache is None:
            out = attention_lib.attention(q, k, v, mask, impl=self.attention_impl, dropout=self.attn_dropout,
                                          rng=r_attn, batch_sharding=batch_sharding)
        else:
            cache = cache.write(k, v, index)
            out = cache.attend(q, mask)
        out = dense(out, self.wo, dt)
        return rng_lib.dropout(out, self.resid_dropout, r_resid), cache


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.dropout = cfg.mlp_dropout
        self.w1 = _param(rngs, init, (cfg.dim, cfg.mlp_hidden), ("embed", "mlp"), fan_in_axes=1)
        self.w3 = _param(rngs, init, (cfg.dim, cfg.mlp_hidden), ("embed", "mlp"), fan_in_axes=1)
        self.w2 = _param(rngs, init, (cfg.mlp_hidden, cfg.dim), ("mlp", "embed"), fan_in_axes=1)

    def __call__(self, x, rng=None):
        dt = self.dtype
        gate = jax.nn.silu(dense(x, self.w1, dt))
        up = dense(x, self.w3, dt)
        return rng_lib.dropout(dense(gate * up, self.w2, dt), self.dropout, rng)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, rngs=rngs)
        self.attention = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, rngs=rngs)
        self.feed_forward = FeedForward(cfg, rngs=rngs)

    def __call__(self, h, cos, sin, mask, *, rng=None, cache: Optional[KVCache] = None, index=None,
                 batch_sharding: Optional[jax.sharding.NamedSharding] = None):
        """Returns (h, cache); see Attention."""
        r_attn, r_mlp = rng_lib.split(rng, 2)
        out, cache = self.attention(self.attention_norm(h), cos, sin, mask, rng=r_attn, cache=cache, index=index,
                                    batch_sharding=batch_sharding)
        h = h + out
        return h + self.feed_forward(self.ffn_norm(h), rng=r_mlp), cache


def _remat_policy(name: str):
    return {"full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


class ParTransformer(nnx.Module):
    """Class-conditional PAR decoder (n = 1 is exactly LlamaGen's GPT)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        std = nnx.initializers.normal(cfg.init_std)
        self.tok_embeddings = _param(rngs, std, (cfg.vocab_size, cfg.dim), ("vocab", "embed"))
        # The last row is the null class (guidance and label dropout).
        self.cls_embedding = _param(rngs, std, (cfg.num_classes + 1, cfg.dim), ("classes", "embed"))
        if cfg.num_transition:
            self.transition = _param(rngs, std, (cfg.num_transition, cfg.dim), (None, "embed"))
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(r):
                return Block(cfg, rngs=r)
            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, rngs=rngs)
        self.output = _param(rngs, nnx.initializers.zeros, (cfg.dim, cfg.vocab_size), ("embed", "vocab"),
                             fan_in_axes=1)

    # ----- pieces of the forward pass -----

    def embed(self, kind, index, tokens, labels):
        """Input embeddings (B, Q, dim) for sequence positions described by `kind`/`index` (Q,) (ordering.py).

        tokens (B, Q) are the token ids at TOKEN positions (ignored elsewhere); labels (B,) the class ids.
        """
        cfg = self.config
        tok = jnp.take(self.tok_embeddings[...], tokens, axis=0)
        cls = jnp.take(self.cls_embedding[...], labels, axis=0)[:, None, :]
        h = jnp.where((kind == ordering.TOKEN)[None, :, None], tok, cls)
        if cfg.num_transition:
            tr = jnp.take(self.transition[...], jnp.clip(index, 0, cfg.num_transition - 1), axis=0)
            h = jnp.where((kind == ordering.TRANSITION)[None, :, None], tr[None], h)
        return h.astype(jnp.dtype(cfg.dtype))

    def rope(self) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin), each (L, head_dim/2), for every position of the sequence layout."""
        return rope_table(self.config)

    def transform(self, h, cos, sin, mask, *, rng=None, batch_sharding: Optional[jax.sharding.NamedSharding] = None,
                  cache=None, index=None):
        """Run every decoder layer: h (B, Q, dim) -> (h, cache).

        cos/sin (Q, head_dim/2) and mask (Q, S) as in Attention. cache: None (the Q positions are the whole sequence),
        or `init_cache`'s per-layer caches, written at sequence position `index` and returned updated.
        batch_sharding: the sharding of the (B, ...) batch; activations are kept split the same way along B.
        """
        cfg = self.config
        layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)

        def run_block(graphdef, layer_state, h, r, c):
            if batch_sharding is not None:
                # Keep activations split along the batch like the input. Without this, XLA follows the FSDP
                # parameter sharding and every device holds the whole batch's attention (PAR-XXL on 32 chips:
                # 2.2 TB of temporaries per device instead of ~90 GB).
                spec = P(batch_sharding.spec[0], *([None] * (h.ndim - 1)))
                h = jax.lax.with_sharding_constraint(h, jax.sharding.NamedSharding(batch_sharding.mesh, spec))
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask, rng=r, cache=c, index=index,
                                                    batch_sharding=batch_sharding)

        if cfg.remat != "none":
            run_block = jax.checkpoint(run_block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers,
                                       static_argnums=(0,))

        if not cfg.scan_layers:
            new_cache = []
            for i, block in enumerate(self.layers):
                graphdef, layer_state = nnx.split(block)
                h, c = run_block(graphdef, layer_state, h, None if layer_rngs is None else layer_rngs[i],
                                 None if cache is None else cache[i])
                new_cache.append(c)
            return h, (None if cache is None else new_cache)

        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            layer_state, r, c = xs
            return run_block(graphdef, layer_state, h, r, c)

        return jax.lax.scan(body, h, (state, layer_rngs, cache))

    def head(self, h):
        """Final norm and vocabulary head: float32 logits (B, Q, vocab)."""
        return dense(self.norm(h), self.output, jnp.dtype(self.config.dtype)).astype(jnp.float32)

    # ----- training forward -----

    def __call__(self, tokens, labels, *, rng=None, return_logits: bool = True,
                 batch_sharding: Optional[jax.sharding.NamedSharding] = None):
        """Teacher-forced forward pass.

        tokens: (B, N) int image tokens in raster order; labels: (B,) int class ids in [0, num_classes] (num_classes is
        the null class). rng: a PRNG key turns on dropout and class-label dropout (training); None is deterministic.
        Returns (loss, logits) with loss the mean cross-entropy over all N tokens and logits (B, N, vocab) float32 in
        raster order: logits[:, i] predicts raster token i.
        """
        cfg = self.config
        check_inputs(cfg, tokens, labels)
        layout = cfg.layout
        r_cls, r_emb, r_layers = rng_lib.split(rng, 3)
        if r_cls is not None and cfg.class_dropout > 0:
            drop = jax.random.bernoulli(r_cls, cfg.class_dropout, labels.shape)
            labels = jnp.where(drop, cfg.null_class, labels)
        tokens_gen = jnp.take(tokens, layout.perm, axis=1)            # t_0 .. t_{N-1}
        seq_tokens = jnp.take(tokens_gen, layout.input_index, axis=1)  # meaningful at TOKEN positions only
        h = self.embed(layout.input_kind, layout.input_index, seq_tokens, labels)
        h = rng_lib.dropout(h, cfg.embed_dropout, r_emb)
        cos, sin = self.rope()
        # The mask stays NumPy data: the fused attention kernels are built from it (attention.py).
        h, _ = self.transform(h, jnp.asarray(cos), jnp.asarray(sin), _mask(cfg.order), rng=r_layers,
                              batch_sharding=batch_sharding)
        logits_gen = self.head(h[:, : cfg.num_tokens])                 # position p predicts t_p
        logp = jax.nn.log_softmax(logits_gen, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens_gen[..., None], axis=-1)[..., 0]
        loss = jnp.mean(nll)
        if not return_logits:
            return loss, None
        return loss, jnp.take(logits_gen, layout.inverse, axis=1)

    # ----- cached calls (sampling) -----

    def init_cache(self, rows: int, length: int, *, seq_last: bool = False, kernel: Optional[Callable] = None):
        """Zero KV caches for `rows` sequences of `length` positions: a list with one KVCache per layer, or (scanned
        layers) one KVCache stacked over them. seq_last/kernel: see KVCache."""
        cfg = self.config
        shape = (rows, cfg.num_heads, cfg.head_dim, length) if seq_last else (rows, length, cfg.num_heads, cfg.head_dim)
        if cfg.scan_layers:
            shape = (cfg.num_layers, *shape)
        zeros = lambda: KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype), seq_last, kernel)
        return zeros() if cfg.scan_layers else [zeros() for _ in range(cfg.num_layers)]

    def step(self, tokens, labels, cache, start, width: int):
        """Sequence positions start .. start + width - 1 over KV caches; returns (logits, cache).

        tokens (B, N) int: t_0 .. t_{N-1} in generation order (only those the positions feed are read); labels (B,);
        cache: `init_cache`'s, holding the positions before `start`; start may be traced, width is static. The logits
        (B, width, vocab) float32 predict t_start .. t_{start+width-1}; the cache comes back with these positions'
        keys and values. Equals the training forward at these positions (tests/test_model.py).
        """
        layout = self.config.layout
        rows = lambda table: jax.lax.dynamic_slice_in_dim(jnp.asarray(table), start, width)
        kind, index = rows(layout.input_kind), rows(layout.input_index)
        cos, sin = (rows(t) for t in self.rope())
        length = (cache[0] if isinstance(cache, list) else cache).length
        mask = jax.lax.dynamic_slice(jnp.asarray(_mask(self.config.order)), (start, 0), (width, length))
        h = self.embed(kind, index, jnp.take(tokens, index, axis=1), labels)
        h, cache = self.transform(h, cos, sin, mask, cache=cache, index=start)
        return self.head(h), cache


def rope_table(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (L, head_dim/2), for every position of `cfg`'s sequence layout (training and sampling)."""
    return _rope_table(cfg.order, cfg.head_dim, cfg.rope_base, cfg.zero_rope_special)


@functools.lru_cache(maxsize=32)
def _rope_table(order, head_dim, base, zero_special):
    return rope_lib.rope_table(order.layout, head_dim, base, zero_special)


@functools.lru_cache(maxsize=32)
def _mask(order):
    return order.layout.attention_mask()


def check_inputs(cfg: ModelConfig, tokens, labels) -> None:
    """Shape checks always; value-range checks when the arrays are concrete (outside jit)."""
    if tokens.ndim != 2 or tokens.shape[1] != cfg.num_tokens:
        raise ValueError(f"tokens must be (batch, {cfg.num_tokens}) for a {cfg.grid_shape} grid in raster order, "
                         f"got shape {tuple(tokens.shape)}. The model was built for grid_shape={cfg.grid_shape}.")
    if labels.shape != (tokens.shape[0],):
        raise ValueError(f"labels must be ({tokens.shape[0]},) to match the tokens, got {tuple(labels.shape)}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"tokens and labels must be integer arrays, got {tokens.dtype} and {labels.dtype}.")
    check_range("token", tokens, cfg.vocab_size)
    check_range("class label", labels, cfg.num_classes + 1,
                hint=f"(0..{cfg.num_classes - 1}, or {cfg.null_class} for the null class)")


def check_range(name: str, x, upper: int, hint: str = "") -> None:
    if isinstance(x, jax.core.Tracer):
        return
    x = np.asarray(x)
    if x.size and (x.min() < 0 or x.max() >= upper):
        bad = np.unique(x[(x < 0) | (x >= upper)])[:5].tolist()
        raise ValueError(f"{name} ids out of range: found {bad}; allowed 0..{upper - 1} {hint}".rstrip() + ".")


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count from abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
