"""The PAR sampler: one compiled program per (model, batch, settings) with a static KV cache and `lax.scan` over steps.

Sampling follows the training sequence layout (PAR_SPEC sections 3, 4 and 7). Step s feeds the sequence positions
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

Every step is the model's own cached call (`ParTransformer.step`), run with the options of a `backend.Backend`
(weight layout, attention, KV-cache layout) chosen for this machine. The KV cache is born inside the compiled program
and updated in place there (`dynamic_update_slice` in the scan carry), so nothing but labels, a key and scalars goes
in and the tokens come out: no cache buffer crosses the program boundary (there is nothing to donate), no host round
trip, no Python per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from par_jax import ordering
from par_jax.core import sharding
from par_jax.model.transformer import ParTransformer, check_range
from par_jax.sampling import placement
from par_jax.sampling.backend import Backend

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
    cache_chunks: int     # scans per step width, each attending over a cache just long enough for its steps
    backend: Backend      # weight layout, attention and KV-cache layout
    cache_sharding: Optional[jax.sharding.NamedSharding] = None  # each layer's k and v on a mesh (placement.py)


class _Chunk(NamedTuple):
    width: int              # sequence positions fed per step
    starts: tuple           # first position fed by each step
    steps: tuple            # step indices
    cache_len: int          # KV cache length while these steps run (>= every end position)


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
    """[(width, number of consecutive steps of that width)]: one run each (n=4 PAR: [(1, 4), (4, 143)])."""
    return [(width, len(starts)) for width, starts, _ in _segments(layout.step_bounds())]


def plan_chunks(layout: ordering.SequenceLayout, cache_chunks: int, quantum: int = 32) -> list[_Chunk]:
    """Split each run of equal-width steps into scans with a growing KV-cache length.

    Attention reads the whole cache it is given (static shapes), so a cache only as long as the chunk's last step
    needs halves the attention bytes on average. A run spanning a fraction f of the sequence gets about
    f * cache_chunks chunks (at least one): PAR's short sequential prefix attends over a tiny cache.
    """
    seq_len = layout.seq_len
    chunks = []
    for width, starts, steps in _segments(layout.step_bounds()):
        span = starts[-1] + width - starts[0]
        parts = int(np.clip(round(cache_chunks * span / seq_len), 1, len(starts)))
        for idx in np.array_split(np.arange(len(starts)), parts):
            end = starts[idx[-1]] + width
            cache_len = min(seq_len, -(-end // quantum) * quantum)
            chunks.append(_Chunk(width, tuple(starts[i] for i in idx), tuple(steps[i] for i in idx), cache_len))
    return chunks


# ----- one sampling step -----

def _guidance_scale(step, num_steps: int, guidance, stop_step, schedule: str):
    if schedule == "linear":
        scale = 1.0 + (guidance - 1.0) * step / max(num_steps - 1, 1)
    else:
        scale = guidance
    return jnp.where((stop_step >= 0) & (step >= stop_step), 1.0, scale)


def draw(key, logits):
    """One index per row of float32 logits (..., V), drawn with probability softmax(logits): inverse CDF.

    One uniform number per token instead of `jax.random.categorical`'s V Gumbel numbers: the same distribution, and
    on CPU 3x cheaper for 16 tokens of a 16k vocabulary (random bits dominate otherwise). Entries at -inf are never
    drawn: the first index whose cumulative mass reaches u always carries mass.
    key: one key, or one per image (B,) for logits (B, ..., V): image i's draws then depend on its own key only.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    if key.ndim:
        u = jax.vmap(lambda k: jax.random.uniform(k, logits.shape[1:-1] + (1,), jnp.float32))(key)
    else:
        u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32)
    u = u * cdf[..., -1:]
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def _choose(logits, key, temperature, top_p, plan: _Plan):
    """Tokens (B, Q) from float32 logits (B, Q, V), each token drawn independently."""
    if plan.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if not (plan.top_k or plan.use_top_p):
        return draw(key, logits)
    # Candidates sorted by probability (top-k, or the whole vocabulary for top-p alone), then the nucleus cut.
    values, indices = jax.lax.top_k(logits, plan.top_k or logits.shape[-1])
    if plan.use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)  # the most likely token is always kept
    choice = draw(key, values)
    return jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


