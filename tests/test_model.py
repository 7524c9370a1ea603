"""The PAR decoder: sizes, causality, RoPE under the permutation, scan/remat equivalence, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from par_jax import ordering
from par_jax.model import ParTransformer, count_params, model_config
from par_jax.model import rope as rope_lib

# PAR_SPEC section 6: (n=1, n=4).
PARAM_COUNTS = {
    "B": (110_888_448, 110_890_752),
    "L": (342_910_976, 342_914_048),
    "XL": (774_699_520, 774_703_360),
    "XXL": (1_410_972_672, 1_410_977_280),
    "3B": (3_096_659_200, 3_096_668_800),
}


def tiny(**kw):
    base = dict(grid_shape=(8, 8), n=4, vocab_size=32, num_classes=10, dtype="float32")
    base.update(kw)
    return model_config("tiny", **base)


def randomize(model, seed=0, std=0.2):
    """Random values for every parameter (the zero-initialised head would hide everything)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) + (1.0 if x.ndim == 1 else 0.0)
           for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


@pytest.mark.parametrize("size", sorted(PARAM_COUNTS))
def test_exact_parameter_counts_from_abstract_shapes(size):
    before = len(jax.live_arrays())
    n1, n4 = PARAM_COUNTS[size]
    assert count_params(model_config(size, n=1)) == n1
    assert count_params(model_config(size, n=4)) == n4
    dim = model_config(size).dim
    assert count_params(model_config(size, n=16)) == n1 + 15 * dim
    assert len(jax.live_arrays()) <= before, "counting parameters must not allocate arrays"


def test_mlp_hidden_sizes():
    assert [model_config(s).mlp_hidden for s in ("B", "L", "XL", "XXL", "3B")] == [2048, 2816, 3584, 4096, 8704]
    assert model_config("3B").head_dim == 100


def test_initialisation_follows_llamagen():
    model = ParTransformer(tiny(), rngs=nnx.Rngs(0))
    assert float(jnp.abs(model.output[...]).max()) == 0.0
    assert np.all(np.asarray(model.norm.weight[...]) == 1.0)
    std = float(jnp.std(model.tok_embeddings[...]))
    assert 0.015 < std < 0.025
    assert model.cls_embedding.shape == (11, 64) and model.transition.shape == (3, 64)
    # A zero head predicts the uniform distribution: loss = log(vocab).
    tokens = jnp.zeros((2, 64), jnp.int32)
    loss, _ = model(tokens, jnp.array([0, 1]))
    np.testing.assert_allclose(float(loss), np.log(32), rtol=1e-6)


def test_loss_is_mean_cross_entropy_of_raster_logits():
    cfg = tiny()
    model = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (3, 64), 0, 32)
    labels = jnp.array([0, 5, 10])  # 10 = null class is allowed
    loss, logits = forward(model, tokens, labels)
    assert logits.shape == (3, 64, 32) and logits.dtype == jnp.float32
    logp = jax.nn.log_softmax(logits, -1)
    manual = -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))
    np.testing.assert_allclose(float(loss), float(manual), rtol=1e-5)


@nnx.jit
def forward(model, tokens, labels, rng=None):
    return model(tokens, labels, rng=rng)


def _outputs_by_position(model, tokens, labels):
    """Logits in sequence/generation order: row p is the output of sequence position p (p < N)."""
    _, logits = forward(model, tokens, labels)
    return np.asarray(logits[:, model.config.layout.perm])


@pytest.mark.parametrize("kw", [dict(n=4), dict(n=16), dict(n=1), dict(n=4, intra_group="causal"),
                                dict(n=4, sequential_prefix=False), dict(n=4, grid_shape=(2, 4, 4))])
def test_attention_dependencies_match_the_block_causal_mask(kw):
    """Changing the input at position p changes exactly the outputs of the positions that may attend to p."""
    cfg = tiny(**kw)
    model = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)))
    layout = cfg.layout
    mask = layout.attention_mask()
    n_tok = cfg.num_tokens
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (1, n_tok))
    labels = np.array([3])
    base = _outputs_by_position(model, jnp.asarray(tokens), jnp.asarray(labels))
    token_positions = np.nonzero(layout.input_kind == ordering.TOKEN)[0]
    probes = [0] + sorted(rng.choice(token_positions, 6, replace=False).tolist())
    for p in probes:
        t2, l2 = tokens.copy(), labels.copy()
        if layout.input_kind[p] == ordering.CLS:
            l2[0] = 7
        else:
            raster = layout.perm[layout.input_index[p]]
            t2[0, raster] = (t2[0, raster] + 1) % 32
        out = _outputs_by_position(model, jnp.asarray(t2), jnp.asarray(l2))
        changed = np.abs(out - base).max(-1)[0] > 1e-6
        np.testing.assert_array_equal(changed, mask[:n_tok, p], err_msg=f"position {p}")


