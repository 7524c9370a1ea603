"""The PAR sampler: one compiled program per (model, batch, settings) with a static KV cache and `lax.scan` over steps.

Decoding follows the training sequence layout (PAR_SPEC sections 3, 4 and 7). Step s feeds the sequence positions
`layout.step_bounds()[s]`; the outputs at those positions predict t_start .. t_{end-1}, which are written into a
token buffer in generation order and fed back at the positions that hold them. For PAR that is: the class token
(prefill), n - 1 one-token steps, then (N - n)/n steps of n tokens (the first feeds t_{n-1} and M_1 .. M_{n-1}).
n = 1 is plain LlamaGen sampling, and the ablation layouts (raster_multi, no sequential prefix, causal intra-group)
need nothing special: steps of equal width form one `lax.scan`, and what sits at each position (class, token or
transition embedding), its RoPE angles and its row of the block-causal mask are sliced per step from tables computed
once.

Classifier-free guidance doubles the batch: rows are interleaved (label, null class) pairs, so a batch sharded over
devices keeps each pair on one device; `logits = u + scale * (c - u)` on raw logits, then temperature, top-k and
top-p for every token independently. The sampled tokens feed both rows of a pair.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax import ordering
from par_jax.model.transformer import ParTransformer, check_range

GUIDANCE_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How tokens are drawn (PAR_SPEC section 7). Paper settings: temperature 1, no top-k/top-p, guidance ~1.5.

    guidance            classifier-free guidance scale; 1.0 turns guidance off (no batch doubling).
    guidance_schedule   "constant", or "linear": the scale ramps from 1 at the first step to `guidance` at the last.
    guidance_stop_step  guidance is switched off (scale 1) from this step on; -1 never (the release's cfg_interval).
    temperature         logits are divided by it; 0 picks the most likely token (greedy).
    top_k               sample among the k most likely tokens; 0 = all.
    top_p               nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p.
    """
    guidance: float = 1.0
    guidance_schedule: str = "constant"
    guidance_stop_step: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite scale >= 0 (1.0 = off, ~1.5 in the paper), got "
                             f"{self.guidance}.")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"unknown guidance_schedule {self.guidance_schedule!r}; choose one of "
                             f"{GUIDANCE_SCHEDULES}.")
        if int(self.guidance_stop_step) != self.guidance_stop_step or self.guidance_stop_step < -1:
            raise ValueError(f"guidance_stop_step must be a step index >= 0, or -1 for never, got "
                             f"{self.guidance_stop_step}.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy, 1 = the model's distribution), got "
                             f"{self.temperature}.")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filtering), got {self.top_k}.")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus filtering), got {self.top_p}.")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    @classmethod
    def from_config(cls, config) -> "SampleSettings":
        """From a `config.sample` block (extra keys such as num_images are ignored)."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


class _Plan(NamedTuple):
    """Everything static about one compiled sampler (hashable: a jit static argument)."""
    batch: int            # images per call
    guided: bool          # batch doubling for classifier-free guidance
    schedule: str
    greedy: bool          # temperature == 0
    top_k: int
    use_top_p: bool
    teacher_forced: bool  # feed given tokens and return logits (the parity check) instead of sampling


# ----- one decoding step -----

def _embed(model: ParTransformer, kind, index, tokens, labels):
    """Input embeddings (rows, Q, dim) for positions whose kinds/indices (Q,) are traced (they change per step)."""
    cfg = model.config
    h = jnp.take(model.tok_embeddings[...], tokens, axis=0)
    cls = jnp.take(model.cls_embedding[...], labels, axis=0)[:, None, :]
    h = jnp.where((kind == ordering.TOKEN)[None, :, None], h, cls)
    if cfg.num_transition:
        tr = jnp.take(model.transition[...], jnp.clip(index, 0, cfg.num_transition - 1), axis=0)
        h = jnp.where((kind == ordering.TRANSITION)[None, :, None], tr[None], h)
    return h.astype(jnp.dtype(cfg.dtype))


def _guidance_scale(step, num_steps: int, guidance, stop_step, schedule: str):
    if schedule == "linear":
        scale = 1.0 + (guidance - 1.0) * step / max(num_steps - 1, 1)
    else:
        scale = guidance
    return jnp.where((stop_step >= 0) & (step >= stop_step), 1.0, scale)


def _choose(logits, key, temperature, top_p, plan: _Plan):
    """Tokens (B, Q) from float32 logits (B, Q, V), each token drawn independently."""
    if plan.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if not (plan.top_k or plan.use_top_p):
        return jax.random.categorical(key, logits).astype(jnp.int32)
    # Candidates sorted by probability (top-k, or the whole vocabulary for top-p alone), then the nucleus cut.
    values, indices = jax.lax.top_k(logits, plan.top_k or logits.shape[-1])
    if plan.use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)  # the most likely token is always kept
    choice = jax.random.categorical(key, values)
    return jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def _decode(model: ParTransformer, labels, key, guidance, stop_step, temperature, top_p, cache, forced,
            plan: _Plan):
    """Generate (or, teacher-forced, score) one batch. Returns (tokens (B, N) generation order, logits or None, cache).

    forced: (B, N) tokens in generation order fed instead of samples when plan.teacher_forced (else ignored).
    """
    cfg = model.config
    layout = cfg.layout
    n_tok = cfg.num_tokens
    bounds = layout.step_bounds()
    num_steps = len(bounds)
    batch = plan.batch
    # Tables computed once; every step slices its rows.
    kinds = jnp.asarray(layout.input_kind)
    indices = jnp.asarray(layout.input_index)
    cos, sin = (jnp.asarray(t) for t in model.rope())
    mask = jnp.asarray(layout.attention_mask()[:, : cache_length(cache)])
    if plan.guided:
        rows_labels = jnp.stack([labels, jnp.full_like(labels, cfg.null_class)], axis=1).reshape(2 * batch)
    else:
        rows_labels = labels

    def step(carry, xs, width: int):
        cache, gen = carry
        start, s = xs
        kind = jax.lax.dynamic_slice_in_dim(kinds, start, width)
        index = jax.lax.dynamic_slice_in_dim(indices, start, width)
        fed = jnp.take(gen, jnp.clip(index, 0, n_tok - 1), axis=1)  # token ids at TOKEN positions
        if plan.guided:
            fed = jnp.repeat(fed, 2, axis=0)
        h = _embed(model, kind, index, fed, rows_labels)
        h, cache = model.transform(h, jax.lax.dynamic_slice_in_dim(cos, start, width),
                                   jax.lax.dynamic_slice_in_dim(sin, start, width),
                                   jax.lax.dynamic_slice_in_dim(mask, start, width), cache=cache, index=start)
        logits = model.head(h)                                  # (rows, width, V) float32
        if plan.guided:
            pair = logits.reshape(batch, 2, width, -1)
            scale = _guidance_scale(s, num_steps, guidance, stop_step, plan.schedule)
            logits = pair[:, 1] + scale * (pair[:, 0] - pair[:, 1])
        if plan.teacher_forced:
            new = jax.lax.dynamic_slice_in_dim(forced, start, width, axis=1)
        else:
            new = _choose(logits, jax.random.fold_in(key, s), temperature, top_p, plan)
        # Position p predicts t_p: this step's outputs are t_start .. t_{start+width-1}.
        gen = jax.lax.dynamic_update_slice_in_dim(gen, new, start, axis=1)
        return (cache, gen), (logits if plan.teacher_forced else None)

    gen = jnp.zeros((batch, n_tok), jnp.int32)
    carry = (cache, gen)
    all_logits = []
    for width, starts, steps in _segments(bounds):
        xs = (jnp.asarray(starts, jnp.int32), jnp.asarray(steps, jnp.int32))
        carry, ys = jax.lax.scan(functools.partial(step, width=width), carry, xs)
        if plan.teacher_forced:
            all_logits.append(jnp.moveaxis(ys, 0, 1).reshape(batch, len(starts) * width, -1))
    cache, gen = carry
    logits = jnp.concatenate(all_logits, axis=1)[:, :n_tok] if plan.teacher_forced else None
    return gen, logits, cache


def _segments(bounds):
    """Runs of consecutive steps with the same width: [(width, starts, step indices)]."""
    out = []
    for s, (start, end) in enumerate(bounds):
        width = end - start
        if out and out[-1][0] == width:
            out[-1][1].append(start)
            out[-1][2].append(s)
        else:
            out.append((width, [start], [s]))
    return out


def step_widths(layout: ordering.SequenceLayout) -> list[tuple[int, int]]:
    """[(width, number of consecutive steps of that width)]: one `lax.scan` each (n=4 PAR: [(1, 4), (4, 143)])."""
    return [(width, len(starts)) for width, starts, _ in _segments(layout.step_bounds())]


def cache_length(cache) -> int:
    return (cache["k"] if isinstance(cache, dict) else cache[0]["k"]).shape[-3]


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("cache",))
def _decode_jit(graphdef, state, labels, key, guidance, stop_step, temperature, top_p, cache, forced, *, plan):
    model = nnx.merge(graphdef, state)
    gen, logits, cache = _decode(model, labels, key, guidance, stop_step, temperature, top_p, cache, forced, plan)
    tokens = jnp.take(gen, jnp.asarray(model.config.layout.inverse), axis=1)  # back to raster order
    if logits is not None:
        logits = jnp.take(logits, jnp.asarray(model.config.layout.inverse), axis=1)
    return tokens, logits, cache


# ----- public API -----

class Sampler:
    """A compiled sampler for one model, batch size and settings; reuse it to draw many batches.

    The KV cache is allocated once and donated to every call, which returns it (so repeated calls reuse its memory
    instead of allocating a new one). With several local devices the batch is sharded over them.
    """

    def __init__(self, model: ParTransformer, settings: SampleSettings = SampleSettings(), batch_size: int = 1,
                 *, teacher_forced: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.model = model
        self.config = model.config
        self.settings = settings
        self.plan = _Plan(batch=batch_size, guided=settings.guided, schedule=settings.guidance_schedule,
                          greedy=settings.temperature == 0, top_k=min(int(settings.top_k), self.config.vocab_size),
                          use_top_p=settings.top_p < 1.0, teacher_forced=teacher_forced)
        self.graphdef, self.state = nnx.split(model)
        self.rows = batch_size * (2 if settings.guided else 1)
        devices = jax.local_devices()
        self.mesh = None
        if len(devices) > 1:
            if batch_size % len(devices):
                raise ValueError(f"batch_size={batch_size} must be a multiple of the {len(devices)} local devices "
                                 f"(the batch is sharded over them).")
            self.mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                                      devices=devices)
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            self.state = jax.device_put(self.state, replicated)
        self._cache = None
        self._compiled = None

    def _batch_sharded(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data")))

    def _new_cache(self):
        cache = self.model.init_cache(self.rows)
        if self.mesh is not None:
            # (layers?, rows, S, heads, head_dim): rows sharded like the batch.
            spec = jax.sharding.PartitionSpec(*((None,) * (cache_ndim_before_rows(cache)) + ("data",)))
            cache = jax.device_put(cache, jax.sharding.NamedSharding(self.mesh, spec))
        return cache

    def _run(self, labels, key, forced):
        cfg = self.config
        labels = np.asarray(labels)
        if labels.shape != (self.plan.batch,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be {self.plan.batch} integer class ids (shape ({self.plan.batch},)), got "
                             f"{labels.dtype} array of shape {labels.shape}.")
        check_range("class label", labels, cfg.num_classes + 1,
                    hint=f"(0..{cfg.num_classes - 1}, or {cfg.null_class} for the unconditional null class)")
        if isinstance(key, int):
            key = jax.random.key(key)
        args = self._args(self._batch_sharded(labels.astype(np.int32)), key, forced)
        self._cache = None  # donated: the call consumes it and returns the buffer for the next call
        if self._compiled is not None:
            tokens, logits, self._cache = self._compiled(*args)
        else:
            tokens, logits, self._cache = _decode_jit(self.graphdef, *args, plan=self.plan)
        return tokens, logits

    def _args(self, labels, key, forced):
        s = self.settings
        cache = self._cache if self._cache is not None else self._new_cache()
        return (self.state, labels, key, jnp.float32(s.guidance), jnp.int32(s.guidance_stop_step),
                jnp.float32(max(s.temperature, 1e-6)), jnp.float32(s.top_p), cache, forced)

    def compile(self) -> float:
        """Compile ahead of time (later calls run the compiled program); returns the seconds it took."""
        start = time.perf_counter()
        labels = self._batch_sharded(np.zeros((self.plan.batch,), np.int32))
        forced_shape = (self.plan.batch, self.config.num_tokens if self.plan.teacher_forced else 1)
        args = self._args(labels, jax.random.key(0), self._batch_sharded(np.zeros(forced_shape, np.int32)))
        self._cache = args[-2]
        self._compiled = _decode_jit.lower(self.graphdef, *args, plan=self.plan).compile()
        return time.perf_counter() - start

    def __call__(self, labels, key) -> jax.Array:
        """Tokens int32 (B, N) in raster order for class ids `labels` (B,); `key` a PRNG key or an int seed."""
        if self.plan.teacher_forced:
            raise ValueError("this Sampler was built with teacher_forced=True; call .score(tokens, labels).")
        tokens, _ = self._run(labels, key, self._batch_sharded(np.zeros((self.plan.batch, 1), np.int32)))
        return tokens

    def score(self, tokens, labels) -> jax.Array:
        """Teacher-forced cached decoding: (guided) float32 logits (B, N, V) in raster order for given raster tokens.

        Equals the training forward's logits (guided: u + scale * (c - u) of two forwards) up to float rounding.
        """
        if not self.plan.teacher_forced:
            raise ValueError("score() needs a Sampler built with teacher_forced=True.")
        cfg = self.config
        tokens = np.asarray(tokens)
        if tokens.shape != (self.plan.batch, cfg.num_tokens):
            raise ValueError(f"tokens must be ({self.plan.batch}, {cfg.num_tokens}) raster-order ids, got "
                             f"{tokens.shape}.")
        check_range("token", tokens, cfg.vocab_size)
        forced = np.take(tokens.astype(np.int32), cfg.layout.perm, axis=1)
        _, logits = self._run(labels, jax.random.key(0), self._batch_sharded(forced))
        return logits


def cache_ndim_before_rows(cache) -> int:
    leaf = cache["k"] if isinstance(cache, dict) else cache[0]["k"]
    return leaf.ndim - 4


def sample(model: ParTransformer, labels, key, settings: SampleSettings = SampleSettings()) -> jax.Array:
    """Tokens int32 (B, N) in raster order: one compiled program per (model, batch, settings), cached by jax.jit."""
    labels = np.asarray(labels)
    return Sampler(model, settings, batch_size=int(labels.shape[0]) if labels.ndim else 0)(labels, key)


def tokens_to_images(tokens, tokenizer, grid_shape) -> jax.Array:
    """Raster-order tokens (B, N) -> images (B, H, W, 3) in [-1, 1] through a tokenizer's `decode(codes (B, h, w))`."""
    grid_shape = tuple(grid_shape)
    if len(grid_shape) != 2:
        raise ValueError(f"tokens_to_images decodes image grids (h, w); got grid_shape={grid_shape} (video grids need "
                         f"a video tokenizer).")
    tokens = jnp.asarray(tokens)
    return _decode_images(tokenizer, tokens.reshape(tokens.shape[0], *grid_shape))


@nnx.jit
def _decode_images(tokenizer, codes):
    return tokenizer.decode(codes)