def _step(model: ParTransformer, plan: _Plan, consts, carry, xs, *, width: int):
    """One sampling step, the body of every scan: feed `width` positions from `start`, draw (or, teacher-forced,
    take) the tokens they predict. consts: (rows_labels, key, guidance, stop_step, temperature, top_p, forced);
    carry: (per-layer caches, tokens (B, N) in generation order); xs: (start, step index)."""
    rows_labels, key, guidance, stop_step, temperature, top_p, forced = consts
    cache, gen = carry
    start, s = xs
    logits, cache = model.step(jnp.repeat(gen, 2, axis=0) if plan.guided else gen, rows_labels, cache, start,
                               width)                               # (rows, width, V) float32
    if plan.guided:
        pair = logits.reshape(plan.batch, 2, width, -1)
        scale = _guidance_scale(s, model.config.layout.num_steps, guidance, stop_step, plan.schedule)
        logits = pair[:, 1] + scale * (pair[:, 0] - pair[:, 1])
    if plan.teacher_forced:
        new = jax.lax.dynamic_slice_in_dim(forced, start, width, axis=1)
    else:
        step_key = jax.vmap(jax.random.fold_in, (0, None))(key, s) if key.ndim else jax.random.fold_in(key, s)
        new = _choose(logits, step_key, temperature, top_p, plan)
    # Position p predicts t_p: this step's outputs are t_start .. t_{start+width-1}.
    gen = jax.lax.dynamic_update_slice_in_dim(gen, new, start, axis=1)
    return (cache, gen), (logits if plan.teacher_forced else None)


def _generate(model: ParTransformer, labels, key, guidance, stop_step, temperature, top_p, forced, plan: _Plan):
    """Generate (or, teacher-forced, score) one batch. Returns (tokens (B, N) in generation order, logits or None).

    model: as Backend.prepare made it. forced: (B, N) tokens in generation order fed instead of samples when
    plan.teacher_forced (else ignored).
    """
    cfg = model.config
    batch = plan.batch
    if plan.guided:  # (label, null) pairs next to each other, so a batch sharded over devices keeps pairs together
        rows_labels = jnp.stack([labels, jnp.full_like(labels, cfg.null_class)], axis=1).reshape(2 * batch)
    else:
        rows_labels = labels
    consts = (rows_labels, key, guidance, stop_step, temperature, top_p, forced)

    chunks = plan_chunks(cfg.layout, plan.cache_chunks)
    rows = batch * (2 if plan.guided else 1)
    cache = _placed(plan, plan.backend.init_cache(model, rows, chunks[0].cache_len))
    gen = jnp.zeros((batch, cfg.num_tokens), jnp.int32)
    all_logits = []
    for chunk in chunks:
        cache = _placed(plan, [c.grow(chunk.cache_len) for c in cache])
        xs = (jnp.asarray(chunk.starts, jnp.int32), jnp.asarray(chunk.steps, jnp.int32))
        body = functools.partial(_step, model, plan, consts, width=chunk.width)
        (cache, gen), ys = jax.lax.scan(body, (cache, gen), xs)
        if plan.teacher_forced:
            all_logits.append(jnp.moveaxis(ys, 0, 1).reshape(batch, len(chunk.starts) * chunk.width, -1))
    logits = jnp.concatenate(all_logits, axis=1)[:, :cfg.num_tokens] if plan.teacher_forced else None
    return gen, logits


def _placed(plan: _Plan, cache: list):
    """The per-layer caches split over the mesh as plan.cache_sharding says (XLA keeps that through the scans)."""
    if plan.cache_sharding is None:
        return cache
    put = lambda x: jax.lax.with_sharding_constraint(x, plan.cache_sharding)
    return [dataclasses.replace(c, k=put(c.k), v=put(c.v)) for c in cache]


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _generate_jit(state, labels, key, guidance, stop_step, temperature, top_p, forced, *, graphdef, plan):
    model = nnx.merge(graphdef, state)
    gen, logits = _generate(model, labels, key, guidance, stop_step, temperature, top_p, forced, plan)
    inverse = jnp.asarray(model.config.layout.inverse)  # back to raster order
    return jnp.take(gen, inverse, axis=1), (None if logits is None else jnp.take(logits, inverse, axis=1))


# ----- public API -----

