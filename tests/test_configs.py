"""Experiment configs: paper and release recipes, runlocal, argument strings and command-line overrides."""

import pytest
from absl import flags
from ml_collections import config_flags

from configs import par
from par_jax.model import from_config_dict
from par_jax.core import sharding


def _parse(*argv):
    """Parse `--config=...` flags the way `python -m par_jax.main` does, on a private flag registry."""
    argv = ["prog", *argv]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return holder.value


def test_paper_recipe_defaults():
    config = par.get_config("size=XL,n=4")
    assert config.model.size == "XL" and config.model.grid_shape == (24, 24) and config.model.dtype == "bfloat16"
    assert config.model.attn_dropout == 0.1
    opt = config.optimizer
    assert (opt.lr, opt.b1, opt.b2, opt.weight_decay, opt.grad_clip) == (1e-4, 0.9, 0.95, 0.05, 1.0)
    assert (opt.schedule, opt.warmup_epochs) == ("cosine", 15.0)
    assert (config.train.batch_size, config.train.num_epochs) == (256, 300.0)
    assert par.get_config("size=3B").optimizer.lr == 2e-4 and par.get_config("size=3B").train.batch_size == 512
    assert par.get_config("res=256").model.grid_shape == (16, 16)


def test_release_recipe_is_one_argument_away():
    paper, release = par.get_config("size=L"), par.get_config("size=L,recipe=release")
    assert (release.optimizer.schedule, release.optimizer.warmup_epochs, release.model.attn_dropout) == (
        "constant", 0.0, 0.0)
    # Everything else is the same experiment.
    for section in ("data", "train", "mesh", "sample"):
        assert paper[section].to_dict() == release[section].to_dict(), section
    assert paper.optimizer.lr == release.optimizer.lr


def test_runlocal_is_small_float32_on_synthetic_codes():
    config = par.get_config("runlocal")
    assert (config.model.size, config.model.dtype, config.data.source) == ("tiny", "float32", "synthetic")
    assert config.model.grid_shape == (8, 8) and config.train.num_steps > 0 and config.train.batch_size <= 32
    assert par.get_config("runlocal,size=small").model.size == "small"  # explicit arguments still win
    from_config_dict(config.model)  # a valid ModelConfig


def test_every_size_builds_a_model_config():
    for size in ("tiny", "small", "B", "L", "XL", "XXL", "3B"):
        cfg = from_config_dict(par.get_config(f"size={size}").model)
        assert cfg.grid_shape == (24, 24) and cfg.n == 4


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown config argument 'sise'"):
        par.get_config("sise=L")
    with pytest.raises(ValueError, match="unknown recipe 'paperr'"):
        par.get_config("recipe=paperr")
    with pytest.raises(ValueError):
        par.get_config("n=four")


def test_command_line_overrides_parse_with_types():
    config = _parse("--config=configs/par.py:size=L,n=16", "--config.optimizer.lr=2e-4",
                    "--config.train.batch_size=512", "--config.mesh.fsdp=4", "--config.mesh.data=-1",
                    "--config.model.grid_shape=(16, 16)", "--config.mesh.rules.embed=", "--config.train.num_steps=10")
    assert config.model.size == "L" and config.model.n == 16
    assert config.optimizer.lr == 2e-4 and isinstance(config.optimizer.lr, float)
    assert config.train.batch_size == 512 and config.mesh.fsdp == 4 and config.mesh.data == -1
    assert config.model.grid_shape == (16, 16) and config.mesh.rules.embed == ""
    assert sharding.rules_from_config(config.mesh.rules)["embed"] == ()


@pytest.mark.parametrize("flag, error, message", [
    ("--config.optimizer.lrr=2e-4", (KeyError, AttributeError), 'Did you mean "lr"'),     # unknown field
    ("--config.trian.batch_size=8", (KeyError, AttributeError), 'Did you mean "train"'),  # unknown section
    ("--config.train.batch_size=big", flags.Error, "batch_size"),             # not an int
    ("--config.train.batch_size=2.5", flags.Error, "batch_size"),             # a float where an int belongs
    ("--config.optimizer.lr=fast", flags.Error, "optimizer.lr"),              # not a float
    ("--config.train.async_checkpoints=maybe", flags.Error, "async_checkpoints"),  # not a bool
])
def test_command_line_overrides_reject_unknown_or_mistyped_fields(flag, error, message):
    _parse("--config=configs/par.py:size=B", "--config.train.batch_size=64")  # the same call works when valid
    with pytest.raises(error, match=message):
        _parse("--config=configs/par.py:size=B", flag)


def test_config_mesh_rules_are_the_sharding_defaults():
    config = par.get_config("")
    assert config.mesh.rules.to_dict() == sharding.DEFAULT_RULES
    assert sharding.rules_from_config(config.mesh.rules) == sharding.rules_from_config()
