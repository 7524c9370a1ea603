"""Converters from the PyTorch PAR / LlamaGen release: state dicts <-> par_jax models, and checkpoint files.

The placement tests build PyTorch-layout state dicts from known random arrays and compare the converted model with an
independent NumPy forward pass written from PAR_SPEC sections 3-6 (it uses nothing from par_jax).
"""

import argparse
import math
import os
import re
import subprocess
import sys

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
# float32 tokenizer vs float64 reference on decoded pixels (measured max difference: 2.1e-6).
VQ_ATOL = 2e-5


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


@pytest.mark.parametrize("size,count_n1,count_n4", [
    ("B", 110_888_448, 110_890_752), ("L", 342_910_976, 342_914_048), ("XL", 774_699_520, 774_703_360),
    ("XXL", 1_410_972_672, 1_410_977_280), ("3B", 3_096_659_200, 3_096_668_800)])
def test_release_key_shapes_add_up_to_the_paper_sizes(size, count_n1, count_n4):
    from par_jax.conversion import gpt

    for n, count in ((1, count_n1), (4, count_n4)):
        layout = gpt.torch_layout(model_config(size, n=n, grid_shape=(24, 24)))
        assert sum(math.prod(e.shape) for e in layout.values()) == count  # PAR_SPEC section 6
        assert (TRANSITION in layout) == (n > 1)
    # Zero-stride stand-ins for a full-size file: the checks read shapes only, nothing is allocated.
    cfg = model_config(size, n=4, grid_shape=(24, 24))
    fake = {k: np.broadcast_to(np.float32(0), e.shape) for k, e in gpt.torch_layout(cfg).items()}
    assert conversion.inspect_gpt_state_dict(fake)["size"] == size
    conversion.check_gpt_state_dict(fake, cfg)


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
    _expect_problems(sd, tiny_config(),
                     "wrong shape layers.0.feed_forward.w2.weight: expected (64, 256), found (64, 128)")


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
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the format"):
        conversion.load_state_dict(tmp_path / "weights.h5")
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
    from par_jax.model import checkpoint

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
    assert result.returncode == 2
    assert "n: the weights have 4, the config has 16" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()


# ----- the VQ tokenizer: the release's keys, and a NumPy reference of its encode and decode -----

