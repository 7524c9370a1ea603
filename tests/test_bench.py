"""The benchmark scripts run end to end on tiny shapes and write the JSON their docs describe (no timings asserted)."""

import json

from par_jax import ordering
from par_jax.bench import sample as bench_sample
from par_jax.bench import train as bench_train


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


def test_train_bench_writes_mfu(tmp_path):
    out = tmp_path / "t.json"
    bench_train.main(["--sizes=tiny", "--batch=2", "--res=64", "--runs=3", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == "tiny" and row["tokens_per_step"] == 2 * 16 and 0 < row["mfu"] < 1
