"""Training attention: the whole sequence attends over itself under PAR's block-causal mask, by one of several kernels.

The model calls one function, `attention(q, k, v, mask, impl=...)`; `model.attention` (ModelConfig) picks `impl`:
- "xla": `attend`, einsums over materialised (B, heads, L, L) float32 scores. The reference, and the only one that
  has attention-probability dropout.
- "dot_product": `jax.nn.dot_product_attention`. On NVIDIA GPUs, for bfloat16/float16 and head dims that are a
  multiple of 8 up to 128, its cuDNN flash kernel; otherwise its XLA implementation (the same math as "xla"). cuDNN
  has no mask type for PAR's block-causal pattern (only none, causal, padding, sliding window), so JAX turns the
  boolean mask into a dense additive bias that the kernel reads for every tile: (L, L) values read, nothing skipped,
  and cuDNN computes the bias's gradient too (discarded here, the mask is a constant). With a bias cuDNN trains only
  on even sequence lengths, and PAR's L = N + n - 1 is odd for n > 1: the sequence is padded (below).
- "splash": Pallas splash attention on TPU, with PAR's mask as a custom NumPy mask. The kernel skips key blocks that
  are fully masked (about half: the mask is causal at block level) and applies the mask only inside partial blocks.
  Block sizes must divide the sequence length and be multiples of 128: the sequence is padded to a multiple of 128.
  On the CPU it runs in Pallas's interpreter (tests only: slow); on a GPU it is an error. Where a mesh is used it
  runs under `jax.shard_map`, split over the batch axes (and over "tensor" for heads, where that axis is used):
  XLA cannot partition a Pallas call itself.
- "auto": splash on TPU, dot_product on GPU, xla on the CPU (where XLA's einsums are what dot_product would run
  anyway); xla wherever `attn_dropout > 0`, with the reason logged.

Attention dropout cannot run inside the fused kernels (they never hold the probabilities): an explicit "dot_product"
or "splash" with `attn_dropout > 0` is a configuration error (`check`); "auto" falls back to "xla".

Padding (dot_product on cuDNN, splash): the padded positions hold zero q, k, v; real queries never see padded keys,
and each padded query sees only itself, so no row is fully masked (a fully masked row gives NaN in some kernels,
and NaN times a zero cotangent is still NaN in the backward pass). Their outputs are cut off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from par_jax.core.config_args import UsageError
from par_jax.utils import rng as rng_lib

IMPLEMENTATIONS = ("auto", "xla", "dot_product", "splash")
FUSED = ("dot_product", "splash")   # kernels that never hold the probabilities: no attention dropout
SPLASH_BLOCKS = (512, 256, 128)     # the largest that divides the padded length (not tuned on a TPU)
SPLASH_MULTIPLE = 128               # splash's key blocks are multiples of 128 lanes
CUDNN_MULTIPLE = 2                  # cuDNN trains with a bias on even sequence lengths only
TENSOR_AXIS = "tensor"              # the mesh axis that heads are split over (par_jax.core.sharding's rules)


def attend(q, k, v, mask, *, seq_last: bool = False, dropout: float = 0.0, rng=None):
    """softmax(q k^T / sqrt(head_dim), masked) v with float32 scores; probabilities in q's dtype.

    q (B, Q, heads, head_dim); k, v (B, S, heads, head_dim), or (B, heads, head_dim, S) with seq_last; mask (Q, S) bool.
    Returns (B, Q, heads, head_dim).
    """
    kv = "bhks" if seq_last else "bshk"
    scores = jnp.einsum(f"bqhk,{kv}->bhqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(q.shape[-1]))
    scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = rng_lib.dropout(jax.nn.softmax(scores, axis=-1), dropout, rng).astype(q.dtype)
    return jnp.einsum(f"bhqs,{kv}->bqhk", probs, v.astype(q.dtype))


def _platform() -> str:
    return jax.default_backend()  # one seam: tests run the accelerator choices on the CPU


def check(impl: str, attn_dropout: float) -> None:
    """A clear error for a `model.attention` value that cannot work whatever the machine."""
    if impl not in IMPLEMENTATIONS:
        raise UsageError(f"model.attention={impl!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}.")
    if impl in FUSED and attn_dropout > 0:
        raise UsageError(f"model.attention={impl!r} runs a fused kernel without attention dropout, but "
                         f"model.attn_dropout={attn_dropout}; set model.attn_dropout=0 or model.attention=xla "
                         f"(or auto, which runs xla when attn_dropout > 0).")


def resolve(impl: str, attn_dropout: float = 0.0, platform: str | None = None) -> tuple[str, str]:
    """(the implementation that `impl` runs as on `platform`, why)."""
    check(impl, attn_dropout)
    if impl != "auto":
        return impl, "chosen by model.attention"
    if attn_dropout > 0:
        return "xla", f"attn_dropout={attn_dropout}: fused kernels have no attention dropout"
    platform = platform or _platform()
    if platform == "tpu":
        return "splash", "TPU"
    if platform == "gpu":
        return "dot_product", "GPU"
    return "xla", f"{platform}: XLA's einsums are what dot_product would run here too"


def dot_product_implementation(dtype, head_dim: int, platform: str | None = None) -> tuple[str, str]:
    """(`jax.nn.dot_product_attention`'s implementation for these inputs, why): "cudnn" where it can run, else "xla"."""
    platform = platform or _platform()
    if platform != "gpu":
        return "xla", f"cuDNN runs on NVIDIA GPUs only (this is {platform})"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla", f"cuDNN's fused attention takes bfloat16 or float16, not {jnp.dtype(dtype)}"
    if head_dim % 8 or head_dim > 128:
        return "xla", f"cuDNN's fused attention takes head dims that are a multiple of 8 up to 128, not {head_dim}"
    return "cudnn", "GPU"


@functools.cache
def _log_choice(what: str, choice: str, why: str) -> None:
    logging.info("training attention %s: %s (%s)", what, choice, why)


def attention(q, k, v, mask, *, impl: str = "xla", dropout: float = 0.0, rng=None,
              batch_sharding: NamedSharding | None = None):
    """The training attention: q, k, v (B, L, heads, head_dim) of one sequence over itself; mask (L, L) bool.

    impl: one of IMPLEMENTATIONS (module docstring). The fused kernels need the mask as NumPy data (it decides
    their padding and, for splash, which blocks they skip). dropout and rng: attention-probability dropout ("xla"
    only). batch_sharding: how the batch is split over a mesh (splash runs under shard_map there).
    Returns (B, L, heads, head_dim) in q's dtype.
    """
    impl, why = resolve(impl, dropout)
    _log_choice("model.attention", impl, why)
    if impl == "xla":
        return attend(q, k, v, mask, dropout=dropout, rng=rng)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if impl == "dot_product":
        return _dot_product(q, k, v, mask)
    return _splash(q, k, v, mask, batch_sharding)


def _static(mask) -> np.ndarray:
    if isinstance(mask, jax.core.Tracer):
        raise ValueError("the fused attention kernels need the mask as NumPy data (it fixes their padding and "
                         "skipped blocks), not a traced array; pass the layout's attention_mask() itself.")
    return np.asarray(mask, bool)


def pad_mask(mask, length: int) -> np.ndarray:
    """`mask` (L, L) grown to (length, length): real queries see no padded key, a padded query sees only itself."""
    mask = _static(mask)
    size = mask.shape[0]
    out = np.zeros((length, length), bool)
    out[:size, :size] = mask
    out[np.arange(size, length), np.arange(size, length)] = True
    return out


def padded(fn, q, k, v, mask, multiple: int):
    """fn(q, k, v, mask) over the sequence zero-padded to a multiple of `multiple` (with `pad_mask`), cut back to L."""
    length = q.shape[1]
    size = -(-length // multiple) * multiple
    pad = lambda x: jnp.pad(x, ((0, 0), (0, size - length), (0, 0), (0, 0)))
    return fn(pad(q), pad(k), pad(v), pad_mask(mask, size))[:, :length]


def _dot_product(q, k, v, mask):
    implementation, why = dot_product_implementation(q.dtype, q.shape[-1])
    _log_choice("dot_product implementation", implementation, why)
    run = lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None],
                                                             implementation=implementation)
    return padded(run, q, k, v, mask, CUDNN_MULTIPLE) if implementation == "cudnn" else run(q, k, v, mask)


