"""The sampler: cached decoding equals the training forward, guidance and filtering do what they say, seeds, errors.

Tiny models in float32 on the CPU. Parity tolerance: teacher-forced cached logits match the training forward's (and,
guided, u + scale * (c - u) of two training forwards) to an absolute 1e-4 on logits of magnitude ~5-10 (float32
rounding of differently shaped matmuls; observed ~1e-5).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from par_jax import ordering
from par_jax.model import ParTransformer, model_config
from par_jax.sampling import SampleSettings, Sampler, backend, sample
from par_jax.sampling.sampler import step_widths

ATOL = 1e-4
VOCAB, CLASSES, BATCH = 64, 10, 3


def tiny_model(n=4, grid=(8, 8), seed=0, dtype="float32", **overrides):
    cfg = model_config("tiny", n=n, grid_shape=grid, vocab_size=VOCAB, num_classes=CLASSES, dtype=dtype,
                       init_std=0.2, **overrides)
    model = ParTransformer(cfg, rngs=nnx.Rngs(seed))
    # The vocabulary head starts at zero (all logits equal); random weights make the parity check meaningful.
    model.output[...] = jax.random.normal(jax.random.key(seed + 1), model.output.shape) * 0.2
    return model


def forward_logits(model, tokens, labels):
    _, logits = model(jnp.asarray(tokens), jnp.asarray(labels))
    return np.asarray(logits)


def random_tokens(cfg, seed=2, batch=BATCH):
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, cfg.num_tokens), 0, cfg.vocab_size))


LABELS = np.array([1, 5, CLASSES], np.int32)  # the last row asks for the null class (unconditional)


def test_cpu_defaults_to_the_attention_kernel():
    # float32 on one CPU device: the kernel (tests/test_cpu_attention.py builds it; without a compiler it is "xla").
    sampler = Sampler(tiny_model(4), SampleSettings(), 1)
    assert sampler.backend.attention == "cpu_kernel"
    assert sampler.describe()["attention_why"].startswith("default")


# Both attention paths: XLA's ops (what accelerators run) and the CPU kernel (what float32 CPU sampling runs).
@pytest.mark.parametrize("attention", ["xla", "cpu_kernel"])
@pytest.mark.parametrize("n,grid", [(1, (8, 8)), (4, (8, 8)), (16, (8, 8)), (4, (2, 4, 4)), (16, (2, 8, 8))])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_teacher_forced_decoding_equals_training_forward(n, grid, guidance, attention):
    model = tiny_model(n, grid)
    cfg = model.config
    tokens = random_tokens(cfg)
    got = np.asarray(Sampler(model, SampleSettings(guidance=guidance), BATCH, teacher_forced=True,
                             attention=attention).score(tokens, LABELS))
    cond = forward_logits(model, tokens, LABELS)
    want = cond
    if guidance != 1.0:
        uncond = forward_logits(model, tokens, np.full_like(LABELS, cfg.null_class))
        want = uncond + guidance * (cond - uncond)
    assert got.shape == (BATCH, cfg.num_tokens, VOCAB)
    assert np.abs(want).max() > 1.0  # logits far from trivial
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_bfloat16_decoding_tracks_the_float32_forward(n):
    # The accelerator default: bfloat16 compute (float32 parameters) and XLA's attention. Against the float32 forward
    # of the same parameters, guided: observed mean error ~0.3% and max ~3% of the largest logit, 96-97% of argmaxes
    # equal; a wrong mask, position or cache slot gives errors of the logits' own size.
    model = tiny_model(n, (8, 8), dtype="bfloat16")
    sampler = Sampler(model, SampleSettings(guidance=1.5), BATCH, teacher_forced=True)
    wo = sampler.weights["layers"][0]["attention"]["wo"].get_value()
    assert sampler.backend.attention == "xla" and wo.blocks[0].dtype == jnp.bfloat16
    tokens = random_tokens(model.config)
    got = np.asarray(sampler.score(tokens, LABELS))
    f32 = tiny_model(n, (8, 8))
    cond = forward_logits(f32, tokens, LABELS)
    uncond = forward_logits(f32, tokens, np.full_like(LABELS, f32.config.null_class))
    want = uncond + 1.5 * (cond - uncond)
    scale = np.abs(want).max()
    assert np.abs(got - want).mean() < 0.01 * scale and np.abs(got - want).max() < 0.1 * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
    tokens_out = np.asarray(Sampler(model, SampleSettings(guidance=1.5), BATCH)(LABELS, 0))
    assert tokens_out.shape == (BATCH, model.config.num_tokens)
    assert tokens_out.min() >= 0 and tokens_out.max() < VOCAB


def test_accelerator_choices_decode_like_the_forward(monkeypatch):
    # What a GPU or TPU runs (whole matrices, a (B, S, heads, head_dim) cache, XLA's attention), here on the CPU.
    monkeypatch.setattr(backend, "_platform", lambda: "gpu")
    model = tiny_model(4, (8, 8))
    cfg = model.config
    sampler = Sampler(model, SampleSettings(guidance=1.5), BATCH, teacher_forced=True)
    assert sampler.describe() | {"attention_why": "", "matmul_why": ""} == {
        "batch": BATCH, "cache_chunks": 4, "attention": "xla", "attention_why": "", "matmul": "xla", "matmul_why": "",
        "block_cols": 0, "kv_cache": "(B, S, heads, head_dim)"}
    tokens = random_tokens(cfg)
    cond = forward_logits(model, tokens, LABELS)
    uncond = forward_logits(model, tokens, np.full_like(LABELS, cfg.null_class))
    np.testing.assert_allclose(np.asarray(sampler.score(tokens, LABELS)), uncond + 1.5 * (cond - uncond), atol=ATOL,
                               rtol=0)


@pytest.mark.parametrize("overrides", [dict(order_kind="raster_multi"), dict(sequential_prefix=False),
                                       dict(intra_group="causal")], ids=["raster_multi", "no_prefix", "causal"])
def test_ablation_layouts_decode_like_the_forward(overrides):
    model = tiny_model(4, (8, 8), **overrides)
    tokens = random_tokens(model.config)
    got = Sampler(model, SampleSettings(), BATCH, teacher_forced=True).score(tokens, LABELS)
    np.testing.assert_allclose(np.asarray(got), forward_logits(model, tokens, LABELS), atol=ATOL, rtol=0)


def test_column_blocks_decode_like_whole_matrices():
    # The tiny model's matrices are narrower than the CPU's 256-column blocks, so split them at 32 to exercise it.
    model = tiny_model(4, (8, 8))
    tokens = random_tokens(model.config)
    settings = SampleSettings(guidance=1.5)
    whole = Sampler(model, settings, BATCH, teacher_forced=True, block_cols=0)
    blocks = Sampler(model, settings, BATCH, teacher_forced=True, block_cols=32)
    wqkv = lambda s: s.weights["layers"][0]["attention"]["wqkv"].get_value()
    assert len(wqkv(blocks).blocks) == 6
    # Whole matrices keep the parameter's own shape (one layer of the stacked parameter), so its sharding carries over.
    assert wqkv(whole).shape == model.layers.attention.wqkv.shape[1:]
    np.testing.assert_allclose(np.asarray(blocks.score(tokens, LABELS)), np.asarray(whole.score(tokens, LABELS)),
                               atol=ATOL, rtol=0)


def test_step_structure():
    # Prefill of the class token plus n - 1 single-token steps, then (N - n)/n steps of n tokens.
    assert step_widths(model_config("tiny", n=4, grid_shape=(24, 24)).layout) == [(1, 4), (4, 143)]
    assert step_widths(model_config("tiny", n=16, grid_shape=(24, 24)).layout) == [(1, 16), (16, 35)]
    assert step_widths(model_config("tiny", n=1, grid_shape=(24, 24)).layout) == [(1, 576)]
    assert step_widths(model_config("tiny", n=4, grid_shape=(24, 24), sequential_prefix=False).layout) == [(4, 144)]


@pytest.mark.parametrize("schedule,stop", [("constant", 5), ("linear", -1), ("linear", 7)])
def test_guidance_schedules(schedule, stop):
    model = tiny_model(4, (8, 8))
    cfg = model.config
    tokens = random_tokens(cfg)
    g = 2.0
    got = np.asarray(Sampler(model, SampleSettings(guidance=g, guidance_schedule=schedule, guidance_stop_step=stop),
                             BATCH, teacher_forced=True).score(tokens, LABELS))
    cond = forward_logits(model, tokens, LABELS)
    uncond = forward_logits(model, tokens, np.full_like(LABELS, cfg.null_class))
    step = ordering.step_map(cfg.order).reshape(-1)  # the step that generates each raster token
    num_steps = cfg.layout.num_steps
    scale = np.full(step.shape, g) if schedule == "constant" else 1 + (g - 1) * step / (num_steps - 1)
    if stop >= 0:
        scale = np.where(step >= stop, 1.0, scale)
    assert len(np.unique(scale)) > 1  # the schedule really varies over the steps
    want = uncond + scale[None, :, None] * (cond - uncond)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def model4():
    return tiny_model(4, (8, 8))


@pytest.fixture(scope="module")
def guided_scorer(model4):
    return Sampler(model4, SampleSettings(guidance=1.5), BATCH, teacher_forced=True)


def test_top_k_one_is_argmax(model4, guided_scorer):
    tokens = np.asarray(sample(model4, LABELS, jax.random.key(0), SampleSettings(guidance=1.5, top_k=1)))
    logits = np.asarray(guided_scorer.score(tokens, LABELS))  # each token's guided logits given the tokens before it
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    greedy = sample(model4, LABELS, jax.random.key(1), SampleSettings(guidance=1.5, temperature=0.0))
    np.testing.assert_array_equal(tokens, np.asarray(greedy))
    tiny_p = sample(model4, LABELS, jax.random.key(2), SampleSettings(guidance=1.5, top_p=1e-6))
    np.testing.assert_array_equal(tokens, np.asarray(tiny_p))


def test_top_k_and_top_p_keep_only_likely_tokens(model4, guided_scorer):
    settings = SampleSettings(guidance=1.5, temperature=2.0, top_k=3)
    tokens = np.asarray(sample(model4, LABELS, jax.random.key(0), settings))
    logits = np.asarray(guided_scorer.score(tokens, LABELS))
    rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)  # 0 = the most likely token
    assert rank.max() <= 2 and rank.max() >= 1  # within the top 3, and not always the argmax

    settings = SampleSettings(guidance=1.5, temperature=1.0, top_p=0.5)
    tokens = np.asarray(sample(model4, LABELS, jax.random.key(0), settings))
    logits = np.asarray(guided_scorer.score(tokens, LABELS))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    p_tok = np.take_along_axis(probs, tokens[..., None], -1)[..., 0]
    mass_above = np.where(probs > p_tok[..., None], probs, 0).sum(-1)  # mass of the tokens more likely than it
    assert mass_above.max() < 0.5 + 1e-5


def test_draw_follows_the_softmax_distribution():
    """The inverse-CDF draw: frequencies match softmax(logits) (chi-square), -inf entries are never drawn."""
    from par_jax.sampling.sampler import draw
    logits = jnp.asarray([2.0, 1.0, 0.0, -np.inf, -1.0, 0.5, -np.inf, 3.0])
    count = 200_000
    tokens = np.asarray(draw(jax.random.key(0), jnp.broadcast_to(logits, (count, 8))))
    freq = np.bincount(tokens, minlength=8)
    expected = np.asarray(jax.nn.softmax(logits)) * count
    assert freq[3] == 0 and freq[6] == 0
    keep = expected > 0
    chi2 = (((freq - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < 20.5, (freq, expected)   # 5 degrees of freedom: p = 0.001
    one_hot = np.asarray(draw(jax.random.key(1), jnp.where(jnp.arange(8) == 5, 0.0, -jnp.inf)[None].repeat(64, 0)))
    assert (one_hot == 5).all()


def test_same_seed_same_tokens_and_in_vocabulary(model4):
    settings = SampleSettings(guidance=1.5, temperature=1.5)
    sampler = Sampler(model4, settings, BATCH)
    a = np.asarray(sampler(LABELS, jax.random.key(7)))
    b = np.asarray(sampler(LABELS, jax.random.key(7)))   # a second call of the compiled program: no state leaks
    c = np.asarray(sample(model4, LABELS, jax.random.key(7), settings))
    d = np.asarray(sampler(LABELS, jax.random.key(8)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert (a != d).mean() > 0.5
    assert a.dtype == np.int32 and a.shape == (BATCH, 64)
    for t in (a, d):
        assert t.min() >= 0 and t.max() < VOCAB
    assert len(np.unique(a)) > 20  # sampling, not a constant


def test_video_grid_samples(model4):
    model = tiny_model(4, (2, 4, 4))
    tokens = np.asarray(sample(model, LABELS, 0, SampleSettings(guidance=1.5, top_k=8)))
    assert tokens.shape == (BATCH, 32) and tokens.min() >= 0 and tokens.max() < VOCAB


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_p=0.0), "top_p must lie in"), (dict(top_p=1.5), "top_p must lie in"),
    (dict(temperature=-0.5), "temperature must be >= 0"), (dict(top_k=-1), "top_k must be an integer"),
    (dict(guidance=-1.0), "guidance must be"), (dict(guidance_schedule="cosine"), "guidance_schedule"),
    (dict(guidance_stop_step=-2), "guidance_stop_step"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleSettings(**kwargs)


def test_bad_inputs_are_clear_errors(model4):
    sampler = Sampler(model4, SampleSettings(), BATCH)
    with pytest.raises(ValueError, match=r"class label ids out of range: found \[11\]"):
        sampler(np.array([0, 1, 11]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"found \[-1\]"):
        sampler(np.array([-1, 1, 2]), jax.random.key(0))
    with pytest.raises(ValueError, match="labels must be 3 integer class ids"):
        sampler(np.array([0, 1]), jax.random.key(0))
    with pytest.raises(ValueError, match="tokens must be"):
        Sampler(model4, SampleSettings(), BATCH, teacher_forced=True).score(np.zeros((BATCH, 16), np.int32), LABELS)


_SHARDED = r"""
import json, sys, jax, numpy as np
sys.path.insert(0, sys.argv[1])
from tests.test_sampler import tiny_model
from par_jax.sampling import sample, SampleSettings
assert jax.device_count() == 8
labels = np.arange(8, dtype=np.int32) % 10
tokens = sample(tiny_model(4, (8, 8)), labels, jax.random.key(3), SampleSettings(guidance=1.5, temperature=0.0))
# Sharded tokens decode through a tokenizer that lives on one device, the same as from the host.
from flax import nnx
from par_jax.sampling import tokens_to_images
from par_jax.tokenizer import vq
tok = vq.VQModel(vq.VQConfig.from_dict({**vq.CONFIGS["fmnist"], "codebook_size": 64, "dtype": "float32"}),
                 rngs=nnx.Rngs(0))
images = tokens_to_images(tokens, tok, (8, 8))
host = tokens_to_images(np.asarray(tokens), tok, (8, 8))
np.testing.assert_allclose(np.asarray(images), np.asarray(host), atol=1e-5)
assert images.shape == (8, 32, 32, 3)
print(json.dumps({"tokens": np.asarray(tokens).tolist(), "sharding": str(tokens.sharding),
                  "image_sharding": str(images.sharding)}))
"""


def test_batch_sharded_over_eight_devices(model4):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED, root], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "data" in out["sharding"] and "data" in out["image_sharding"]  # decoded where the tokens are
    labels = np.arange(8, dtype=np.int32) % 10
    want = sample(model4, labels, jax.random.key(3), SampleSettings(guidance=1.5, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(want))
