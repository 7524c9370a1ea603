"""Converters from the PyTorch PAR / LlamaGen release: state dicts <-> par_jax models, and checkpoint files.

The placement tests build PyTorch-layout state dicts from known random arrays and compare the converted model with an
independent NumPy forward pass written from PAR_SPEC sections 3-6 (it uses nothing from par_jax).
"""

import argparse
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from par_jax import conversion
from par_jax.conversion import ConversionError
from par_jax.model import ParTransformer, model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSITION = "spe_tok_embeddings.special_embeddings.weight"
# float32 model vs float64 reference on logits of size O(1) (measured max difference: 1.3e-6).
LOGITS_ATOL = 2e-5


# ----- a PyTorch-layout GPT state dict from known random arrays -----

def random_gpt_state_dict(seed, *, layers=2, dim=64, heads=4, hidden=256, vocab=32, classes=5, n=4):
    del heads  # not stored in the weights
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.3 * rng.standard_normal(dim)).astype(np.float32)

    sd = {"cls_embedding.embedding_table.weight": normal(classes + 1, dim),
          "tok_embeddings.weight": normal(vocab, dim)}
    if n > 1:
        sd[TRANSITION] = normal(n - 1, dim)
    for i in range(layers):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = normal(3 * dim, dim, scale=dim ** -0.5)
        sd[p + "attention.wo.weight"] = normal(dim, dim, scale=dim ** -0.5)
        sd[p + "feed_forward.w1.weight"] = normal(hidden, dim, scale=dim ** -0.5)
        sd[p + "feed_forward.w3.weight"] = normal(hidden, dim, scale=dim ** -0.5)
        sd[p + "feed_forward.w2.weight"] = normal(dim, hidden, scale=hidden ** -0.5)
        sd[p + "attention_norm.weight"] = norm_weight()
        sd[p + "ffn_norm.weight"] = norm_weight()
    sd["norm.weight"] = norm_weight()
    sd["output.weight"] = normal(vocab, dim, scale=dim ** -0.5)
    return sd


def tiny_config(n=4, scan_layers=True, **overrides):
    # head_dim 16: 4 rotary pairs for the row and 4 for the column.
    return model_config("tiny", num_heads=4, vocab_size=32, num_classes=5, grid_shape=(4, 4), n=n,
                        dtype="float32", scan_layers=scan_layers, **overrides)


# ----- an independent NumPy reference of the release's forward pass (PAR_SPEC sections 3-6) -----

def reference_order(H, W, n):
    """(row, col) of t_0 .. t_{N-1}: for each in-region position, for each region, both in raster order."""
    s = math.isqrt(n)
    h, w = H // s, W // s
    return [(a * h + r, b * w + c) for r in range(h) for c in range(w) for a in range(s) for b in range(s)]


