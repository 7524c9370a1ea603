"""Explicit-key randomness shared by the decoder and the tokenizer.

Keys are passed in (None = deterministic), so a model stays a pure function of (params, inputs, key) under jit.
"""

import jax
import jax.numpy as jnp


def dropout(x, rate: float, rng):
    """Inverted dropout with key `rng`; identity when `rng` is None or `rate` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split(rng, num: int) -> list:
    """`num` keys from `rng`, or `num` Nones when `rng` is None (deterministic)."""
    return [None] * num if rng is None else list(jax.random.split(rng, num))