def splash_block(length: int) -> int:
    """Splash's block size for a padded sequence length (a multiple of SPLASH_MULTIPLE)."""
    if length % SPLASH_MULTIPLE:
        raise ValueError(f"splash needs the sequence padded to a multiple of {SPLASH_MULTIPLE}, got {length}.")
    return next(b for b in SPLASH_BLOCKS if length % b == 0)


def splash_kernel(mask, num_heads: int, interpret: bool = False):
    """The splash kernel for a padded (length, length) mask (`pad_mask`) over `num_heads` heads, every head the same;
    it takes (heads, length, head_dim) arrays."""
    mask = _static(mask)
    return _splash_kernel(mask.tobytes(), mask.shape[0], num_heads, interpret)


@functools.lru_cache(maxsize=16)
def _splash_kernel(mask_bytes: bytes, length: int, num_heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415 (TPU kernels, on use)
    head_mask = splash.NumpyMask(np.frombuffer(mask_bytes, bool).reshape(length, length))
    b = splash_block(length)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():  # the mask tables are constants, also when first built inside a trace
        return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, mask, batch_sharding):
    platform = _platform()
    if platform not in ("tpu", "cpu"):
        raise ValueError(f"model.attention='splash' is a TPU kernel and cannot run on {platform}; use "
                         f"model.attention=dot_product or auto.")
    interpret = platform == "cpu"
    if interpret:
        _log_choice("splash", "Pallas interpreter", "the CPU has no Mosaic compiler; slow, for tests")
    # Splash does not scale the scores: scale q (in float32, then back to the compute dtype).
    q = (q.astype(jnp.float32) * (1.0 / np.sqrt(q.shape[-1]))).astype(k.dtype)
    run = functools.partial(_splash_padded, batch_sharding=batch_sharding, interpret=interpret)
    return padded(run, q, k, v, mask, SPLASH_MULTIPLE)


def _splash_padded(q, k, v, mask, *, batch_sharding, interpret):
    """Splash over (B, padded L, heads, head_dim), per shard of the mesh where there is one."""
    heads = q.shape[2]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))   # the kernel's (heads, L, head_dim) per example

    def local(q, k, v):
        return jax.vmap(splash_kernel(mask, q.shape[1], interpret))(q, k, v)

    if batch_sharding is not None:
        mesh = batch_sharding.mesh
        split_heads = TENSOR_AXIS in mesh.shape and mesh.shape[TENSOR_AXIS] > 1 and heads % mesh.shape[TENSOR_AXIS] == 0
        spec = P(batch_sharding.spec[0], TENSOR_AXIS if split_heads else None, None, None)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return jnp.swapaxes(local(q, k, v), 1, 2)
