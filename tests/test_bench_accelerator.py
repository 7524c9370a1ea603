"""bench.accelerator in CPU tiny mode: the JSON's structure, its numbers' consistency, the budget and the targets."""

import json
import statistics

import pytest

from par_jax import ordering
from par_jax.bench import accelerator
from par_jax.core import config_args


def test_tiny_run_writes_consistent_rows_and_evaluates_targets(tmp_path):
    out = tmp_path / "acc"
    accelerator.main(["acc", f"--out={out}", "--tiny", "--sizes=XL", "--n=1,4", "--batches=1", "--parts=sample",
                      "--runs=3"])
    result = json.loads((out / "accelerator.json").read_text())
    assert str(tmp_path) not in (out / "accelerator.json").read_text()  # no path of this machine
    assert result["setup"]["tiny"] and result["setup"]["grid"] == [8, 8] and result["setup"]["dtype"] == "bfloat16"
    assert not result["skipped"] and not result["failed"]
    four, one = result["sampler"]  # the target's row (n=4) runs first
    assert (four["n"], one["n"]) == (4, 1) and four["size"] == "tiny" and four["role"] == "XL"
    for r in (four, one):
        assert r["steps"] == ordering.num_steps((8, 8), r["n"]) and r["dtype"] == "bfloat16"
        assert len(r["s_per_batch_runs"]) == 3 and r["s_per_batch"] == statistics.median(r["s_per_batch_runs"])
        assert r["images_per_s"] == r["batch"] / r["s_per_batch"] and r["s_per_image"] == r["s_per_batch"]
        assert r["weights_GBps"] == pytest.approx(r["steps"] * r["weight_bytes_per_step"] / r["s_per_batch"] / 1e9)
        assert r["of_bandwidth"] == pytest.approx(r["weights_GBps"] / r["bandwidth_GBps"])
        assert r["bandwidth_floor_s"] * r["vs_bandwidth_floor"] == pytest.approx(r["s_per_batch"])
    assert four["speedup_vs_n1"] == one["s_per_batch"] / four["s_per_batch"] and one["speedup_vs_n1"] == 1.0
    assert four["step_ratio_vs_n1"] == 64 / 19
    by_name = {t["target"]: t for t in result["targets"]}
    assert len(by_name) == 7
    speedup = by_name["PAR-XL speed-up n=4 over n=1, batch 1"]
    assert speedup["value"] == four["speedup_vs_n1"] and speedup["met"] == (speedup["value"] >= 3.8)
    assert "mechanics" in speedup["note"]  # tiny mode is never a verdict
    throughput = by_name["PAR-XL-4x images/s, batch 1"]  # the largest batch run stands in for 64
    assert throughput["met"] == (four["images_per_s"] >= 40) and "batch 64" in throughput["note"]
    assert by_name["PAR-3B-4x s/image, batch 1"]["met"] is None  # not run: not measured, not "not met"
    assert by_name["PAR-XL train step MFU"]["met"] is None
    md = (out / "accelerator.md").read_text()
    assert "CPU tiny mode" in md and "| XL (tiny) | 4 | 1 | 19 |" in md and "not measured" in md


def test_budget_skips_in_order_of_importance_and_still_writes(tmp_path):
    out = tmp_path / "acc"
    accelerator.main(["acc", f"--out={out}", "--tiny", "--budget_s=0"])
    result = json.loads((out / "accelerator.json").read_text())
    assert result["sampler"] == [] and result["train"] is None and result["logits"] is None
    names = [s["job"] for s in result["skipped"]]
    assert names[:3] == ["sample 3B n=4 batch 1", "sample XL n=4 batch 64", "train XL"]
    assert len(names) == 2 * 3 * 2 + 2 and all("budget" in s["reason"] for s in result["skipped"])
    assert all(t["met"] is None for t in result["targets"])
    assert "Skipped: sample 3B n=4 batch 1" in (out / "accelerator.md").read_text()


def _result(device_kind, rows, train=None):
    return {"machine": {"device_kind": device_kind, "copy_bandwidth_GBps": 10.0},
            "setup": {"tiny": False, "batches": [1, 64]}, "sampler": rows, "train": train}


