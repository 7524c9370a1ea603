"""par_jax: Parallelized Autoregressive Visual Generation (PAR) in JAX and Flax NNX."""