def release_vq_shapes(ch, mult, num_res, attn_levels, z, codebook_size, codebook_dim, in_ch=3):
    """Key -> shape of the release's VQModel state dict (encoder, quantizer, decoder), written from its structure."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[name + ".weight"], shapes[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[name + ".weight"], shapes[name + ".bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(name + ".norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    def middle(prefix, c):
        res(prefix + ".mid.0", c, c)
        attn(prefix + ".mid.1", c)
        res(prefix + ".mid.2", c, c)

    levels = len(mult)
    conv("encoder.conv_in", in_ch, ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(num_res):
            res(f"encoder.conv_blocks.{i}.res.{j}", cin, ch * m)
            cin = ch * m
            if i in attn_levels:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", cin)
        if i < levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", cin, cin, 3)
    middle("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, z, 3)
    conv("quant_conv", z, codebook_dim, 1)
    shapes["quantize.embedding.weight"] = (codebook_size, codebook_dim)
    conv("post_quant_conv", codebook_dim, z, 1)
    cin = ch * mult[-1]
    conv("decoder.conv_in", z, cin, 3)
    middle("decoder", cin)
    for b, i in enumerate(reversed(range(levels))):  # lowest resolution first
        for j in range(num_res + 1):
            res(f"decoder.conv_blocks.{b}.res.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i in attn_levels:
                attn(f"decoder.conv_blocks.{b}.attn.{j}", cin)
        if i > 0:
            conv(f"decoder.conv_blocks.{b}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, in_ch, 3)
    return shapes


# Three levels (4x downsampling), a width change (shortcut conv), attention at the last level, 4 GroupNorm groups.
TINY_VQ = dict(ch=16, mult=(1, 1, 2), num_res=1, attn_levels=(2,), z=8, codebook_size=12, codebook_dim=4)


def tiny_vq_config():
    from par_jax.tokenizer.vq import vq_config

    t = TINY_VQ
    return vq_config("vq16", image_size=16, base_channels=t["ch"], channel_mult=t["mult"], num_res_blocks=t["num_res"],
                     attn_levels=t["attn_levels"], z_channels=t["z"], codebook_size=t["codebook_size"],
                     codebook_dim=t["codebook_dim"], num_groups=4)


def random_vq_state_dict(seed, **overrides):
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in release_vq_shapes(**dict(TINY_VQ, **overrides)).items():
        if len(shape) == 4:    # conv weight (out, in, kh, kw)
            w = rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))
        elif key == "quantize.embedding.weight":
            w = rng.standard_normal(shape)
        elif key.endswith(".weight"):  # GroupNorm scale
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            w = 0.1 * rng.standard_normal(shape)
        sd[key] = w.astype(np.float32)
    sd["quantize.codebook_used"] = np.zeros(65536, np.float32)  # a training buffer, not a parameter
    return sd


def _conv2d(x, sd, name, stride=1, pad=None):
    """x (B, C, H, W) with a torch (out, in, kh, kw) weight; pad (top, bottom, left, right), default 'same'."""
    w, b = sd[name + ".weight"], sd[name + ".bias"]
    k = w.shape[-1]
    pad = (k // 2,) * 4 if pad is None else pad
    x = np.pad(x, ((0, 0), (0, 0), pad[:2], pad[2:]))
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for u in range(k):
        for v in range(k):
            patch = x[:, :, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride]
            out += np.einsum("bchw,oc->bohw", patch, w[:, :, u, v])
    return out + b[None, :, None, None]


def _group_norm(x, sd, name, groups=4, eps=1e-6):
    b, c, h, w = x.shape
    g = x.reshape(b, groups, c // groups, h, w)
    g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(g.var(axis=(2, 3, 4), keepdims=True) + eps)
    return g.reshape(b, c, h, w) * sd[name + ".weight"][None, :, None, None] + sd[name + ".bias"][None, :, None, None]


def _swish(x):
    return x / (1.0 + np.exp(-x))


def _res(x, sd, name):
    h = _conv2d(_swish(_group_norm(x, sd, name + ".norm1")), sd, name + ".conv1")
    h = _conv2d(_swish(_group_norm(h, sd, name + ".norm2")), sd, name + ".conv2")
    if name + ".nin_shortcut.weight" in sd:
        x = _conv2d(x, sd, name + ".nin_shortcut")
    return x + h


def _attn(x, sd, name):
    b, c, hh, ww = x.shape
    y = _group_norm(x, sd, name + ".norm")
    q, k, v = (_conv2d(y, sd, f"{name}.{p}").reshape(b, c, hh * ww) for p in ("q", "k", "v"))
    s = np.einsum("bci,bcj->bij", q, k) * c ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bij,bcj->bci", p, v).reshape(b, c, hh, ww)
    return x + _conv2d(out, sd, name + ".proj_out")


def _blocks(h, sd, prefix, i, num_res):
    for j in range(num_res):
        h = _res(h, sd, f"{prefix}.conv_blocks.{i}.res.{j}")
        if f"{prefix}.conv_blocks.{i}.attn.{j}.q.weight" in sd:
            h = _attn(h, sd, f"{prefix}.conv_blocks.{i}.attn.{j}")
    return h


def _middle(h, sd, prefix):
    return _res(_attn(_res(h, sd, prefix + ".mid.0"), sd, prefix + ".mid.1"), sd, prefix + ".mid.2")


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def reference_vq_encode(sd, images):
    """images (B, H, W, 3) in [-1, 1] -> (codes (B, h, w), cosine margin of the best code over the second)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    levels = len(TINY_VQ["mult"])
    h = _conv2d(images.transpose(0, 3, 1, 2).astype(np.float64), sd, "encoder.conv_in")
    for i in range(levels):
        h = _blocks(h, sd, "encoder", i, TINY_VQ["num_res"])
        if i < levels - 1:  # zero padding of one row at the bottom and one column at the right, stride 2
            h = _conv2d(h, sd, f"encoder.conv_blocks.{i}.downsample.conv", stride=2, pad=(0, 1, 0, 1))
    h = _middle(h, sd, "encoder")
    h = _conv2d(_swish(_group_norm(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    z = _unit(_conv2d(h, sd, "quant_conv").transpose(0, 2, 3, 1))
    e = _unit(sd["quantize.embedding.weight"])
    dist = (z ** 2).sum(-1, keepdims=True) + (e ** 2).sum(-1) - 2 * z @ e.T
    ordered = np.sort(dist, axis=-1)
    return np.argmin(dist, axis=-1), (ordered[..., 1] - ordered[..., 0]).min()


def reference_vq_decode(sd, codes):
    """codes (B, h, w) -> images (B, H, W, 3), unclipped."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    levels = len(TINY_VQ["mult"])
    z = _unit(sd["quantize.embedding.weight"])[codes].transpose(0, 3, 1, 2)
    h = _conv2d(_conv2d(z, sd, "post_quant_conv"), sd, "decoder.conv_in")
    h = _middle(h, sd, "decoder")
    for b in range(levels):
        h = _blocks(h, sd, "decoder", b, TINY_VQ["num_res"] + 1)
        if b < levels - 1:
            h = np.repeat(np.repeat(h, 2, axis=2), 2, axis=3)  # nearest-neighbour x2
            h = _conv2d(h, sd, f"decoder.conv_blocks.{b}.upsample.conv")
    h = _conv2d(_swish(_group_norm(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")
    return h.transpose(0, 2, 3, 1)


def test_vq16_keys_and_shapes_match_the_release():
    from par_jax.conversion import vq
    from par_jax.tokenizer.vq import vq_config

    want = release_vq_shapes(128, (1, 1, 2, 2, 4), 2, (4,), 256, 16384, 8)
    got = {key: shape for key, (_, shape) in vq.torch_layout(vq_config("vq16")).items()}
    assert got == want
    assert sum(math.prod(s) for s in want.values()) == 71_883_403  # "about 72M" (PAR_SPEC section 8)


def test_vq_encode_and_decode_match_numpy_reference():
    sd = random_vq_state_dict(0)
    model = conversion.vq_from_state_dict(sd, tiny_vq_config())
    images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    codes = np.asarray(nnx.jit(lambda m, x: m.encode(x))(model, jnp.asarray(images)))  # jit: one compile, not many
    want_codes, margin = reference_vq_encode(sd, images)
    assert margin > 1e-4  # no near-ties, so float32 and float64 must pick the same codes
    assert codes.shape == (2, 4, 4) and len(np.unique(want_codes)) > 3
    np.testing.assert_array_equal(codes, want_codes)
    decoded = np.asarray(nnx.jit(lambda m, c: m.decode(c))(model, jnp.asarray(codes)))
    want = reference_vq_decode(sd, want_codes)
    assert (np.abs(want) < 1).mean() > 0.5  # most values are inside [-1, 1], not clipped
    np.testing.assert_allclose(decoded, np.clip(want, -1, 1), atol=VQ_ATOL, rtol=0)


def test_vq_export_then_import_is_exact():
    sd = random_vq_state_dict(2)
    model = conversion.vq_from_state_dict(sd, tiny_vq_config())
    out = conversion.vq_to_state_dict(model)
    del sd["quantize.codebook_used"]
    _assert_same(out, sd)
    again = conversion.vq_from_state_dict(out, tiny_vq_config())
    want = nnx.to_flat_state(nnx.state(model, nnx.Param))
    got = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    assert all(np.array_equal(np.asarray(v[...]), np.asarray(got[p][...])) for p, v in want)


def test_bad_vq_checkpoints():
    cfg = tiny_vq_config()
    sd = random_vq_state_dict(0)
    del sd["decoder.conv_blocks.0.attn.1.q.bias"]
    sd["encoder.conv_blocks.0.res.0.conv1.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    sd["discriminator.conv.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError) as e:
        conversion.vq_from_state_dict(sd, cfg)
    assert e.value.problems == [
        "missing     decoder.conv_blocks.0.attn.1.q.bias: expected (32,)",
        "wrong shape encoder.conv_blocks.0.res.0.conv1.weight: expected (16, 16, 3, 3), found (16, 16, 1, 1)",
        "unexpected  discriminator.conv.weight: found (2, 2)"]
    # A codebook of another size: the setting and every key it affects.
    with pytest.raises(ConversionError) as e:
        conversion.vq_from_state_dict(random_vq_state_dict(0, codebook_size=16), cfg)
    assert e.value.problems == ["codebook_size: the weights have 16, the config has 12",
                                "wrong shape quantize.embedding.weight: expected (12, 4), found (16, 4)"]
    assert "codebook_size=16" in str(e.value)
    # Weights of a tokenizer with four levels: the levels and their keys are all named.
    with pytest.raises(ConversionError) as e:
        conversion.vq_from_state_dict(random_vq_state_dict(0, mult=(1, 1, 2, 2), attn_levels=(3,)), cfg)
    assert "channel_mult: the weights have (1, 1, 2, 2), the config has (1, 1, 2)" in str(e.value)
    assert "unexpected  encoder.conv_blocks.3.res.0.conv1.weight: found (32, 32, 3, 3)" in str(e.value)


def test_gpt_and_vq_weights_swapped_say_which_kind_they_are():
    with pytest.raises(ConversionError, match="weights of a GPT decoder .*--kind=gpt"):
        conversion.vq_from_state_dict(random_gpt_state_dict(0), tiny_vq_config())
    with pytest.raises(ConversionError, match="weights of a VQ tokenizer .*--kind=vq"):
        conversion.gpt_from_state_dict(random_vq_state_dict(0), tiny_config())


def test_convert_cli_vq_writes_what_tokenizer_load_reads(tmp_path):
    from par_jax import tokenizer

    sd = random_vq_state_dict(3)
    conversion.save_state_dict(sd, tmp_path / "vq.safetensors")
    t = TINY_VQ
    (tmp_path / "tiny_vq.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict(dict(tokenizer=dict(\n"
        f"        name='vq16', image_size=16, base_channels={t['ch']}, channel_mult={t['mult']}, num_res_blocks="
        f"{t['num_res']}, attn_levels={t['attn_levels']}, z_channels={t['z']}, codebook_size={t['codebook_size']}, "
        f"codebook_dim={t['codebook_dim']}, num_groups=4)))\n")
    result = _run_convert("--kind=vq", f"--input={tmp_path / 'vq.safetensors'}", f"--config={tmp_path / 'tiny_vq.py'}",
                          f"--output={tmp_path / 'vq_ckpt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    model = tokenizer.load(tmp_path / "vq_ckpt")
    assert model.config == tiny_vq_config()
    del sd["quantize.codebook_used"]
    _assert_same(conversion.vq_to_state_dict(model), sd)
    # Without a tokenizer block the target is VQ-16.
    from configs import par
    from par_jax import convert

    assert convert.tokenizer_config(None) == tokenizer.vq_config("vq16")
    assert convert.tokenizer_config(par.get_config("size=tiny")) == tokenizer.vq_config("vq16")


# ----- damaged files and damaged weights: named, never called a trust problem, never converted silently -----

def _save_pt(sd, path, legacy=False):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def _zip_member_offset(path, suffix):
    """Where the bytes of the zip member whose name ends with `suffix` start in the file (members are stored)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _truncated(src, dst, keep):
    data = src.read_bytes()
    dst.write_bytes(data[:keep if keep >= 1 else int(len(data) * keep)])
    return dst


def _damaged_files(tmp_path):
    """name -> a file that is not, or no longer, a checkpoint of the format its suffix names."""
    sd = random_gpt_state_dict(5, layers=1)
    noise = np.random.default_rng(0).bytes(6000)
    files = {}
    conversion.save_state_dict(sd, tmp_path / "good.safetensors")
    files["safetensors, truncated"] = _truncated(tmp_path / "good.safetensors", tmp_path / "trunc.safetensors", 0.5)
    files["safetensors, header only"] = _truncated(tmp_path / "good.safetensors", tmp_path / "head.safetensors", 12)
    np.savez(tmp_path / "good.npz", **sd)
    files["npz, truncated"] = _truncated(tmp_path / "good.npz", tmp_path / "trunc.npz", 0.5)
    for suffix in (".safetensors", ".npz", ".pt"):
        (tmp_path / f"noise{suffix}").write_bytes(noise)
        files[f"{suffix}, random bytes"] = tmp_path / f"noise{suffix}"
    _save_pt(sd, tmp_path / "good.pt")
    _save_pt(sd, tmp_path / "legacy.pt", legacy=True)
    for kind in ("good", "legacy"):
        files[f"{kind} .pt, cut in half"] = _truncated(tmp_path / f"{kind}.pt", tmp_path / f"half_{kind}.pt", 0.5)
        files[f"{kind} .pt, first 10 bytes"] = _truncated(tmp_path / f"{kind}.pt", tmp_path / f"ten_{kind}.pt", 10)
    # A zip .pt whose pickle has bytes overwritten (its checksum then disagrees), and a legacy .pt likewise.
    start, size = _zip_member_offset(tmp_path / "good.pt", "/data.pkl")
    data = bytearray((tmp_path / "good.pt").read_bytes())
    data[start + size // 2:start + size // 2 + 8] = b"\xfe" * 8
    (tmp_path / "pickle_bytes.pt").write_bytes(bytes(data))
    files["zip .pt, damaged pickle"] = tmp_path / "pickle_bytes.pt"
    # A zip .pt whose pickle was cut short before it was archived: the checksums agree, the pickle does not parse.
    import zipfile

    with zipfile.ZipFile(tmp_path / "good.pt") as src, zipfile.ZipFile(tmp_path / "short_pickle.pt", "w") as dst:
        for info in src.infolist():
            member = src.read(info)
            dst.writestr(info, member[:len(member) // 2] if info.filename.endswith("data.pkl") else member)
    files["zip .pt, pickle cut short"] = tmp_path / "short_pickle.pt"
    data = bytearray((tmp_path / "legacy.pt").read_bytes())
    data[60:68] = b"\xfe" * 8
    (tmp_path / "pickle_bytes_legacy.pt").write_bytes(bytes(data))
    files["legacy .pt, damaged pickle"] = tmp_path / "pickle_bytes_legacy.pt"
    return files


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz"])
def test_an_empty_file_is_named_and_called_empty(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{path} is empty (0 bytes)")):
        conversion.load_state_dict(path)


def test_damaged_files_are_named_and_never_called_a_pickle_trust_problem(tmp_path):
    pytest.importorskip("torch")
    for name, path in _damaged_files(tmp_path).items():
        for trust_pickle in (False, True):
            with pytest.raises(conversion.StateDictFileError) as e:
                conversion.load_state_dict(path, trust_pickle=trust_pickle)
            message = str(e.value)
            assert message.startswith(str(path)), (name, message)
            assert "trust" not in message, (name, trust_pickle, message)
            assert re.search(r"damaged|truncated|not a", message), (name, message)
            assert len(message) < 600, (name, message)


@pytest.mark.parametrize("legacy", [False, True])
def test_pt_with_other_python_objects_names_them_and_needs_trust(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    import fractions

    sd = random_gpt_state_dict(2, layers=1)
    path = tmp_path / "odd.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "lr": fractions.Fraction(1, 3)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(conversion.StateDictFileError, match=r"fractions\.Fraction.*trust_pickle=True") as e:
        conversion.load_state_dict(path)
    assert "damaged" not in str(e.value)
    _assert_same(conversion.load_state_dict(path, trust_pickle=True), sd)


def test_pt_pickling_classes_of_another_code_base_says_so(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    (tmp_path / "release_models.py").write_text("class Args:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import release_models

    torch.save({"model": {"w": torch.zeros(2)}, "args": release_models.Args()}, tmp_path / "release.pt")
    monkeypatch.delitem(sys.modules, "release_models")
    (tmp_path / "release_models.py").unlink()
    with pytest.raises(conversion.StateDictFileError, match=r"release_models\.Args.*trust_pickle=True"):
        conversion.load_state_dict(tmp_path / "release.pt")
    with pytest.raises(conversion.StateDictFileError, match=r"not importable here.*release_models.*state_dict\(\)"):
        conversion.load_state_dict(tmp_path / "release.pt", trust_pickle=True)


def test_npz_state_dicts_round_trip(tmp_path):
    sd = random_gpt_state_dict(1, layers=1)
    conversion.save_state_dict(sd, tmp_path / "gpt.npz")
    _assert_same(conversion.load_state_dict(tmp_path / "gpt.npz"), sd)
    with pytest.raises(KeyError, match="no entry 'ema'"):
        conversion.load_state_dict(tmp_path / "gpt.npz", key="ema")


def _spoil_gpt(sd):
    sd = {k: v.copy() for k, v in sd.items()}
    sd["layers.1.feed_forward.w2.weight"][3, 4] = np.nan
    sd["tok_embeddings.weight"][0, :2] = [np.inf, -np.inf]
    sd["norm.weight"][5] = -3.1e37
    return sd


def test_non_finite_and_absurd_gpt_weights_are_refused_by_name():
    sd = _spoil_gpt(random_gpt_state_dict(6))
    with pytest.raises(ConversionError) as e:
        conversion.gpt_from_state_dict(sd, tiny_config())
    assert e.value.problems == [
        "bad values  tok_embeddings.weight: 2 inf (of 2048 values)",
        "bad values  layers.1.feed_forward.w2.weight: 1 NaN (of 16384 values)",
        "bad values  norm.weight: 1 with |x| > 1e+06, largest -3.1e+37 (of 64 values)"]
    assert "check_values=False" in str(e.value) and "damaged" in str(e.value)
    # Accepted knowingly: the values are kept as they are.
    model = conversion.gpt_from_state_dict(sd, tiny_config(), check_values=False)
    back = conversion.gpt_to_state_dict(model)
    assert np.isnan(back["layers.1.feed_forward.w2.weight"][3, 4]) and back["norm.weight"][5] == np.float32(-3.1e37)
    # A misfit and bad values are reported together.
    del sd["output.weight"]
    with pytest.raises(ConversionError) as e:
        conversion.gpt_from_state_dict(sd, tiny_config())
    assert len(e.value.problems) == 4 and e.value.problems[0].startswith("missing     output.weight")


def test_non_finite_and_absurd_vq_weights_are_refused_by_name():
    sd = random_vq_state_dict(7)
    sd["decoder.conv_out.weight"][0, 0, 1, 1] = np.nan
    sd["quantize.embedding.weight"][2, 3] = 2e30
    sd["quantize.codebook_used"][:] = np.nan  # an ignored training buffer is not checked
    with pytest.raises(ConversionError) as e:
        conversion.vq_from_state_dict(sd, tiny_vq_config())
    assert e.value.problems == [
        "bad values  decoder.conv_out.weight: 1 NaN (of 432 values)",
        "bad values  quantize.embedding.weight: 1 with |x| > 1e+06, largest 2e+30 (of 48 values)"]
    model = conversion.vq_from_state_dict(sd, tiny_vq_config(), check_values=False)
    assert np.isnan(conversion.vq_to_state_dict(model)["decoder.conv_out.weight"][0, 0, 1, 1])


@pytest.mark.parametrize("fmt", ["zip.pt", "legacy.pt", "safetensors", "npz"])
def test_bad_values_are_caught_whatever_the_file_format(tmp_path, fmt):
    gpt_sd = _spoil_gpt(random_gpt_state_dict(8))
    vq_sd = random_vq_state_dict(8)
    vq_sd["encoder.conv_in.bias"][0] = -np.inf
    for name, sd in (("gpt", gpt_sd), ("vq", vq_sd)):
        path = tmp_path / f"{name}.{fmt.split('.')[-1]}"
        if fmt.endswith(".pt"):
            _save_pt(sd, path, legacy=fmt == "legacy.pt")
        else:
            conversion.save_state_dict(sd, path)
        loaded = conversion.load_state_dict(path)
        with pytest.raises(ConversionError, match="bad values  (norm.weight|encoder.conv_in.bias)"):
            if name == "gpt":
                conversion.gpt_from_state_dict(loaded, tiny_config())
            else:
                conversion.vq_from_state_dict(loaded, tiny_vq_config())


def test_flipped_bytes_in_a_pt_file_are_caught_by_the_value_check(tmp_path):
    pytest.importorskip("torch")
    sd = random_gpt_state_dict(9)
    first = next(iter(sd))
    sd[first][0, 0] = 0.5
    path = _save_pt(sd, tmp_path / "gpt.pt")
    start, _ = _zip_member_offset(path, "/data/0")  # the first tensor's storage
    data = bytearray(path.read_bytes())
    assert np.frombuffer(bytes(data[start:start + 4]), "<f4")[0] == 0.5
    data[start + 3] ^= 0x40  # the exponent's top bit: 0.5 becomes 0.5 * 2**128
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=rf"bad values  {re.escape(first)}: 1 with \|x\| > 1e\+06, "
                                              r"largest 1.7e\+38"):
        conversion.gpt_from_state_dict(conversion.load_state_dict(path), tiny_config())


def test_convert_cli_bad_files_are_short_errors_with_exit_status_2(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    config = "--config=configs/par.py:size=tiny,n=4,res=64"
    result = _run_convert("--kind=gpt", f"--input={tmp_path / 'empty.pt'}", config, f"--output={tmp_path / 'a'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{tmp_path / 'empty.pt'} is empty (0 bytes)" in result.stderr and "Traceback" not in result.stderr

    sd = _spoil_gpt(random_gpt_state_dict(4, layers=2, dim=64, hidden=256, vocab=16384, classes=1000, n=4))
    conversion.save_state_dict(sd, tmp_path / "nan.safetensors")
    args = ("--kind=gpt", f"--input={tmp_path / 'nan.safetensors'}", config)
    result = _run_convert(*args, f"--output={tmp_path / 'b'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bad values  layers.1.feed_forward.w2.weight: 1 NaN" in result.stderr and "--allow_bad_values" in (
        result.stderr)
    assert "Traceback" not in result.stderr and not (tmp_path / "b").exists()
    result = _run_convert(*args, f"--output={tmp_path / 'c'}", "--allow_bad_values")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "c").exists()
