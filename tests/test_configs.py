"""Experiment configs: paper and release recipes, runlocal, argument strings and command-line overrides."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs import par
from par_jax.core import config_args, sharding
from par_jax.model import from_config_dict

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _define(fv, argv):
    config_args.define_config(fv, argv, "experiment config")


def _parse(*argv):
    """Parse `--config=...` flags the way every par_jax command does (config_args.parse_flags, a private registry)."""
    return config_args.parse_flags(["prog", *argv], _define).config


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


@pytest.mark.parametrize("arg, message", [
    ("sise=L", "unknown config argument 'sise' in 'sise=L'; known: size, n, res, runlocal, recipe"),
    ("recipe=paperr", "recipe='paperr' is not one of: paper, release"),
    ("size=XXXL", "size='XXXL' is not one of: tiny, small, B, L, XL, XXL, 3B"),
    ("n=four", "n='four' is not an integer"),
    ("runlocal=ture", "runlocal='ture' is not a bool; use runlocal, runlocal=true or runlocal=false"),
    ("n=", "'n' needs a value"),
    ("n=3", "n=3 must be a square"),
    ("n=16,res=208", "n=16 must be a square .* divides the 13 tokens per side"),
    ("res=100", "res=100 must be a positive multiple of 16"),
])
def test_bad_arguments_are_user_errors_naming_what_is_allowed(arg, message):
    with pytest.raises(config_args.UsageError, match=message):
        par.get_config(arg)


def test_bools_take_the_usual_spellings():
    for value, want in (("true", True), ("yes", True), ("1", True), ("False", False), ("no", False), ("0", False)):
        assert config_args.parse_arg(f"quick={value}", quick=False).quick is want
    assert config_args.parse_arg("quick", quick=False).quick is True
    assert config_args.parse_arg("lr=0.5,steps=7", lr=1.0, steps=1).to_dict() == {"lr": 0.5, "steps": 7}
    with pytest.raises(config_args.UsageError, match="lr='x' is not a number"):
        config_args.parse_arg("lr=x", lr=1.0)


def test_configs_load_by_path_from_any_directory(tmp_path, monkeypatch):
    """No config imports another by module name: demo.py loads par.py and vq.py beside it by path."""
    monkeypatch.chdir(tmp_path)
    demo = config_args.load_config(os.path.join(CONFIGS, "demo.py") + ":quick")
    assert demo.job == "demo" and demo.par.model.num_layers == 2 and demo.tokenizer.tokenizer.name == "fmnist"
    assert config_args.load_config(os.path.join(CONFIGS, "par.py") + ":size=L").model.size == "L"
    for name in ("par.py", "vq.py", "demo.py"):
        text = open(os.path.join(CONFIGS, name)).read()
        assert "from configs" not in text and "import configs" not in text, name
    with pytest.raises(config_args.UsageError, match="does not exist"):
        config_args.load_config("configs/par.py")  # relative to this directory, where there is none


def test_command_line_overrides_parse_with_types():
    config = _parse("--config=configs/par.py:size=L,n=16", "--config.optimizer.lr=2e-4",
                    "--config.train.batch_size=512", "--config.mesh.fsdp=4", "--config.mesh.data=-1",
                    "--config.model.grid_shape=(16, 16)", "--config.mesh.rules.embed=", "--config.train.num_steps=10")
    assert config.model.size == "L" and config.model.n == 16
    assert config.optimizer.lr == 2e-4 and isinstance(config.optimizer.lr, float)
    assert config.train.batch_size == 512 and config.mesh.fsdp == 4 and config.mesh.data == -1
    assert config.model.grid_shape == (16, 16) and config.mesh.rules.embed == ""
    assert sharding.rules_from_config(config.mesh.rules)["embed"] == ()


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.lrr=2e-4", '--config.optimizer.lrr: no such config field; did you mean "lr"'),
    ("--config.trian.batch_size=8", '--config.trian.batch_size: no such config field; did you mean "train"'),
    ("--config.train.batch_size=big", "batch_size=big: invalid literal for int"),   # not an int
    ("--config.train.batch_size=2.5", "batch_size=2.5"),                            # a float where an int belongs
    ("--config.optimizer.lr=fast", "optimizer.lr=fast"),                            # not a float
    ("--config.train.async_checkpoints=maybe", "async_checkpoints"),                # not a bool
])
def test_command_line_overrides_reject_unknown_or_mistyped_fields(flag, message):
    _parse("--config=configs/par.py:size=B", "--config.train.batch_size=64")  # the same call works when valid
    with pytest.raises(config_args.UsageError, match=message):
        _parse("--config=configs/par.py:size=B", flag)


def test_a_repeated_tuple_override_replaces_instead_of_concatenating():
    """ml_collections treats a repeated tuple override as elements of one tuple; every other flag's last value wins,
    and so does a tuple's here (launch scripts append overrides after the ones they were given)."""
    argv = ["prog", "--config=configs/par.py:size=B", "--config.model.grid_shape=(8, 8)",
            "--config.train.batch_size=8", "--config.model.grid_shape=(16,16)", "--config.train.batch_size=16"]
    fv = flags.FlagValues()  # ml_collections alone: the cause
    holder = config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert holder.value.model.grid_shape == (8, 8, 16, 16)
    config = config_args.parse_flags(argv, _define).config  # every par_jax command
    assert config.model.grid_shape == (16, 16) and config.train.batch_size == 16
    assert config_args.last_override_wins(argv[2:] + ["--workdir=a", "--workdir=b"]) == [
        "--config.model.grid_shape=(16,16)", "--config.train.batch_size=16", "--workdir=a", "--workdir=b"]


def test_config_mesh_rules_are_the_sharding_defaults():
    config = par.get_config("")
    assert config.mesh.rules.to_dict() == sharding.DEFAULT_RULES
    assert sharding.rules_from_config(config.mesh.rules) == sharding.rules_from_config()