def test_targets_scale_the_3b_time_by_bandwidth_and_compare_speedups():
    rows = [{"role": "3B", "n": 4, "batch": 1, "s_per_image": 0.3, "speedup_vs_n1": 3.9, "step_ratio_vs_n1": 3.92},
            {"role": "3B", "n": 16, "batch": 1, "s_per_image": 0.1, "speedup_vs_n1": 10.0, "step_ratio_vs_n1": 11.3},
            {"role": "XL", "n": 4, "batch": 64, "images_per_s": 41.0}]
    h100 = {t["target"]: t for t in accelerator.targets(_result("NVIDIA H100 80GB HBM3", rows, {"mfu": 0.39,
                                                                                                  "device_batch": 8}))}
    assert h100["PAR-3B-4x s/image, batch 1"]["threshold"] == 0.4 and h100["PAR-3B-4x s/image, batch 1"]["met"]
    assert h100["PAR-3B speed-up n=4 over n=1, batch 1"]["met"] is True
    assert h100["PAR-3B speed-up n=16 over n=1, batch 1"]["met"] is False
    assert h100["PAR-XL speed-up n=4 over n=1, batch 1"]["met"] is None
    assert h100["PAR-XL-4x images/s, batch 64"]["met"] is True and h100["PAR-XL train step MFU"]["met"] is False
    h200 = {t["target"]: t for t in accelerator.targets(_result("NVIDIA H200", rows))}
    t = h200["PAR-3B-4x s/image, batch 1"]
    assert t["threshold"] == pytest.approx(0.4 * 3.35 / 4.8) and t["met"] is False and "H200" in t["note"]


@pytest.mark.parametrize("flag, message", [("--sizes=XXL", "--sizes"), ("--n=3", "--n"), ("--batches=0", "--batches"),
                                           ("--parts=eval", "--parts")])
def test_bad_flags_are_usage_errors(flag, message):
    with pytest.raises(config_args.UsageError, match=message):
        accelerator.settings(config_args.parse_flags(["acc", "--tiny", flag], accelerator.define_flags))


def test_logits_compare_bfloat16_with_float32_on_the_same_weights():
    setup = accelerator.Setup(True, {"XL": "tiny", "3B": "tiny"}, (4, 4), 64, 10, (1,), (4,), 64, 1)
    r = accelerator.logits_row(setup)
    assert r["positions"] == 16 and r["size"] == "tiny"
    assert 0 < r["mean_abs_diff"] <= r["max_abs_diff"]  # the two dtypes really ran
    # Same weights: bfloat16 rounding only, far below the logits' spread (other weights would differ by about it).
    assert r["max_abs_diff"] < 0.1 * r["float32_logits_std"]
    assert r["kl_max"] >= r["kl_mean"] >= 0 and 0.9 <= r["top1_agreement"] <= 1


def test_rows_over_the_device_memory_are_skipped_and_failures_recorded(tmp_path, monkeypatch):
    # A device with 1 MiB: every sampler row is skipped for memory, and the train step, whose batch search finds no
    # batch that fits, is recorded as failed while the run goes on and writes its files.
    monkeypatch.setattr(accelerator, "device_memory", lambda: {"bytes_limit": 2**20, "peak_bytes_in_use": 2**19})
    monkeypatch.setattr(accelerator, "TRAIN_DEVICE_BATCHES", (2, 1))  # fewer estimates to make
    out = tmp_path / "acc"
    accelerator.main(["acc", f"--out={out}", "--tiny", "--sizes=XL", "--n=4", "--batches=1", "--parts=sample,train"])
    result = json.loads((out / "accelerator.json").read_text())
    assert [s["job"] for s in result["skipped"]] == ["sample XL n=4 batch 1"]
    assert "of the device's" in result["skipped"][0]["reason"]
    (failed,) = result["failed"]
    assert failed["job"] == "train XL" and "MemoryError" in failed["error"]
    assert result["memory"]["peak_bytes"] == 2**19 and "memory_stats" in result["memory"]["source"]


def test_sampler_rows_run_on_one_chip_of_a_host_with_several(tmp_path):
    """A TPU VM or GPU node has several local devices; the batch-1 rows must still run (on the first one)."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "acc"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    code = ("import sys, jax; from par_jax.bench import accelerator; assert jax.local_device_count() == 2; "
            "assert accelerator.one_chip().devices.size == 1; accelerator.main(sys.argv)")
    subprocess.run([sys.executable, "-c", code, f"--out={out}", "--tiny", "--sizes=XL", "--n=4", "--batches=1",
                    "--parts=sample", "--runs=3"], env=env, check=True, cwd=repo, capture_output=True)
    result = json.loads((out / "accelerator.json").read_text())
    assert not result["failed"] and [r["batch"] for r in result["sampler"]] == [1]
