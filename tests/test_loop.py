"""The loop kit (par_jax/core/loop.py) that the decoder, tokenizer and classifier loops share: the non-finite guard,
refusing to resume a workdir with another model, and the guard in the evaluation classifier's loop."""

import numpy as np
import pytest

from configs import par
from par_jax.core import loop
from par_jax.training import train

TINY = dict(grid_shape=(4, 4), vocab_size=64, num_classes=4)


def test_check_finite_names_every_bad_value_and_what_is_kept():
    loop.check_finite(3, {"loss": 1.0, "grad_norm": np.float32(2.0)}, kept=lambda: "unused")
    with pytest.raises(loop.NonFiniteError) as e:
        loop.check_finite(7, {"loss": 1.0, "param_norm": float("inf"), "grad_norm": float("nan")},
                          kept=lambda: "the last good checkpoint is step 5", hint="Lower the lr.")
    text = str(e.value)
    assert "non-finite grad_norm, param_norm at step 7" in text
    assert "the last good checkpoint is step 5" in text and text.endswith("Lower the lr.")


def _tiny_config(steps: int, **model):
    config = par.get_config("runlocal")
    config.model.update(TINY, **model)
    config.data.update(synthetic_count=64, read_threads=1, prefetch=2)
    config.train.update(batch_size=8, num_steps=steps, log_every_steps=1, checkpoint_every_steps=2,
                        sample_every_steps=0, peak_flops=1e11)
    config.optimizer.update(warmup_steps=0)
    return config


def test_resuming_a_workdir_with_another_model_is_refused_before_reading_weights(tmp_path):
    train.train_and_evaluate(_tiny_config(2), str(tmp_path))
    # n=4 -> n=1 changes the parameters (no transition embeddings): refused with the differing field, nothing read.
    with pytest.raises(loop.IncompatibleCheckpointError, match=r"(?s)\(step 2\).*n: checkpoint 4 vs requested 1"):
        train.train_and_evaluate(_tiny_config(4, n=1), str(tmp_path))
    # A runtime-only field (dropout) may differ: the run resumes and finishes.
    assert train.train_and_evaluate(_tiny_config(4, attn_dropout=0.0), str(tmp_path))["step"] == 4
    assert not (tmp_path / "LOCK").exists()  # released at the end of each run, also after the refusal


def test_classifier_training_stops_before_a_non_finite_model_is_returned_for_saving():
    from par_jax.evaluation import classifier
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (32, 28, 28), dtype=np.uint8), rng.integers(0, 10, 32)
    settings = classifier.TrainSettings(steps=4, batch_size=8, learning_rate=1e30, log_every=2)
    with pytest.raises(loop.NonFiniteError, match="at step 2.*nothing was saved"):
        classifier.train(settings, data=(images, labels))


def test_a_run_whose_every_checkpoint_is_damaged_refuses_to_start_over(tmp_path):
    from par_jax.core import checkpoint
    train.train_and_evaluate(_tiny_config(2), str(tmp_path))
    for f in (tmp_path / "checkpoints" / "2" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with pytest.raises(checkpoint.DamagedCheckpointsError, match=r"steps \[2\].*new --workdir"):
        train.train_and_evaluate(_tiny_config(4), str(tmp_path))
    assert len(list((tmp_path / "checkpoints").glob("2.damaged-*"))) == 1  # moved aside, not deleted
