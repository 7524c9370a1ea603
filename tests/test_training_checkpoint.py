"""Params-only checkpoints: save_params / load_params / restore_model round trips and their errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from par_jax.model import ParTransformer, model_config
from par_jax.model import checkpoint

CFG = model_config("tiny", grid_shape=(4, 4), n=4, vocab_size=32, num_classes=10, dtype="float32")


@pytest.fixture(scope="module")
def model():
    # Built under jit: eager construction compiles every small init op separately and is several times slower.
    params = jax.jit(lambda: checkpoint.params_of(ParTransformer(CFG, rngs=nnx.Rngs(3))))()
    return checkpoint.model_from_params(CFG, params)


def _same_params(a, b):
    la, lb = jax.tree.leaves(checkpoint.params_of(a)), jax.tree.leaves(checkpoint.params_of(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_save_and_load_params_round_trip(tmp_path, model):
    checkpoint.save_params(tmp_path / "p", model)
    loaded = checkpoint.load_params(tmp_path / "p")
    assert loaded.config == CFG
    assert _same_params(model, loaded)
    # A runtime-only difference (compute dtype) is allowed; restore_model takes a params-only directory too.
    bf16 = checkpoint.restore_model(tmp_path / "p", CFG.replace(dtype="bfloat16"))
    assert bf16.config.dtype == "bfloat16" and _same_params(model, bf16)


def test_relative_paths_load(tmp_path, model, monkeypatch):
    """Orbax rejects relative paths; the loaders resolve them against the working directory."""
    monkeypatch.chdir(tmp_path)
    checkpoint.save_params("p", model)
    assert _same_params(model, checkpoint.load_params("p"))
    assert _same_params(model, checkpoint.restore_model("p"))


def test_load_params_rejects_mismatched_config(tmp_path, model):
    checkpoint.save_params(tmp_path / "p", model)
    with pytest.raises(ValueError, match=r"(?s)n: checkpoint 4 vs requested 16.*cfg=None"):
        checkpoint.load_params(tmp_path / "p", CFG.replace(n=16, grid_shape=(8, 8)))
    with pytest.raises(FileExistsError):
        checkpoint.save_params(tmp_path / "p", model)


def test_restore_model_without_checkpoint_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no par_jax checkpoint"):
        checkpoint.restore_model(tmp_path)
