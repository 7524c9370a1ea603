"""Sampling: the compiled PAR sampler (static KV cache, lax.scan over steps, classifier-free guidance)."""
from par_jax.sampling.sampler import SampleSettings, Sampler, image_keys, sample, tokens_to_images

__all__ = ["SampleSettings", "Sampler", "image_keys", "sample", "tokens_to_images"]
