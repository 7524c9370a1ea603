"""The PAR decoder: LlamaGen's GPT with PAR's token order, transition embeddings and block-causal attention.

Pre-norm decoder without biases: RMSNorm (float32), fused q|k|v attention with permuted 2D/3D RoPE, SwiGLU MLP,
final RMSNorm and an unbiased vocabulary head (logits in float32). Parameters are float32 and carry logical axis
names (`out_sharding` metadata) that training maps onto a device mesh; compute runs in `config.dtype`.

The model exposes its pieces (`embed`, `rope`, `transform`, `head`) so that the sampler can run the same layers over
a KV cache, and a training forward (`__call__`) that takes raster-order tokens and returns the loss and raster-order
logits.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from par_jax import ordering
from par_jax.model import rope as rope_lib
from par_jax.model.config import ModelConfig
from par_jax.utils import rng as rng_lib


def _param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
    # Logical axis names only (no eager sharding): training maps them onto the mesh with its own rules.
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names, eager_sharding=False)



class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), ("norm",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        self.attn_dropout, self.resid_dropout = cfg.attn_dropout, cfg.resid_dropout
        # One fused projection, (dim) -> (q|k|v, heads, head_dim): the release's row order, kept shardable by head.
        self.wqkv = _param(rngs, init, (cfg.dim, 3, cfg.num_heads, cfg.head_dim), ("embed", None, "heads", "head_dim"))
        self.wo = _param(rngs, init, (cfg.num_heads, cfg.head_dim, cfg.dim), ("heads", "head_dim", "embed"))

    def __call__(self, x, cos, sin, mask, *, rng=None):
        """x (B, L, dim); cos/sin (L, head_dim/2); mask (L, L) bool. (Decoding has its own layout: sampling/decode.py.)"""
        dt = self.dtype
        qkv = jnp.einsum("bqd,dthk->tbqhk", x.astype(dt), self.wqkv[...].astype(dt))
        q = rope_lib.apply_rope(qkv[0], cos, sin)
        k = rope_lib.apply_rope(qkv[1], cos, sin)
        v = qkv[2]
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / np.sqrt(self.head_dim))
        scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        r_attn, r_resid = rng_lib.split(rng, 2)
        probs = rng_lib.dropout(probs, self.attn_dropout, r_attn).astype(dt)
        out = jnp.einsum("bhqs,bshk->bqhk", probs, v.astype(dt))
        out = jnp.einsum("bqhk,hkd->bqd", out, self.wo[...].astype(dt))
        return rng_lib.dropout(out, self.resid_dropout, r_resid)


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.dropout = cfg.mlp_dropout
        self.w1 = _param(rngs, init, (cfg.dim, cfg.mlp_hidden), ("embed", "mlp"))
        self.w3 = _param(rngs, init, (cfg.dim, cfg.mlp_hidden), ("embed", "mlp"))
        self.w2 = _param(rngs, init, (cfg.mlp_hidden, cfg.dim), ("mlp", "embed"))

    def __call__(self, x, rng=None):
        dt = self.dtype
        x = x.astype(dt)
        gate = jax.nn.silu(x @ self.w1[...].astype(dt))
        up = x @ self.w3[...].astype(dt)
        return rng_lib.dropout((gate * up) @ self.w2[...].astype(dt), self.dropout, rng)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, rngs=rngs)
        self.attention = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, rngs=rngs)
        self.feed_forward = FeedForward(cfg, rngs=rngs)

    def __call__(self, h, cos, sin, mask, *, rng=None):
        r_attn, r_mlp = rng_lib.split(rng, 2)
        h = h + self.attention(self.attention_norm(h), cos, sin, mask, rng=r_attn)
        return h + self.feed_forward(self.ffn_norm(h), rng=r_mlp)


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
        self.output = _param(rngs, nnx.initializers.zeros, (cfg.dim, cfg.vocab_size), ("embed", "vocab"))

    # ----- pieces of the forward pass -----

    def embed(self, kind: np.ndarray, index: np.ndarray, tokens, labels):
        """Input embeddings (B, Q, dim) for sequence positions described by static arrays `kind`/`index` (Q,).

        tokens (B, Q) are the token ids at TOKEN positions (ignored elsewhere); labels (B,) the class ids.
        """
        kind = np.asarray(kind)
        dt = jnp.dtype(self.config.dtype)
        tok = jnp.take(self.tok_embeddings[...], tokens, axis=0)
        cls = jnp.take(self.cls_embedding[...], labels, axis=0)[:, None, :]
        h = jnp.where((kind == ordering.TOKEN)[None, :, None], tok, cls)
        if self.config.num_transition and (kind == ordering.TRANSITION).any():
            tr = jnp.take(self.transition[...], np.where(kind == ordering.TRANSITION, index, 0), axis=0)
            h = jnp.where((kind == ordering.TRANSITION)[None, :, None], tr[None], h)
        return h.astype(dt)

    def rope(self) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin), each (L, head_dim/2), for every position of the sequence layout."""
        return rope_table(self.config)

    def transform(self, h, cos, sin, mask, *, rng=None, batch_sharding: Optional[jax.sharding.NamedSharding] = None):
        """Run every decoder layer over the whole sequence: h (B, L, dim) -> (B, L, dim).

        batch_sharding: the sharding of the (B, ...) batch; activations are kept split the same way along B.
        """
        cfg = self.config
        layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)

        def run_block(graphdef, layer_state, h, r):
            if batch_sharding is not None:
                # Keep activations split along the batch like the input. Without this, XLA follows the FSDP
                # parameter sharding and every device holds the whole batch's attention (PAR-XXL on 32 chips:
                # 2.2 TB of temporaries per device instead of ~90 GB).
                spec = P(batch_sharding.spec[0], *([None] * (h.ndim - 1)))
                h = jax.lax.with_sharding_constraint(h, jax.sharding.NamedSharding(batch_sharding.mesh, spec))
            return nnx.merge(graphdef, layer_state)(h, cos, sin, mask, rng=r)

        if cfg.remat != "none":
            run_block = jax.checkpoint(run_block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers,
                                       static_argnums=(0,))

        if not cfg.scan_layers:
            for i, block in enumerate(self.layers):
                graphdef, layer_state = nnx.split(block)
                h = run_block(graphdef, layer_state, h, None if layer_rngs is None else layer_rngs[i])
            return h

        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            layer_state, r = xs
            return run_block(graphdef, layer_state, h, r), None

        h, _ = jax.lax.scan(body, h, (state, layer_rngs))
        return h

    def head(self, h):
        """Final norm and vocabulary head: float32 logits (B, Q, vocab)."""
        dt = jnp.dtype(self.config.dtype)
        logits = self.norm(h).astype(dt) @ self.output[...].astype(dt)
        return logits.astype(jnp.float32)

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
        h = self.transform(h, jnp.asarray(cos), jnp.asarray(sin), jnp.asarray(_mask(cfg.order)), rng=r_layers,
                           batch_sharding=batch_sharding)
        logits_gen = self.head(h[:, : cfg.num_tokens])                 # position p predicts t_p
        logp = jax.nn.log_softmax(logits_gen, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens_gen[..., None], axis=-1)[..., 0]
        loss = jnp.mean(nll)
        if not return_logits:
            return loss, None
        return loss, jnp.take(logits_gen, layout.inverse, axis=1)


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