class Sampler:
    """A compiled sampler for one model, batch size and settings; reuse it to draw many batches.

    `mesh` (a (data, fsdp, tensor) mesh of this process's devices: placement.local_mesh(config.mesh)) and `rules`
    (the trainer's logical rules, config.mesh.rules; default sharding.DEFAULT_RULES) split the weights as in
    training (heads, MLP units and vocabulary over `tensor`, the model dimension over `fsdp`), the batch over the
    batch axes and the KV cache over batch and heads. Without a mesh and with several local devices the batch is
    split over them and the weights are replicated. `cache_chunks` trades compile time for attention bytes (see
    `plan_chunks`). `attention` picks how steps attend over the cache (backend.ATTENTION; default: the CPU kernel
    for float32 on one CPU device where it builds, else XLA's ops) and `block_cols` the weights' column blocks
    (default: 256 on CPU, whole on accelerators and where the mesh splits weights), or `matmul` the CPU kernel for the
    weight matmuls (backend.MATMUL; same default as attention); `describe()` says what was chosen and why.
    """

    def __init__(self, model: ParTransformer, settings: SampleSettings = SampleSettings(), batch_size: int = 1,
                 *, mesh: Optional[jax.sharding.Mesh] = None, rules=None, teacher_forced: bool = False,
                 cache_chunks: int = 4, block_cols: Optional[int] = None, attention: Optional[str] = None,
                 matmul: Optional[str] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be >= 1, got {cache_chunks}.")
        self.model = model
        self.config = model.config
        self.settings = settings
        if mesh is None and jax.local_device_count() > 1:
            mesh = placement.local_mesh()  # the batch over every local device, weights replicated
        self.mesh, self.rules = mesh, sharding.rules_from_config(rules)
        cache_sharding = None
        if mesh is not None:
            placement.check_mesh(mesh)
            shards = placement.batch_shards(mesh, self.rules)
            if batch_size % shards:
                raise ValueError(f"batch_size={batch_size} must be a multiple of {shards}, the batch shards of the "
                                 f"mesh {dict(mesh.shape)} (rules.batch={','.join(self.rules['batch'])}).")
            if placement.shards_weights(nnx.state(model, nnx.Param), mesh, self.rules):
                if block_cols:
                    raise ValueError(f"block_cols={block_cols} cuts matrices into column blocks, which cannot keep "
                                     f"the split of weights over the mesh {dict(mesh.shape)}; use block_cols=0.")
                block_cols = 0
        self.backend = Backend.choose(self.config.dtype, 1 if mesh is None else mesh.size, attention, block_cols,
                                      matmul)
        if mesh is not None:
            rows = batch_size * (2 if settings.guided else 1)
            shape = (rows, self.config.num_heads, self.config.head_dim, 1) if self.backend.seq_last else \
                (rows, 1, self.config.num_heads, self.config.head_dim)
            cache_sharding = placement.cache_sharding(mesh, self.rules, shape, self.backend.seq_last)
        self.plan = _Plan(batch=batch_size, guided=settings.guided, schedule=settings.guidance_schedule,
                          greedy=settings.temperature == 0, top_k=min(int(settings.top_k), self.config.vocab_size),
                          use_top_p=settings.top_p < 1.0, teacher_forced=teacher_forced, cache_chunks=cache_chunks,
                          backend=self.backend, cache_sharding=cache_sharding)
        self._graphdef, self.weights = self.backend.prepare(model, mesh, self.rules)
        self._compiled = {}  # ahead-of-time programs by key kind (one per batch, one per image)

    def describe(self) -> dict:
        """The choices this sampler runs with (attention and why, weight blocks, KV-cache layout), e.g. for a log."""
        return {"batch": self.plan.batch, "cache_chunks": self.plan.cache_chunks, **self.backend.describe()}

    def _batch_sharded(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, np.ndim(x)))

    def _args(self, labels, key, forced):
        s = self.settings
        return (self.weights, labels, key, jnp.float32(s.guidance), jnp.int32(s.guidance_stop_step),
                jnp.float32(max(s.temperature, 1e-6)), jnp.float32(s.top_p), forced)

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
        if key.shape not in ((), (self.plan.batch,)):
            raise ValueError(f"key must be one PRNG key or one per image ({self.plan.batch},), got shape "
                             f"{key.shape}.")
        per_image = bool(key.ndim)
        args = self._args(self._batch_sharded(labels.astype(np.int32)),
                          self._batch_sharded(key) if per_image else key, forced)
        if per_image in self._compiled:
            return self._compiled[per_image](*args)
        return _generate_jit(*args, graphdef=self._graphdef, plan=self.plan)

    def compile(self, per_image_keys: bool = False) -> float:
        """Compile ahead of time (later calls with one key per batch, or per image, run the compiled program);
        returns the seconds it took."""
        start = time.perf_counter()
        labels = self._batch_sharded(np.zeros((self.plan.batch,), np.int32))
        key = image_keys(jax.random.key(0), np.arange(self.plan.batch)) if per_image_keys else jax.random.key(0)
        args = self._args(labels, self._batch_sharded(key) if per_image_keys else key,
                          self._batch_sharded(np.zeros(self._forced_shape, np.int32)))
        self._compiled[per_image_keys] = _generate_jit.lower(*args, graphdef=self._graphdef, plan=self.plan).compile()
        return time.perf_counter() - start

    @property
    def _forced_shape(self):
        return (self.plan.batch, self.config.num_tokens if self.plan.teacher_forced else 1)

    def __call__(self, labels, key) -> jax.Array:
        """Tokens int32 (B, N) in raster order for class ids `labels` (B,); `key` a PRNG key or an int seed, or one
        key per image (B,) (`image_keys`: then an image's tokens do not depend on the batch it was drawn in)."""
        if self.plan.teacher_forced:
            raise ValueError("this Sampler was built with teacher_forced=True; call .score(tokens, labels).")
        tokens, _ = self._run(labels, key, self._batch_sharded(np.zeros(self._forced_shape, np.int32)))
        return tokens

    def score(self, tokens, labels) -> jax.Array:
        """Teacher-forced cached steps: (guided) float32 logits (B, N, V) in raster order for given raster tokens.

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


def image_keys(key, indices) -> jax.Array:
    """One PRNG key per image: fold_in(key, i) for each global sample index i in `indices` (B,)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(indices, jnp.uint32))


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