def reference_logits(sd, tokens, labels, grid, n, heads):
    """Raster-order logits (B, N, V) from PyTorch-layout weights, in float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    H, W = grid
    N = H * W
    order = reference_order(H, W, n)
    B = tokens.shape[0]
    dim = sd["tok_embeddings.weight"].shape[1]
    D = dim // heads
    # [cls] t_0 .. t_{n-1} M_1 .. M_{n-1} t_n .. t_{N-2}
    seq = [("cls", 0)] + [("tok", j) for j in range(n)] + [("M", k) for k in range(n - 1)]
    seq += [("tok", j) for j in range(n, N - 1)]
    L = len(seq)
    assert L == N + n - 1
    x = np.zeros((B, L, dim))
    freqs = 10000.0 ** (-2.0 * np.arange(D // 4) / (D / 2))
    cos, sin = np.zeros((L, D // 2)), np.zeros((L, D // 2))  # zero rotation at class and transition positions
    for p, (kind, j) in enumerate(seq):
        if kind == "cls":
            x[:, p] = sd["cls_embedding.embedding_table.weight"][labels]
        elif kind == "M":
            x[:, p] = sd[TRANSITION][j]
        else:
            r, c = order[j]
            x[:, p] = sd["tok_embeddings.weight"][tokens[:, r * W + c]]
            angles = np.concatenate([r * freqs, c * freqs])  # first D/4 pairs: row; last D/4: column
            cos[p], sin[p] = np.cos(angles), np.sin(angles)
    q_pos, k_pos = np.arange(L)[:, None], np.arange(L)[None, :]
    same_group = (q_pos >= n) & (k_pos >= n) & ((q_pos - n) // n == (k_pos - n) // n)
    mask = (k_pos <= q_pos) | same_group

    def rms_norm(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + 1e-5) * w

    def rope(v):  # (B, L, heads, D), interleaved pairs (2j, 2j+1)
        v0, v1 = v[..., 0::2], v[..., 1::2]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        out = np.empty_like(v)
        out[..., 0::2] = v0 * c - v1 * s
        out[..., 1::2] = v0 * s + v1 * c
        return out

    def silu(v):
        return v / (1.0 + np.exp(-v))

    h = x
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(layers):
        w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        a = rms_norm(h, w["attention_norm.weight"])
        qkv = a @ w["attention.wqkv.weight"].T  # torch Linear: y = x W^T, W is (out, in)
        q, k, v = (qkv[..., t * dim:(t + 1) * dim].reshape(B, L, heads, D) for t in range(3))
        q, k = rope(q), rope(k)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, L, dim)
        h = h + o @ w["attention.wo.weight"].T
        f = rms_norm(h, w["ffn_norm.weight"])
        h = h + (silu(f @ w["feed_forward.w1.weight"].T) * (f @ w["feed_forward.w3.weight"].T)) @ \
            w["feed_forward.w2.weight"].T
    logits = rms_norm(h, sd["norm.weight"]) @ sd["output.weight"].T
    out = np.zeros((B, N, logits.shape[-1]))
    for p in range(N):  # the output at position p predicts t_p
        r, c = order[p]
        out[:, r * W + c] = logits[:, p]
    return out


def reference_loss(logits, tokens):
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tokens[..., None], axis=-1).mean()


def _batch(seed, cfg, batch=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, cfg.num_tokens)).astype(np.int32)
    labels = np.array([0, cfg.num_classes - 1, cfg.num_classes][:batch], np.int32)  # the last one: null class
    return tokens, labels


# ----- GPT: every tensor lands in the right place -----

@pytest.mark.parametrize("n,scan_layers", [(1, True), (4, True), (4, False)])
def test_gpt_logits_match_numpy_reference(n, scan_layers):
    cfg = tiny_config(n=n, scan_layers=scan_layers)
    sd = random_gpt_state_dict(n + 10, n=n, hidden=cfg.mlp_hidden)
    model = conversion.gpt_from_state_dict(sd, cfg)
    tokens, labels = _batch(0, cfg)
    loss, logits = model(jnp.asarray(tokens), jnp.asarray(labels))
    want = reference_logits(sd, tokens, labels, cfg.grid_shape, n, cfg.num_heads)
    assert np.abs(want).max() > 0.5  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(np.asarray(logits), want, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(float(loss), reference_loss(want, tokens), atol=1e-5, rtol=0)
    # The reference notices a misplaced tensor: gate and up projections swapped in one layer.
    swapped = dict(sd)
    swapped["layers.1.feed_forward.w1.weight"] = sd["layers.1.feed_forward.w3.weight"]
    swapped["layers.1.feed_forward.w3.weight"] = sd["layers.1.feed_forward.w1.weight"]
    other = reference_logits(swapped, tokens, labels, cfg.grid_shape, n, cfg.num_heads)
    assert np.abs(other - np.asarray(logits)).max() > 100 * LOGITS_ATOL


# ----- GPT: export and import are exact inverses -----

def random_model(cfg, seed):
    """A ParTransformer with random values in every parameter (no XLA compile, unlike its own initializers)."""
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    for _, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(rng.standard_normal(var.shape), jnp.float32))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gpt_export_then_import_is_exact(scan_layers):
    cfg = tiny_config(n=4, scan_layers=scan_layers)
    model = random_model(cfg, seed=3)
    sd = conversion.gpt_to_state_dict(model)
    layout_keys = ["cls_embedding.embedding_table.weight", "tok_embeddings.weight", TRANSITION]
    assert list(sd)[:3] == layout_keys and list(sd)[-2:] == ["norm.weight", "output.weight"]
    assert sd["layers.0.attention.wqkv.weight"].shape == (3 * cfg.dim, cfg.dim)
    assert all(v.dtype == np.float32 for v in sd.values())
    back = conversion.gpt_from_state_dict(sd, cfg)
    want = nnx.to_flat_state(nnx.state(model, nnx.Param))
    got = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert len(want) == len(got)
    for path, var in want:
        assert np.array_equal(np.asarray(var[...]), np.asarray(got[path][...])), path
        assert got[path].get_metadata()["out_sharding"] == var.get_metadata()["out_sharding"], path


def test_gpt_import_then_export_is_exact_across_layer_layouts():
    sd = random_gpt_state_dict(5)
    stacked = conversion.gpt_from_state_dict(sd, tiny_config(scan_layers=True))
    per_layer = conversion.gpt_from_state_dict(conversion.gpt_to_state_dict(stacked), tiny_config(scan_layers=False))
    out = conversion.gpt_to_state_dict(per_layer)
    assert list(out) == list(sd)
    for key in sd:
        assert np.array_equal(out[key], sd[key]), key


def test_gpt_ignores_buffers_and_wrapper_prefixes():
    sd = random_gpt_state_dict(6)
    extra = dict(sd, freqs_cis=np.zeros((17, 8, 2), np.float32), causal_mask=np.ones((24, 24), bool))
    extra["layers.0.attention.kv_cache.k_cache"] = np.zeros((2, 4, 24, 16), np.float32)
    extra["layers.1.attention.kv_cache.v_cache"] = np.zeros((2, 4, 24, 16), np.float32)
    wrapped = {"module." + k: v for k, v in extra.items()}  # as saved from a DistributedDataParallel model
    model = conversion.gpt_from_state_dict(wrapped, tiny_config())
    out = conversion.gpt_to_state_dict(model)
    assert set(out) == set(sd)
    assert all(np.array_equal(out[k], sd[k]) for k in sd)


def test_inspect_reads_the_model_shape_from_the_weights():
    info = conversion.inspect_gpt_state_dict(random_gpt_state_dict(0, layers=2, dim=64, vocab=32, classes=5, n=4))
    assert info == dict(num_layers=2, dim=64, vocab_size=32, num_classes=5, n=4, mlp_hidden=256, size="tiny")
    info = conversion.inspect_gpt_state_dict(random_gpt_state_dict(0, layers=3, dim=48, hidden=128, n=1))
    assert info["n"] == 1 and info["size"] is None and info["num_layers"] == 3 and info["mlp_hidden"] == 128


# ----- GPT: every kind of bad checkpoint gives its error -----

def _expect_problems(sd, cfg, *fragments):
    with pytest.raises(ConversionError) as e:
        conversion.gpt_from_state_dict(sd, cfg)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return e.value


def test_bad_gpt_missing_key():
    sd = random_gpt_state_dict(0)
    del sd["layers.1.attention.wo.weight"]
    err = _expect_problems(sd, tiny_config(), "missing     layers.1.attention.wo.weight: expected (64, 64)")
    assert err.problems == ["missing     layers.1.attention.wo.weight: expected (64, 64)"]


def test_bad_gpt_unexpected_key():
    sd = random_gpt_state_dict(0)
    sd["layers.0.attention.wqkv.bias"] = np.zeros(192, np.float32)
    err = _expect_problems(sd, tiny_config(), "unexpected  layers.0.attention.wqkv.bias: found (192,)")
    assert len(err.problems) == 1


def test_bad_gpt_shape_mismatch():
    sd = random_gpt_state_dict(0)
    sd["layers.0.feed_forward.w2.weight"] = np.zeros((64, 128), np.float32)
    _expect_problems(sd, tiny_config(), "wrong shape layers.0.feed_forward.w2.weight: expected (64, 256), found (64, 128)")


def test_bad_gpt_wrong_n():
    sd = random_gpt_state_dict(0, n=4)
    _expect_problems(sd, tiny_config(n=16), "n: the weights have 4, the config has 16",
                     f"wrong shape {TRANSITION}: expected (15, 64), found (3, 64)")
    _expect_problems(sd, tiny_config(n=1), "n: the weights have 4, the config has 1", f"unexpected  {TRANSITION}")


def test_bad_gpt_llamagen_weights_into_par_config():
    sd = random_gpt_state_dict(0, n=1)
    _expect_problems(sd, tiny_config(n=4), "n: the weights have 1 (no spe_tok_embeddings: a LlamaGen model), "
                     "the config has 4", f"missing     {TRANSITION}: expected (3, 64)")


def test_bad_gpt_wrong_size_lists_every_key_and_suggests_the_size():
    sd = random_gpt_state_dict(0, layers=2, dim=64, vocab=32)
    cfg = tiny_config().replace(num_layers=3, dim=96, num_heads=4)
    err = _expect_problems(sd, cfg, "num_layers: the weights have 2, the config has 3",
                           "dim: the weights have 64, the config has 96",
                           "missing     layers.2.ffn_norm.weight: expected (96,)",
                           "wrong shape tok_embeddings.weight: expected (32, 96), found (32, 64)",
                           "size=tiny: pass e.g. --config=configs/par.py:size=tiny,n=4")
    # One line per offending key: every tensor of the two present layers plus the missing third layer.
    assert sum(p.startswith(("missing", "wrong shape")) for p in err.problems) == len(sd) + 7


def test_bad_gpt_heads_do_not_divide_dim():
    sd = random_gpt_state_dict(0, dim=66, hidden=256)
    _expect_problems(sd, tiny_config(), "num_heads: the config's 4 heads do not divide the weights' dim=66")


def test_bad_gpt_non_float_and_non_array_entries():
    sd = random_gpt_state_dict(0)
    sd["norm.weight"] = np.ones(64, np.int64)
    _expect_problems(sd, tiny_config(), "wrong dtype norm.weight: expected floating point, found int64")
    sd["norm.weight"] = "not an array"
    with pytest.raises(ValueError, match="must be arrays or tensors; these are not: \\['norm.weight'\\]"):
        conversion.gpt_from_state_dict(sd, tiny_config())


def test_bad_gpt_reports_everything_at_once():
    sd = random_gpt_state_dict(0)
    del sd["norm.weight"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["output.weight"] = np.zeros((32, 63), np.float32)
    err = _expect_problems(sd, tiny_config(), "missing     norm.weight", "unexpected  extra.weight",
                           "wrong shape output.weight: expected (32, 64), found (32, 63)")
    assert len(err.problems) == 3 and "3 problem(s)" in str(err)


# ----- checkpoint files -----

def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
        assert np.array_equal(a[key], b[key]), key


def test_safetensors_round_trip(tmp_path):
    sd = random_gpt_state_dict(1)
    path = tmp_path / "gpt.safetensors"
    conversion.save_state_dict(sd, path)
    _assert_same(conversion.load_state_dict(path), sd)


def test_safetensors_bfloat16_is_widened_to_float32(tmp_path):
    import safetensors.flax

    path = str(tmp_path / "bf16.safetensors")
    safetensors.flax.save_file({"w": jnp.asarray([1.5, -2.0, 3.0], jnp.bfloat16)}, path)
    back = conversion.load_state_dict(path)
    assert back["w"].dtype == np.float32 and back["w"].tolist() == [1.5, -2.0, 3.0]


def test_pt_round_trip_through_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sd = random_gpt_state_dict(2)
    path = tmp_path / "gpt.pt"
    conversion.save_state_dict(sd, path)
    raw = torch.load(path, weights_only=True)  # a plain torch file of tensors
    assert all(isinstance(v, torch.Tensor) for v in raw.values()) and list(raw) == list(sd)
    _assert_same(conversion.load_state_dict(path), sd)

    # As the release's training scripts save: weights under "model" (DDP-prefixed), EMA, step and an argparse
    # Namespace of arguments; a bfloat16 tensor comes back as float32.
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": {"module." + k: torch.from_numpy(v) for k, v in sd.items()},
                "ema": {k: torch.from_numpy(v) for k, v in ema.items()},
                "steps": 100, "args": argparse.Namespace(gpt_model="GPT-tiny", image_size=64),
                "extra": {"bf16": torch.tensor([0.5, 2.0], dtype=torch.bfloat16)}}, tmp_path / "train.pt")
    _assert_same(conversion.load_state_dict(tmp_path / "train.pt"), sd)
    _assert_same(conversion.load_state_dict(tmp_path / "train.pt", key="ema"), ema)
    bf16 = conversion.load_state_dict(tmp_path / "train.pt", key="extra")["bf16"]
    assert bf16.dtype == np.float32 and bf16.tolist() == [0.5, 2.0]
    model = conversion.gpt_from_state_dict(raw, tiny_config())  # torch tensors are accepted directly
    _assert_same(conversion.gpt_to_state_dict(model), sd)


def test_pt_with_other_python_objects_needs_trust(tmp_path):
    torch = pytest.importorskip("torch")
    import fractions

    sd = random_gpt_state_dict(2, layers=1)
    path = tmp_path / "odd.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "lr": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        conversion.load_state_dict(path)
    _assert_same(conversion.load_state_dict(path, trust_pickle=True), sd)


def test_pt_without_torch_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "gpt.pt"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
        conversion.load_state_dict(path)
    with pytest.raises(ImportError, match="torch==2.13.0"):
        conversion.save_state_dict({"w": np.zeros(2, np.float32)}, tmp_path / "out.pt")


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        conversion.load_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the format"):
        conversion.load_state_dict(tmp_path / "weights.npz")
    torch = pytest.importorskip("torch")
    torch.save({"steps": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_model.pt")
    with pytest.raises(ValueError, match="found no state dict.*'optimizer', 'steps'"):
        conversion.load_state_dict(tmp_path / "no_model.pt")
    with pytest.raises(KeyError, match="no entry 'ema'"):
        conversion.load_state_dict(tmp_path / "no_model.pt", key="ema")


# ----- the command line -----

def _run_convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "par_jax.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_convert_cli_writes_a_checkpoint_that_load_params_restores(tmp_path):
    from par_jax.training import checkpoint

    # configs/par.py at size=tiny, res=64: 4x4 tokens, the release's vocabulary and classes.
    sd = random_gpt_state_dict(4, layers=2, dim=64, hidden=256, vocab=16384, classes=1000, n=4)
    conversion.save_state_dict(sd, tmp_path / "par.safetensors")
    config = "--config=configs/par.py:size=tiny,n=4,res=64"
    result = _run_convert("--kind=gpt", f"--input={tmp_path / 'par.safetensors'}", config,
                          f"--output={tmp_path / 'ckpt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    model = checkpoint.load_params(tmp_path / "ckpt")
    assert model.config.n == 4 and model.config.grid_shape == (4, 4) and model.config.num_heads == 2
    _assert_same(conversion.gpt_to_state_dict(model), sd)

    # Weights that do not fit: an error that names the problem, and no output directory.
    result = _run_convert("--kind=gpt", f"--input={tmp_path / 'par.safetensors'}",
                          "--config=configs/par.py:size=tiny,n=16,res=64", f"--output={tmp_path / 'bad'}")
    assert result.returncode == 1
    assert "n: the weights have 4, the config has 16" in result.stderr
    assert not (tmp_path / "bad").exists()