def test_inside_a_group_every_position_sees_every_other():
    cfg = tiny(n=4)
    mask = cfg.layout.attention_mask()
    group = cfg.layout.group
    for g in range(4, 8):
        idx = np.nonzero(group == g)[0]
        assert mask[np.ix_(idx, idx)].all()


def test_rope_angles_follow_each_tokens_row_and_col_under_the_permutation():
    d = 64
    for n in (1, 4, 16):
        layout = ordering.OrderSpec((8, 8), n).layout
        cos, sin = rope_lib.rope_table(layout, d)
        for p in range(layout.seq_len):
            if layout.input_kind[p] != ordering.TOKEN:
                assert not cos[p].any() and not sin[p].any()  # the release's zero rotation
                continue
            row, col = divmod(int(layout.perm[layout.input_index[p]]), 8)
            freqs = 10000.0 ** (-2.0 * np.arange(d // 4) / (d // 2))
            angles = np.concatenate([row * freqs, col * freqs])
            np.testing.assert_allclose(cos[p], np.cos(angles), atol=1e-6)
            np.testing.assert_allclose(sin[p], np.sin(angles), atol=1e-6)
    identity_cos, identity_sin = rope_lib.rope_table(ordering.OrderSpec((8, 8), 4).layout, d, zero_special=False)
    assert (identity_cos[0] == 1).all() and (identity_sin[0] == 0).all()


def test_rope_rotates_interleaved_pairs_and_is_relative():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, 1, 1, 32)).astype(np.float32)
    def rot(x, pos):
        ang = rope_lib.rope_angles(np.array([pos]), 32)
        return np.asarray(rope_lib.apply_rope(jnp.asarray(x), jnp.cos(ang), jnp.sin(ang)))
    # Pair (0, 1) rotates by the row angle with frequency 1.
    r = rot(q, (1, 0))[0, 0, 0]
    c, s = np.cos(1.0), np.sin(1.0)
    np.testing.assert_allclose(r[:2], [q[0, 0, 0, 0] * c - q[0, 0, 0, 1] * s, q[0, 0, 0, 0] * s + q[0, 0, 0, 1] * c],
                               rtol=1e-5)
    # Scores depend only on the 2D offset between tokens.
    a = np.sum(rot(q, (2, 3)) * rot(k, (5, 1)))
    b = np.sum(rot(q, (4, 7)) * rot(k, (7, 5)))
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_release_zero_rotation_makes_q_and_k_zero_at_special_positions():
    cfg = tiny(n=4)
    model = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)))
    cos, sin = model.rope()
    x = jnp.ones((1, cfg.layout.seq_len, 2, 32))
    rotated = np.asarray(rope_lib.apply_rope(x, jnp.asarray(cos), jnp.asarray(sin)))
    special = cfg.layout.input_kind != ordering.TOKEN
    assert special.sum() == 4  # class + 3 transition tokens
    assert not rotated[0, special].any() and rotated[0, ~special].any()
    # The flag changes the function (identity rotation instead of zero).
    tokens = jax.random.randint(jax.random.key(1), (1, 64), 0, 32)
    labels = jnp.array([2])
    _, a = forward(model, tokens, labels)
    model.config = cfg.replace(zero_rope_special=False)
    _, b = forward(model, tokens, labels)
    assert float(jnp.abs(a - b).max()) > 1e-4


def _copy_stacked_to_list(scanned, unscanned):
    stacked = nnx.state(scanned.layers, nnx.Param)
    for i, block in enumerate(unscanned.layers):
        nnx.update(block, jax.tree.map(lambda x: x[i], stacked))
    for name in ("tok_embeddings", "cls_embedding", "transition", "output"):
        getattr(unscanned, name)[...] = getattr(scanned, name)[...]
    unscanned.norm.weight[...] = scanned.norm.weight[...]


def test_scanned_and_unscanned_layers_give_the_same_logits():
    cfg = tiny(n=4)
    scanned = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)))
    unscanned = ParTransformer(cfg.replace(scan_layers=False), rngs=nnx.Rngs(1))
    _copy_stacked_to_list(scanned, unscanned)
    tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 32)
    labels = jnp.array([1, 2])
    la, a = forward(scanned, tokens, labels)
    lb, b = forward(unscanned, tokens, labels)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("seq_last", [False, True], ids=["cache_BSHD", "cache_BHDS"])
