"""The TPU projection tool's logic on this CPU: the sampler's program compiled for the CPU device, its cost counted
for every step of its scans, the floor arithmetic, the JSON and table, "does not fit", and its clear errors."""

import json

import jax
import pytest

from par_jax.bench import project
from par_jax.core import config_args
from par_jax.model import model_config
from par_jax.model.transformer import ParTransformer
from flax import nnx


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run for the CPU: tiny PAR-4x, 4x4 tokens, batch 1 guided, one scan per step width, 1 KiB of 'HBM'."""
    out = tmp_path_factory.mktemp("project")
    rows = project.main(["project", "--accelerator=cpu", "--size=tiny", "--n=4", "--batch=1", "--grid=4x4",
                         "--cache_chunks=1", "--hbm_gib=0.000001", f"--json={out / 'p.json'}",
                         f"--markdown={out / 'p.md'}"])
    return rows, json.loads((out / "p.json").read_text()), (out / "p.md").read_text()


def matmul_flops(cfg, rows: int) -> int:
    """2 x rows x every position fed x the weights of all matrices (layers and vocabulary head)."""
    state = nnx.state(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    matrices = sum(x.size for path, x in nnx.to_flat_state(state) if x.ndim >= 2 and "embed" not in str(path[-2:])
                   and "transition" not in str(path))
    return 2 * rows * cfg.layout.seq_len * matrices


def test_cost_counts_every_step_of_every_scan(run):
    rows, _, _ = run
    (r,) = rows
    cfg = model_config("tiny", n=4, grid_shape=(4, 4), dtype="bfloat16")
    scans = r["cost_details"]["scans"]
    assert [(s["width"], s["trips"]) for s in scans] == [(1, 4), (4, 3)]  # 4 + 12/4 = 7 steps
    expected = matmul_flops(cfg, rows=2)  # guided: 2 rows per image
    # XLA alone counts each scan's body once; with (trips - 1) bodies added it covers the matmuls of every step,
    # plus a little attention and sampling.
    assert r["cost_details"]["uncorrected"]["flops"] < 0.6 * expected
    assert expected <= r["flops"] < 1.3 * expected
    assert r["flops"] == pytest.approx(r["cost_details"]["uncorrected"]["flops"]
                                       + sum((s["trips"] - 1) * s["flops"] for s in scans))
    assert r["bytes_accessed"] > r["cost_details"]["uncorrected"]["bytes"] > 0


def test_memory_and_does_not_fit(run):
    rows, saved, table = run
    (r,) = rows
    assert r["label"] == saved["label"] == "projection" and saved["rows"] == json.loads(json.dumps(rows))
    parts = r["parts_gib"]
    assert parts["arguments"] > 0 and r["program_gib"] == pytest.approx(sum(parts.values()))
    assert r["fits"] is False and r["note"].startswith("does not fit")  # 1 KiB is less than any program
    assert r["floor_s_per_image"] is None and r["bound"] is None  # a CPU has no published figures
    assert "projection" in table and "| cpu | PAR-tiny-4x | 1, cfg 1.5 | 7 |" in table and "**no**" in table


def test_floor_is_the_slower_of_bandwidth_and_compute():
    assert project.floor(2e9, 1e12, 1e12, 1e15) == (2e-3, "bandwidth")
    assert project.floor(1e6, 1e15, 1e12, 1e15) == (1.0, "compute")
    assert project.floor(1e6, 1e15, None, 1e15) == (None, None)


def test_out_of_memory_compile_error_gives_the_figure():
    # The message libtpu 0.0.42.1 gives for a v5e program that does not fit (PAR-3B-4x at batch 64 guided: 33.0G).
    error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                       "HLO temporaries (60.31G) exceeds available HBM (15.75G).")
    assert project.memory.oom_temporaries(error) == int(60.31 * 2**30)
    assert project.memory.oom_temporaries(jax.errors.JaxRuntimeError("INTERNAL: something else")) is None


def test_tpu_without_libtpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(project.memory, "tpu_compiler_available", lambda: False)
    with pytest.raises(config_args.UsageError, match="needs libtpu.*pip install"):
        project.main(["project", "--accelerator=v5e", "--size=tiny"])
    with pytest.raises(config_args.UsageError, match="unknown 'v9'"):
        project.main(["project", "--accelerator=v9", "--size=tiny"])
    with pytest.raises(config_args.UsageError, match="--size"):
        project.main(["project", "--accelerator=cpu", "--size=XS"])
