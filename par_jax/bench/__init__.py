"""Benchmarks: `python -m par_jax.bench.<name>` prints a table and writes JSON (medians, machine, ratios to a floor)."""