def test_cached_steps_equal_the_training_forward(scan_layers, seq_last):
    # The model's own cached call, step by step over the sequence layout (prefill, single tokens, groups with their
    # transition embeddings), gives the training forward's logits: both cache layouts, stacked or per-layer layers.
    cfg = tiny(n=4, grid_shape=(4, 8), scan_layers=scan_layers)
    model = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(2), (2, cfg.num_tokens), 0, 32)
    labels = jnp.array([1, cfg.null_class])
    _, want = forward(model, tokens, labels)
    layout = cfg.layout
    gen = jnp.take(tokens, layout.perm, axis=1)
    cache = model.init_cache(2, layout.seq_len, seq_last=seq_last)
    step = nnx.jit(lambda m, c, start, width: m.step(gen, labels, c, start, width), static_argnums=3)
    got = []
    for start, end in layout.step_bounds():
        logits, cache = step(model, cache, start, end - start)
        got.append(logits)
    got = jnp.take(jnp.concatenate(got, axis=1)[:, :cfg.num_tokens], layout.inverse, axis=1)
    assert np.abs(np.asarray(want)).max() > 1.0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_gives_the_same_loss_and_gradients(remat, scan):
    cfg = tiny(n=4, scan_layers=scan)
    model = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 32)
    labels = jnp.array([1, 2])

    def loss_fn(m):
        return m(tokens, labels, return_logits=False)[0]

    l0, g0 = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    model.config = cfg.replace(remat=remat)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g0, g1)


def test_dropout_and_class_dropout():
    cfg = tiny(n=4, class_dropout=1.0, embed_dropout=0.0, resid_dropout=0.0, mlp_dropout=0.0)
    model = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 32)
    # Class dropout with probability 1 turns every label into the null class.
    _, dropped = forward(model, tokens, jnp.array([1, 2]), rng=jax.random.key(0))
    _, null = forward(model, tokens, jnp.array([10, 10]))
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(null), atol=1e-6)
    # Regular dropout: random with a key, deterministic without one.
    model.config = cfg.replace(class_dropout=0.0, embed_dropout=0.1, resid_dropout=0.1, mlp_dropout=0.1,
                               attn_dropout=0.1)
    _, a = forward(model, tokens, jnp.array([1, 2]), rng=jax.random.key(0))
    _, b = forward(model, tokens, jnp.array([1, 2]), rng=jax.random.key(1))
    _, c = forward(model, tokens, jnp.array([1, 2]))
    _, d = forward(model, tokens, jnp.array([1, 2]))
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = tiny(n=4, dtype="bfloat16")
    model = randomize(ParTransformer(cfg, rngs=nnx.Rngs(0)), std=0.05)
    tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 32)
    loss16, logits16 = forward(model, tokens, jnp.array([1, 2]))
    assert model.tok_embeddings[...].dtype == jnp.float32 and logits16.dtype == jnp.float32
    model.config = cfg.replace(dtype="float32")
    loss32, logits32 = forward(model, tokens, jnp.array([1, 2]))
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)


def test_video_grid_forward():
    cfg = tiny(n=4, grid_shape=(2, 4, 4))
    model = ParTransformer(cfg, rngs=nnx.Rngs(0))
    loss, logits = model(jnp.zeros((1, 32), jnp.int32), jnp.array([0]))
    assert logits.shape == (1, 32, 32) and np.isfinite(float(loss))
    assert rope_lib.axis_pairs(32, 3) == [5, 5, 6] and rope_lib.axis_pairs(64, 2) == [16, 16]


def test_impossible_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown model size 'XXXL'"):
        model_config("XXXL")
    with pytest.raises(ValueError, match="not a perfect square"):
        tiny(n=8)
    with pytest.raises(ValueError, match="does not divide the 8x8"):
        tiny(n=9)
    with pytest.raises(ValueError, match="unknown model config fields"):
        model_config("tiny", layers=3)
    model = ParTransformer(tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"token ids out of range: found \[32\]; allowed 0..31"):
        model(jnp.full((1, 64), 32), jnp.array([0]))
    with pytest.raises(ValueError, match=r"class label ids out of range: found \[11\]; allowed 0..10"):
        model(jnp.zeros((1, 64), jnp.int32), jnp.array([11]))
    with pytest.raises(ValueError, match=r"tokens must be \(batch, 64\)"):
        model(jnp.zeros((1, 60), jnp.int32), jnp.array([0]))
    with pytest.raises(ValueError, match="labels must be"):
        model(jnp.zeros((2, 64), jnp.int32), jnp.array([0]))
