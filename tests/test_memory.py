"""The memory check (par_jax.training.memory): slice names, the parameter arithmetic against count_params and the
paper's sizes, JAX's own shard shapes, and the estimate against XLA's memory analysis of the real train step
compiled on this CPU."""

import math
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from configs import par
from par_jax.model import count_params, model_config
from par_jax.core import sharding
from par_jax.training import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
RULES = sharding.rules_from_config()


@pytest.mark.parametrize("name, devices, topology, chip_config, hbm_gib", [
    ("v5p-64", 32, "v5p:2x4x4", "megacore", 95),
    ("v5p-8", 4, "v5p:2x2x1", "megacore", 95),
    ("v4-32", 16, "v4:2x2x4", "megacore", 32),
    ("v4-128", 64, "v4:4x4x4", "megacore", 32),
    ("v5litepod-8", 8, "v5e:2x4", "default", 16),
    ("v6e-16", 16, "v6e:4x4", "default", 32),
    ("v6e-256", 256, "v6e:16x16", "default", 32),
])
def test_tpu_slices(name, devices, topology, chip_config, hbm_gib):
    acc = memory.accelerator(name)
    assert (acc.platform, acc.num_devices, acc.topology, acc.chip_config, acc.hbm_bytes) == (
        "tpu", devices, topology, chip_config, hbm_gib * GiB)


def test_gpus_and_bad_names():
    acc = memory.accelerator("h100-80gb-x16")
    assert (acc.platform, acc.num_devices, acc.topology) == ("gpu", 16, None)
    for bad in ("v9-8", "v5p", "h100-x8", "v5p-6"):
        with pytest.raises(ValueError, match="unknown accelerator|standard slice"):
            memory.accelerator(bad)


