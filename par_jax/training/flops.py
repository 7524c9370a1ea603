"""Model FLOPs per training example and the peak they are measured against (for MFU).

MFU = (model FLOPs per step x steps/s) / (peak FLOP/s per device x devices), with model FLOPs counted the PaLM way:
matmuls only, 3x the forward pass (forward + two backward matmuls), and the full L x L attention products (the
block-causal mask does not reduce the work of a dense attention kernel). Rematerialisation is not counted: it is
overhead, not model work.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from par_jax.model import ModelConfig

# Dense bfloat16 matmul peak per chip (vendor figures), matched by substring of `device.device_kind`.
PEAK_BF16_FLOPS = (
    ("v6", 918e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12), ("v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def forward_flops_per_example(cfg: ModelConfig) -> float:
    """Matmul FLOPs of one teacher-forced forward pass over the whole sequence (L = N + n - 1 positions)."""
    length, num_tokens, dim = cfg.layout.seq_len, cfg.num_tokens, cfg.dim
    per_layer_params = dim * 3 * dim + dim * dim + 3 * dim * cfg.mlp_hidden   # wqkv, wo, w1/w3/w2
    layers = cfg.num_layers * (2 * length * per_layer_params + 2 * 2 * length * length * dim)  # + q.k and p.v
    head = 2 * num_tokens * dim * cfg.vocab_size                               # logits at the N target positions
    return float(layers + head)


def train_flops_per_example(cfg: ModelConfig) -> float:
    return 3.0 * forward_flops_per_example(cfg)


def table_peak_flops(device: jax.Device, dtype: str) -> float | None:
    """Vendor bfloat16 peak for known accelerators; None where unknown (CPU) or when not computing in bfloat16."""
    if dtype != "bfloat16":
        return None
    kind = getattr(device, "device_kind", "")
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in kind.lower():
            return peak
    return None


class MatmulProbe:
    """A compiled chain of 8 dependent (size x size) matmuls on one device; `run()` times one call -> FLOP/s.

    The chain keeps dispatch overhead out of the figure. Benchmarks interleave probes with the steps they time, so
    that on a shared machine both see the same load.
    """

    def __init__(self, dtype: str = "float32", size: int = 1024, device: jax.Device | None = None):
        self.device = device or jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 in a multi-process job
        self.flops = 8 * 2 * size**3
        with self._on_device():
            a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((size, size)) / np.sqrt(size),
                                           jnp.dtype(dtype)), self.device)

            @jax.jit
            def chain(x):
                for _ in range(8):
                    x = x @ a
                return x

            self.a, self.chain = a, chain
            chain(a).block_until_ready()

    def _on_device(self):
        # The train loop measures under its mesh; a mesh of this one device keeps the measurement on it.
        return jax.set_mesh(jax.make_mesh((1,), ("device",), axis_types=(jax.sharding.AxisType.Auto,),
                                          devices=[self.device]))

    def run(self) -> float:
        with self._on_device():
            start = time.perf_counter()
            self.chain(self.a).block_until_ready()
            return self.flops / (time.perf_counter() - start)


def measure_matmul_peak(dtype: str = "float32", size: int = 1024, repeats: int = 5,
                        device: jax.Device | None = None) -> float:
    """Best-of-`repeats` FLOP/s of a (size x size) @ (size x size) matmul chain on one device."""
    probe = MatmulProbe(dtype, size, device)
    return max(probe.run() for _ in range(repeats))


def peak_flops_per_device(dtype: str, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the configured value, the vendor table, or a measurement."""
    if configured > 0:
        return configured, "config"
    device = jax.local_devices()[0]
    peak = table_peak_flops(device, dtype)
    if peak is not None:
        return peak, f"table ({device.device_kind})"
    return measure_matmul_peak(dtype, device=device), f"measured matmul ({device.device_kind}, {dtype})"
