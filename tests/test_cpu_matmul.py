"""The CPU matmul kernel (par_jax/sampling/cpu_matmul.cc): same products as `dense`, chosen by the backend on CPU,
and a compiled sampler that uses it has no XLA dot left (whose runtimes XLA:CPU builds on a program's first call)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from par_jax.model import ParTransformer, model_config
from par_jax.model.transformer import ColumnBlocks, dense
from par_jax.sampling import backend, cpu_matmul
from par_jax.sampling.sampler import SampleSettings, Sampler

pytestmark = pytest.mark.skipif(not cpu_matmul.available(),
                                reason=f"kernel unavailable: {cpu_matmul.unavailable_reason()}")


def _param(w, fan_in_axes):
    return nnx.Param(jnp.asarray(w), fan_in_axes=fan_in_axes)


# Row counts around the 8-row register tile and the 64-row task; K around the 128-row panel chunk; N not a multiple
# of the 32-column panel; a 2-axis fan-in (wo: heads x head_dim) and a 3-axis fan-out (wqkv: q|k|v x heads x D).
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 70])
@pytest.mark.parametrize("w_shape,fan_in_axes", [((300, 100), 1), ((4, 16, 72), 2), ((64, 3, 4, 16), 1)])
def test_kernel_dense_equals_dense(rows, w_shape, fan_in_axes):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((rows, 2) + w_shape[:fan_in_axes]).astype(np.float32))
    want = dense(x, _param(w, fan_in_axes), jnp.float32)
    packed = _param(w, fan_in_axes).replace(
        ColumnBlocks.of(jnp.asarray(w), fan_in_axes, jnp.float32, 0, cpu_matmul.PANEL_MATMUL))
    got = jax.jit(lambda x, p: dense(x, p, jnp.float32))(x, packed)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * float(jnp.abs(want).max()))
    # Every column is checked against float64: the padding of the last panel never leaks into the result.
    ref = np.tensordot(np.asarray(x, np.float64), w.astype(np.float64), fan_in_axes)
    assert np.abs(np.asarray(got) - ref).max() <= 2e-5 * np.abs(ref).max()


# The kernel's two paths (cpu_matmul.cc): up to 128 rows one task per panel over every row; more rows in blocks of
# 128 by groups of 4 panels. Rows around the 8-row tile and the 128-row block, K around the 128-row chunk (and a
# 4 KB-multiple row stride), N leaving a partial last panel and a partial last group; float64 reference.
@pytest.mark.parametrize("rows", [1, 2, 9, 32, 128, 129, 300])
@pytest.mark.parametrize("k,n", [(100, 72), (300, 200), (1024, 40)])
def test_kernel_matches_float64_at_odd_shapes(rows, k, n):
    rng = np.random.default_rng(rows * k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_matmul.matmul, static_argnums=2)(jnp.asarray(x), cpu_matmul.pack(jnp.asarray(w)), n))
    assert got.shape == (rows, n)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    # Well above float32 rounding of k-term sums, far below one missing, doubled or misplaced product.
    tol = 4e-7 * np.sqrt(k) * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    assert np.all(np.abs(got - ref) <= tol + 1e-30), np.max(np.abs(got - ref) / tol)


def test_kernel_output_does_not_depend_on_earlier_calls():
    # y is written, never accumulated into, at the first K chunk: a reused output buffer cannot leak in.
    rng = np.random.default_rng(0)
    w = cpu_matmul.pack(jnp.asarray(rng.standard_normal((256, 96)).astype(np.float32)))
    f = jax.jit(cpu_matmul.matmul, static_argnums=2)
    x = jnp.asarray(rng.standard_normal((200, 256)).astype(np.float32))
    first = np.asarray(f(x, w, 96))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(x, w, 96)), first)


def test_pack_pads_the_last_panel_with_zeros():
    w = jnp.arange(3 * 40, dtype=jnp.float32).reshape(3, 40)
    panels = cpu_matmul.pack(w)
    assert panels.shape == (2, 3, 32)
    np.testing.assert_array_equal(panels[1, :, :8], w[:, 32:])
    assert not np.any(panels[1, :, 8:])


def test_backend_default_and_errors():
    chosen = backend.Backend.choose(jnp.float32, 1)
    assert chosen.matmul == "cpu_kernel" and chosen.matmul_why.startswith("default")
    assert backend.Backend.choose(jnp.bfloat16, 1).matmul == "xla"  # float32 only
    assert backend.Backend.choose(jnp.float32, 2).matmul == "xla"   # XLA cannot split a custom call
    with pytest.raises(ValueError, match="matmul must be one of"):
        backend.Backend.choose(jnp.float32, 1, matmul="blas")
    with pytest.raises(ValueError, match="use matmul='xla'"):
        backend.Backend.choose(jnp.bfloat16, 1, matmul="cpu_kernel")


def _tiny():
    cfg = model_config("tiny", n=4, grid_shape=(4, 4), vocab_size=64, num_classes=10, num_heads=4, dtype="float32")
    model = ParTransformer(cfg, rngs=nnx.Rngs(0))
    model.output[...] = jax.random.normal(jax.random.key(1), model.output.shape)
    return model


def test_sampler_with_the_kernel_scores_as_with_xla_dots():
    model = _tiny()
    tokens = np.random.default_rng(0).integers(0, 64, (2, 16))
    logits = {mm: np.asarray(Sampler(model, SampleSettings(guidance=1.5), batch_size=2, teacher_forced=True,
                                      matmul=mm).score(tokens, np.array([1, 2])))
              for mm in backend.MATMUL}
    assert np.abs(logits["xla"]).max() > 1.0
    np.testing.assert_allclose(logits["cpu_kernel"], logits["xla"], rtol=0, atol=1e-4)


def test_compiled_sampler_with_the_kernel_has_no_xla_dots():
    # XLA:CPU builds each dot's YNNPACK runtime on a program's first run (a compiled B sampler's first call took
    # 1.6-2.7x a later one); with every weight product in the kernel there is nothing left to build.
    model = _tiny()
    texts = {}
    for mm in backend.MATMUL:
        sampler = Sampler(model, SampleSettings(guidance=1.5), batch_size=1, matmul=mm)
        sampler.compile()
        compiled = sampler._compiled
        compiled = compiled.values() if isinstance(compiled, dict) else [compiled]
        texts[mm] = "\n".join(c.as_text() for c in compiled)
    dots = {mm: len(re.findall(r"\bdot\(|__ynn_fusion", t)) for mm, t in texts.items()}
    assert dots["xla"] > 0  # the check can see them
    assert dots["cpu_kernel"] == 0
    assert cpu_matmul.TARGET in texts["cpu_kernel"]
