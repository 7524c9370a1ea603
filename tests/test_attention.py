"""Training attention kernels against the reference `attend`, for PAR's layouts and the ablation layouts.

"dot_product" runs jax.nn.dot_product_attention's XLA implementation here (cuDNN needs an NVIDIA GPU); "splash" runs
in Pallas's interpreter on the CPU, also under shard_map on 4 simulated CPU devices. Not exercised: the TPU (Mosaic)
compilation of splash, cuDNN, bfloat16.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from par_jax import ordering
from par_jax.core.config_args import UsageError
from par_jax.model import ParTransformer, model_config
from par_jax.model import attention as attention_lib

GRID = (8, 8)
LAYOUTS = {
    "n1": ordering.OrderSpec(GRID, 1),
    "n4": ordering.OrderSpec(GRID, 4),
    "n16": ordering.OrderSpec(GRID, 16),
    "raster_multi": ordering.OrderSpec(GRID, 4, kind="raster_multi"),
    "no_prefix": ordering.OrderSpec(GRID, 4, sequential_prefix=False),
    "causal_group": ordering.OrderSpec(GRID, 4, intra_group="causal"),
}
HEADS, HEAD_DIM = 2, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(length, seed=0, batch=2):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (batch, length, HEADS, HEAD_DIM), jnp.float32) for k in keys)


def with_grads(fn):
    """(fn, mask) -> ((projection, output), gradients of a fixed random projection of the output wrt q, k, v)."""
    def projected(q, k, v, mask):
        out = fn(q, k, v, mask)
        return jnp.sum(out * jax.random.normal(jax.random.key(9), out.shape, out.dtype)), out
    return jax.value_and_grad(projected, argnums=(0, 1, 2), has_aux=True)


# Compiled once per sequence length: the mask is an argument (traced) for these two.
REFERENCE = jax.jit(with_grads(attention_lib.attend))
DOT_PRODUCT = jax.jit(with_grads(functools.partial(attention_lib.attention, impl="dot_product")))


def splash(q, k, v, mask):
    # The kernel is built from the mask as NumPy data, so the mask is fixed at compile time.
    splash_fn = with_grads(lambda q, k, v, _: attention_lib.attention(q, k, v, mask, impl="splash"))
    return jax.jit(lambda q, k, v: splash_fn(q, k, v, None))(q, k, v)


def assert_matches_reference(kernel, spec, atol):
    mask = spec.layout.attention_mask()
    q, k, v = qkv(mask.shape[0])
    (_, want), want_grads = REFERENCE(q, k, v, mask)
    (_, got), got_grads = kernel(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dot_product_equals_reference(layout):
    assert_matches_reference(DOT_PRODUCT, LAYOUTS[layout], atol=1e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_splash_in_interpreter_equals_reference(layout):
    assert_matches_reference(splash, LAYOUTS[layout], atol=2e-5)


def test_splash_over_several_blocks_equals_reference():
    # 16x16, n=4: L = 259 padded to 384, three 128-blocks per side: empty, partial and full blocks.
    assert_matches_reference(splash, ordering.OrderSpec((16, 16), 4), atol=2e-5)


def test_splash_mask_is_pars_mask_block_for_block():
    mask = ordering.OrderSpec((16, 16), 4).layout.attention_mask()
    length = mask.shape[0]
    full = attention_lib.pad_mask(mask, 384)
    np.testing.assert_array_equal(full[:length, :length], mask)
    assert not full[:length, length:].any(), "a real query sees a padded key"
    np.testing.assert_array_equal(full[length:], np.eye(384, dtype=bool)[length:])
    block = attention_lib.splash_block(384)
    assert block == 128
    # The kernel's own tables: which blocks it skips (0), reads whole (2) or masks (1), and the masks it applies.
    info = attention_lib.splash_kernel(full, HEADS).fwd_mask_info
    blocks = full.reshape(3, block, 3, block).transpose(0, 2, 1, 3)
    kinds = np.where(blocks.all((2, 3)), 2, np.where(blocks.any((2, 3)), 1, 0))
    assert kinds[0, 2] == 0 and kinds[1, 0] == 2 and kinds[1, 1] == 1, "expected skipped, full and partial blocks"
    np.testing.assert_array_equal(np.asarray(info.block_mask)[0], kinds)
    partial = np.asarray(info.partial_mask_blocks)
    next_mask = np.asarray(info.mask_next)[0]
    for i, j in zip(*np.nonzero(kinds == 1)):
        np.testing.assert_array_equal(partial[next_mask[i, j]], blocks[i, j])


def test_padding_leaves_attention_and_gradients_unchanged():
    # What dot_product does for cuDNN (odd L = N + n - 1, on which cuDNN cannot train with a mask), run by `attend`.
    mask = LAYOUTS["n4"].layout.attention_mask()
    assert mask.shape[0] % 2 == 1
    q, k, v = qkv(mask.shape[0])
    pad_then_attend = lambda q, k, v, _: attention_lib.padded(attention_lib.attend, q, k, v, mask, 2)
    (_, want), want_grads = REFERENCE(q, k, v, mask)
    (_, got), got_grads = jax.jit(with_grads(pad_then_attend))(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def test_choice_per_platform_and_dropout():
    assert attention_lib.resolve("auto", 0.0, "tpu")[0] == "splash"
    assert attention_lib.resolve("auto", 0.0, "gpu")[0] == "dot_product"
    assert attention_lib.resolve("auto", 0.0, "cpu")[0] == "xla"
    impl, why = attention_lib.resolve("auto", 0.1, "tpu")
    assert impl == "xla" and "attn_dropout" in why
    assert attention_lib.resolve("splash", 0.0, "cpu")[0] == "splash"
    choose = attention_lib.dot_product_implementation
    assert choose(jnp.bfloat16, 64, "gpu")[0] == "cudnn"
    assert choose(jnp.float32, 64, "gpu")[0] == "xla"
    assert choose(jnp.bfloat16, 100, "gpu")[0] == "xla"   # 3B's head dim
    assert choose(jnp.bfloat16, 64, "tpu")[0] == "xla"


def test_bad_choices_are_clear_errors_at_model_build():
    with pytest.raises(UsageError, match="attn_dropout=0.1.*attn_dropout=0 or model.attention=xla"):
        model_config("tiny", attention="splash", attn_dropout=0.1)
    with pytest.raises(UsageError, match="unknown; choose one of auto, xla, dot_product, splash"):
        model_config("tiny", attention="flash")
    assert model_config("tiny", attention="auto", attn_dropout=0.1).attention == "auto"


def test_splash_refuses_a_gpu(monkeypatch):
    monkeypatch.setattr(attention_lib, "_platform", lambda: "gpu")
    mask = LAYOUTS["n1"].layout.attention_mask()
    with pytest.raises(ValueError, match="TPU kernel and cannot run on gpu"):
        attention_lib.attention(*qkv(mask.shape[0]), mask, impl="splash")


def test_fused_kernels_refuse_a_traced_mask():
    mask = LAYOUTS["n4"].layout.attention_mask()
    q, k, v = qkv(mask.shape[0])
    with pytest.raises(ValueError, match="NumPy data"):
        jax.jit(lambda m: attention_lib.attention(q, k, v, m, impl="splash"))(mask)


@pytest.fixture(scope="module")
def tiny_model():
    """A one-layer float32 model with random parameters, a batch, and its training forward under a function."""
    cfg = model_config("tiny", grid_shape=GRID, n=4, vocab_size=32, num_classes=10, dtype="float32",
                       attention="xla", num_layers=1)
    # Random values for every parameter (the zero-initialised head would hide everything), drawn without compiling.
    _, abstract = nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))
    draw = np.random.default_rng(3)
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * draw.standard_normal(x.shape) + (x.ndim == 1), x.dtype),
                          abstract)
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 32)
    labels = jnp.array([1, 10])
    rng = jax.random.key(7)  # dropout on (embeddings, residuals, MLP): the training forward

    def run(impl):
        """((loss, raster logits), parameter gradients) of the model built with model.attention=impl."""
        impl_graphdef, _ = nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg.replace(attention=impl),
                                                                             rngs=nnx.Rngs(0))))
        loss = lambda p: nnx.merge(impl_graphdef, p)(tokens, labels, rng=rng)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    return run, run("xla")


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_model_training_loss_logits_and_gradients_equal_xla(tiny_model, impl):
    run, ((loss_ref, logits_ref), grads_ref) = tiny_model
    (loss, logits), grads = run(impl)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    np.testing.assert_allclose(logits, logits_ref, atol=2e-5, rtol=0)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from par_jax import ordering
from par_jax.core import mesh as mesh_lib
from par_jax.model import attention as attention_lib
mesh = mesh_lib.create_mesh(dict(data=2, fsdp=1, tensor=2))
batch = NamedSharding(mesh, P("data", None, None, None))
mask = ordering.OrderSpec((8, 8), 4).layout.attention_mask()
q, k, v = (jax.device_put(jax.random.normal(jax.random.key(i), (2, mask.shape[0], 2, 32)), batch) for i in range(3))
w = jax.random.normal(jax.random.key(9), q.shape)
def run(fn):
    f = lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(f, argnums=(0, 1, 2))(q, k, v)))(q, k, v)
heads, build = [], attention_lib.splash_kernel
attention_lib.splash_kernel = lambda mask, h, interpret: heads.append(h) or build(mask, h, interpret)
splash = lambda q, k, v: attention_lib.attention(q, k, v, mask, impl="splash", batch_sharding=batch)
got, want = run(splash), run(lambda q, k, v: attention_lib.attend(q, k, v, mask))
for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=0)
assert set(heads) == {1}, heads  # one of the two heads per "tensor" shard
hlo = jax.jit(splash).lower(q, k, v).as_text()
assert "manual_computation" in hlo and "tensor<1x1x128x32xf32>" in hlo  # per shard: 1 example, 1 head
"""


def test_splash_under_shard_map_on_a_batch_and_tensor_mesh():
    # Four CPU devices: the batch split over "data", the heads over "tensor"; the kernel runs per shard.
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
