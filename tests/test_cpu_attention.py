"""The CPU attention kernel (par_jax/sampling/cpu_attention.cc) against a float64 reference, and its fallbacks.

The kernel is compiled on first use (g++; .ci/run installs it). Tolerance: 2e-5 absolute on outputs of magnitude ~1
(float32 sums over up to 77 positions and 12 dims, and a polynomial exp of ~2e-7 relative error; observed ~5e-7).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from par_jax.model import transformer
from par_jax.sampling import backend, cpu_attention

ATOL = 2e-5


def reference(q, k, v, mask):
    """softmax(q k / sqrt(D), masked) v in float64; q (R, Q, H, D), k/v (R, H, D, S), mask (Q, S)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("rqhd,rhds->rhqs", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[None, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("rhqs,rhds->rqhd", p, v)


def random_case(rng, rows, queries, heads, dim, length, visible):
    q = rng.standard_normal((rows, queries, heads, dim)).astype(np.float32) * 2
    k = rng.standard_normal((rows, heads, dim, length)).astype(np.float32)
    v = rng.standard_normal((rows, heads, dim, length)).astype(np.float32)
    mask = np.zeros((queries, length), bool)
    for i in range(queries):  # each query sees a prefix of `visible` positions plus a few of its own block
        mask[i, :visible] = True
        mask[i, visible:visible + 1 + i % 3] = True
    mask[:, 0] = True
    return q, k, v, mask


def test_kernel_builds_here():
    assert cpu_attention.available(), cpu_attention.unavailable_reason()


# Both paths: streamed (1-4 queries: 8-row key blocks, 4 x 4 value blocks) and lanes (5+ queries, 16 per vector: 24, 8
# and 1-position score blocks, 16, 4 and 1-row value blocks, 8-position rounds). Query counts around 4 and the
# 16-lane chunks; head dims that are and are not multiples of those row blocks; visible lengths off every block size.
@pytest.mark.parametrize("queries,dim,length,visible", [
    (1, 64, 600, 577), (2, 64, 70, 40), (3, 12, 37, 20), (4, 32, 64, 60), (5, 21, 40, 31), (8, 8, 33, 16),
    (9, 32, 77, 50), (16, 64, 600, 560), (16, 70, 128, 100), (17, 6, 5, 2), (33, 20, 61, 23)])
def test_kernel_matches_the_reference(queries, dim, length, visible):
    rng = np.random.default_rng(queries * 100 + dim)
    q, k, v, mask = random_case(rng, 3, queries, 2, dim, length, visible)
    got = np.asarray(jax.jit(cpu_attention.attend)(q, k, v, mask))
    want = reference(q, k, v, mask)
    assert got.shape == q.shape and np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_kernel_matches_the_models_attention():
    # The model's XLA attention over the same cache layout (float32 scores, float32 lowest for hidden positions).
    rng = np.random.default_rng(7)
    q, k, v, mask = random_case(rng, 2, 4, 3, 16, 50, 30)
    want = transformer.attend(q, k, v, mask, seq_last=True)
    np.testing.assert_allclose(np.asarray(cpu_attention.attend(q, k, v, mask)), np.asarray(want), atol=ATOL, rtol=0)


@pytest.mark.parametrize("queries", [4, 16])  # the streamed and the lanes path
def test_kernel_never_reads_positions_no_query_sees(queries):
    # The cache past the current step is not written yet; the kernel stops at the last visible position, so even NaN
    # there (XLA's softmax would give 0 * NaN = NaN) leaves the result untouched.
    rng = np.random.default_rng(3)
    q, k, v, mask = random_case(rng, 2, queries, 2, 16, 90, 40)
    last = int(np.nonzero(mask.any(0))[0].max()) + 1
    k[..., last:] = np.nan
    v[..., last:] = np.nan
    got = np.asarray(cpu_attention.attend(q, k, v, mask))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(q, k[..., :last], v[..., :last], mask[:, :last]), atol=ATOL, rtol=0)


def test_kernel_rejects_bad_inputs():
    q, k, v, mask = random_case(np.random.default_rng(0), 1, 2, 2, 8, 16, 8)
    with pytest.raises(TypeError, match="float32"):
        cpu_attention.attend(q.astype(np.float16), k, v, mask)
    with pytest.raises(Exception, match="shapes do not agree"):
        jax.block_until_ready(cpu_attention.attend(q, k, v, mask[:, :8]))


def test_attention_choice_errors():
    with pytest.raises(ValueError, match="must be one of"):
        backend.check_attention("flash", jnp.float32, 1)
    with pytest.raises(ValueError, match="float32"):
        backend.check_attention("cpu_kernel", jnp.bfloat16, 1)
    with pytest.raises(ValueError, match="one device"):
        backend.check_attention("cpu_kernel", jnp.float32, 8)
    assert backend.Backend.choose(jnp.bfloat16, 1).attention == "xla"
    assert backend.Backend.choose(jnp.float32, 8).attention == "xla"
    assert backend.Backend.choose(jnp.float32, 1).attention == "cpu_kernel"


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PAR_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="compiling cpu_attention.cc failed"):
        cpu_attention.build()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind


def test_without_the_kernel_the_sampler_uses_xla():
    # A process where the kernel is switched off (as on a machine without a compiler): XLA's attention by default,
    # and asking for the kernel is a clear error.
    code = """
import jax.numpy as jnp
from flax import nnx
from par_jax.model import ParTransformer, model_config
from par_jax.sampling import Sampler, SampleSettings
cfg = model_config("tiny", n=4, grid_shape=(8, 8), vocab_size=64, num_classes=10, dtype="float32")
model = ParTransformer(cfg, rngs=nnx.Rngs(0))
sampler = Sampler(model, SampleSettings(), 1)
print(sampler.backend.attention)
print(sampler.describe()["attention_why"])
try:
    Sampler(model, SampleSettings(), 1, attention="cpu_kernel")
except ValueError as e:
    print("error:", e)
"""
    env = dict(os.environ, PAR_JAX_NO_CPU_KERNELS="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "xla"
    assert "PAR_JAX_NO_CPU_KERNELS" in lines[1]  # the fallback says why, in the sampler's description
    assert lines[2].startswith("error:") and "PAR_JAX_NO_CPU_KERNELS" in lines[2]
    assert "sampler attention: xla" in out.stderr  # and in the log
