"""The benchmark scripts run end to end on tiny shapes and write the JSON their docs describe (no timings asserted)."""

import json

from par_jax import ordering
from par_jax.bench import sample as bench_sample
from par_jax.bench import train as bench_train
from par_jax.bench.common import table_bandwidth


def test_sample_bench_writes_rows_with_floors(tmp_path, capsys):
    out = tmp_path / "s.json"
    bench_sample.main(["--size=tiny", "--grid=4x4", "--n=1,4", "--vocab=64", "--num_classes=10", "--runs=3",
                       "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["n"] for r in result["results"]] == [1, 4]
    for r in result["results"]:
        assert r["steps"] == ordering.num_steps((4, 4), r["n"])
        assert len(r["s_per_batch_runs"]) == 3 and r["s_per_batch"] > 0
        assert set(r["matmul_floor_by_form_s"]) >= {"block_cols=0"} and r["matmul_floor_s"] > 0
        assert len(r["matmul_floor_runs"]) == 3  # timed in the same rounds as the sampler
        ratios = sorted(t / f for t, f in zip(r["s_per_batch_runs"], r["matmul_floor_runs"]))
        assert r["vs_matmul_floor"] == ratios[1]  # median of the per-round ratios
        assert r["vs_matmul_floor_of_medians"] == r["s_per_batch"] / r["matmul_floor_s"]
        assert r["weight_bytes_per_step"] > 0 and "torch_release_s_per_image" not in r  # only for B at 24x24
        assert r["attention"] == "cpu_kernel"  # float32 on one CPU device
        assert r["weights_GBps"] == r["weight_bytes_per_step"] * r["steps"] / r["s_per_batch"] / 1e9
        assert "vs_device_bandwidth" not in r  # a CPU has no vendor figure
    one, four = result["results"]
    assert one["speedup_vs_n1"] == 1.0 and four["speedup_vs_n1"] == one["s_per_batch"] / four["s_per_batch"]
    assert four["step_ratio_vs_n1"] == one["steps"] / four["steps"] > 1
    assert "matmul floor" in capsys.readouterr().out


def test_sample_bench_times_a_baseline_attention_in_the_same_rounds(tmp_path, capsys):
    out = tmp_path / "s.json"
    bench_sample.main(["--size=tiny", "--grid=4x4", "--n=4", "--vocab=64", "--num_classes=10", "--runs=3",
                       "--floor_forms=sampler", "--attention=cpu_kernel", "--baseline_attention=xla",
                       "--json", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert (r["attention"], r["baseline_attention"]) == ("cpu_kernel", "xla")
    assert len(r["baseline_s_per_batch_runs"]) == 3
    ratios = sorted(t / b for t, b in zip(r["s_per_batch_runs"], r["baseline_s_per_batch_runs"]))
    assert r["vs_baseline"] == ratios[1]
    assert "with xla" in capsys.readouterr().out


def test_sample_bench_without_n1_reports_no_speedup(tmp_path):
    rows = [{"n": 4, "s_per_batch": 2.0, "steps": 8}, {"n": 16, "s_per_batch": 1.0, "steps": 3}]
    bench_sample.add_speedups(rows)
    assert all("speedup_vs_n1" not in r for r in rows)
    rows.append({"n": 1, "s_per_batch": 6.0, "steps": 16})
    bench_sample.add_speedups(rows)
    assert [r["speedup_vs_n1"] for r in rows] == [3.0, 6.0, 1.0]
    assert [r["step_ratio_vs_n1"] for r in rows] == [2.0, 16 / 3, 1.0]


def test_device_bandwidth_table_matches_specific_names_first():
    assert table_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert table_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert table_bandwidth("NVIDIA H200") == 4.8e12
    assert table_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert table_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert table_bandwidth("TPU v5 lite") == 0.819e12 and table_bandwidth("TPU v5p") == 2.765e12
    assert table_bandwidth("cpu") is None and table_bandwidth("Some Future Chip") is None


def test_train_bench_writes_mfu(tmp_path):
    out = tmp_path / "t.json"
    bench_train.main(["--sizes=tiny", "--batch=2", "--res=64", "--runs=3", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == "tiny" and row["tokens_per_step"] == 2 * 16 and 0 < row["mfu"] < 1
