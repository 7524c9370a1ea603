"""Held-out likelihood under teacher forcing: the negative log-likelihood per token and the decoder's own
predictive entropy at every grid position.

The decoder's training forward pass (dropout off, labels kept) gives, at every raster position i, the predictive
distribution p(t_i | what the order lets it see); the NLL of the real token and the entropy of that distribution are
averaged over the images. It is cheap, deterministic and directly what an order changes: a token generated in
parallel with its neighbour cannot see it, and its predictive entropy shows it (the ablation grid compares the same
order decoded one token per step and n per step, docs/reproduction.md).
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def _per_position(graphdef, state, tokens, labels):
    model = nnx.merge(graphdef, state)
    _, logits = model(tokens, labels)                       # (B, N, vocab), raster order, deterministic
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return nll, entropy


def teacher_forced(model, batches: Iterable[Mapping[str, np.ndarray]]) -> dict:
    """NLL and predictive entropy (nats) of `model` over `batches` of {"tokens" (B, N) raster order, "label" (B,),
    optional "mask" (B,) bool for padding rows}. Returns {"nll": mean per token, "entropy": mean per token,
    "nll_map", "entropy_map": (N,) means per raster position, "images": count}."""
    graphdef, state = nnx.split(model)
    n_tok = model.config.num_tokens
    nll_sum, ent_sum, count = np.zeros(n_tok), np.zeros(n_tok), 0
    for batch in batches:
        tokens = np.asarray(batch["tokens"], np.int32)
        mask = np.asarray(batch.get("mask", np.ones(len(tokens), bool)), bool)
        nll, ent = _per_position(graphdef, state, jnp.asarray(tokens), jnp.asarray(batch["label"], jnp.int32))
        nll_sum += np.asarray(nll, np.float64)[mask].sum(0)
        ent_sum += np.asarray(ent, np.float64)[mask].sum(0)
        count += int(mask.sum())
    if not count:
        raise ValueError("no held-out images to score.")
    nll_map, ent_map = nll_sum / count, ent_sum / count
    return {"nll": float(nll_map.mean()), "entropy": float(ent_map.mean()), "nll_map": nll_map,
            "entropy_map": ent_map, "images": count}