@pytest.mark.parametrize("size, n, paper_count", [("XL", 4, 774_703_360), ("3B", 1, 3_096_659_200)])
def test_unsharded_state_is_four_bytes_per_parameter(size, n, paper_count):
    cfg = model_config(size, n=n, grid_shape=(24, 24), remat="full")
    assert count_params(cfg) == paper_count
    r = memory.estimate(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, RULES, global_batch=1, ema=True)
    assert r.parts["params"] == 4 * paper_count
    assert r.parts["optimizer"] == 8 * paper_count        # AdamW: two float32 moments
    assert r.parts["gradients"] == r.parts["ema"] == 4 * paper_count


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2), (1, 4, 4)])
def test_sharded_parameters_match_jax_shard_shapes(mesh):
    cfg = model_config("B", n=4, grid_shape=(16, 16))
    shape = dict(zip(("data", "fsdp", "tensor"), mesh))
    r = memory.estimate(cfg, shape, RULES, global_batch=64, grad_accum=2)
    abstract_mesh = AbstractMesh(mesh, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    want = 0
    for path, (full, dtype, _) in memory.shard_factors(cfg, shape, RULES).items():
        names = dict(memory._flat(sharding.logical_specs(memory._abstract_model(cfg)[1]),
                                  is_leaf=sharding.is_logical_names))[path]
        spec = sharding.logical_to_mesh(names, full, abstract_mesh, RULES)
        want += math.prod(NamedSharding(abstract_mesh, spec).shard_shape(full)) * 4
    assert r.parts["params"] == want
    assert r.parts["params"] < 4 * count_params(cfg) / (mesh[1] * mesh[2]) * 1.05  # all but the tiny tables split
    assert r.parts["gradients"] == 2 * want  # the accumulator beside the micro-batch gradient
    assert r.device_batch == 64 // (mesh[0] * mesh[1] * 2)


def _tiny(remat):
    config = par.get_config("runlocal")
    config.model.update(grid_shape=(8, 8), remat=remat)
    config.train.update(batch_size=16, grad_accum_steps=1)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


@pytest.fixture(scope="module")
def compiled_on_cpu():
    """XLA's memory analysis of the real train step (tiny model, one CPU device), without and with remat."""
    cpu = memory.Accelerator("cpu-x1", "cpu", 1, 64 * GiB)
    return {remat: memory.compiled(_tiny(remat), cpu, devices=jax.devices()[:1]) for remat in ("none", "full")}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_estimate_agrees_with_the_compiled_train_step(remat, compiled_on_cpu):
    """The compiled program's arguments are exactly the state, and the estimated total is within 20%."""
    got = compiled_on_cpu[remat]
    est = memory.check(_tiny(remat), "h100-80gb-x1", "estimate")
    state = est.parts["params"] + est.parts["optimizer"]
    batch = 16 * (64 + 1) * 4
    assert state <= got.parts["arguments"] <= state + batch + 64  # + the batch and a few scalar counters
    assert got.method == "compiled" and est.method == "estimate"
    assert abs(est.total - got.total) < 0.2 * got.total, (est.line(), got.line())


def test_remat_lowers_activation_memory_in_both_methods(compiled_on_cpu):
    estimated = [memory.check(_tiny(r), "h100-80gb-x1", "estimate").parts["activations"] for r in ("none", "full")]
    assert compiled_on_cpu["full"].total < compiled_on_cpu["none"].total
    assert estimated[1] < estimated[0] / 1.5


def test_paper_sizes_report_in_gib_with_the_method_named():
    config = par.get_config("size=XXL")
    config.model.remat = "full"
    r = memory.check(config, "v5p-64", "estimate")
    assert (r.global_batch, r.device_batch, r.mesh) == (512, 16, {"data": 1, "fsdp": 32, "tensor": 1})
    assert r.fits and 1 * GiB < r.total < r.hbm
    line = r.line()
    assert "estimate" in line and "v5p-64" in line and "fits" in line


def test_command_line(tmp_path):
    # From another directory, the config given by path; a mistyped accelerator is a short error with status 2.
    config = f"--config={REPO}/configs/par.py:size=XL"
    proc = subprocess.run([sys.executable, "-m", "par_jax.training.memory", config,
                           "--accelerator=v5p-32,h100-80gb-x16", "--method=estimate"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("XL on v5p-32") and lines[1].startswith("XL on h100-80gb-x16")
    assert all("[estimate;" in line for line in lines)
    proc = subprocess.run([sys.executable, "-m", "par_jax.training.memory", config, "--accelerator=v9-8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown accelerator 'v9-8'" in proc.stderr and "Traceback" not in proc.stderr


def test_table_builds_each_size_from_the_given_config_file(capsys):
    module = par
    rows = memory.table(lambda size: module.get_config(f"size={size},res=256"), methods=("estimate",),
                        remats=("full",), rows=(("XL", 16),), log=lambda line: None)
    (row,) = rows
    assert (row["size"], row["devices"], row["batch"], row["remat"]) == ("XL", 16, 256, "full")
    assert row["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1} and 0 < row["estimate"]["gib"] < 95
    assert "PAR-XL | 16 | 256 (16)" in memory.markdown(rows)


def test_table_rows_are_chosen_by_name_and_merged_into_the_saved_table():
    assert memory.parse_rows(["3B:64", "XXL:32"]) == (("3B", 64), ("XXL", 32))
    assert memory.parse_rows([]) == memory.TABLE_ROWS
    with pytest.raises(ValueError, match="unknown table row 'XXL:16'.*XL:16"):
        memory.parse_rows(["XXL:16"])
    old = [{"size": s, "devices": d, "remat": m, "compiled": {"gib": 1.0}} for s, d in memory.TABLE_ROWS
           for m in ("none", "full")]
    new = [{"size": "3B", "devices": 32, "remat": m, "compiled": {"gib": 2.0}} for m in ("full", "none")]
    merged = memory.merge_rows(old, new)
    assert [(r["size"], r["devices"], r["remat"]) for r in merged] == [(r["size"], r["devices"], r["remat"])
                                                                         for r in old]
    assert [r["compiled"]["gib"] for r in merged] == [2.0 if r["size"] == "3B" and r["devices"] == 32 else 1.0
                                                      for r in old]


def test_offline_tpu_compile_needs_its_environment_set_by_the_caller(monkeypatch):
    """The library reads, never writes, the libtpu environment (the command line sets it before any TPU use)."""
    acc = memory.accelerator("v5p-8")
    env = memory.offline_tpu_env(acc)
    assert env == {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost"}
    for var in env:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(memory, "tpu_compiler_available", lambda: True)
    with pytest.raises(RuntimeError, match="TPU_ACCELERATOR_TYPE, TPU_SKIP_MDS_QUERY, TPU_WORKER_HOSTNAMES"):
        memory.target_devices(acc)
    assert not set(env) & set(os.environ)


@pytest.mark.skipif(not memory.tpu_compiler_available(), reason="libtpu not installed (pip install 'jax[tpu]')")
def test_compiles_offline_for_a_tpu_topology(monkeypatch):
    for var, value in memory.offline_tpu_env(memory.accelerator("v5p-8")).items():
        monkeypatch.setenv(var, value)
    config = _tiny("none")
    config.mesh.update(data=-1)
    r = memory.check(config, "v5p-8", "auto")
    assert r.method == "compiled" and r.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert 0 < r.total < GiB and r.fits
