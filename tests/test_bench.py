"""The benchmark scripts run end to end on tiny shapes and write the JSON their docs describe (no timings asserted)."""

import json
import os
import pathlib

import pytest

from par_jax import ordering
from par_jax.bench import data as bench_data
from par_jax.bench import sample as bench_sample
from par_jax.bench import train as bench_train
from par_jax.bench.common import table_bandwidth
from par_jax.core import config_args

PAR = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "par.py")


def test_sample_bench_writes_rows_with_floors(tmp_path, capsys):
    out = tmp_path / "s.json"
    bench_sample.main(["bench", "--size=tiny", "--grid=4x4", "--n=1,4", "--vocab=64", "--num_classes=10", "--runs=3",
                       "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["n"] for r in result["results"]] == [1, 4]
    for r in result["results"]:
        assert r["steps"] == ordering.num_steps((4, 4), r["n"])
        assert len(r["s_per_batch_runs"]) == 3 and r["s_per_batch"] > 0
        forms = {"matmul=cpu_kernel", "matmul=xla,block_cols=0", "matmul=xla,block_cols=256"}
        assert set(r["matmul_floor_by_form_s"]) == forms and r["matmul_floor_s"] > 0
        assert r["matmul"] == "cpu_kernel" and r["xla_matmul_floor_s"] >= r["matmul_floor_s"]
        assert len(r["matmul_floor_runs"]) == 3  # timed in the same rounds as the sampler
        ratios = sorted(t / f for t, f in zip(r["s_per_batch_runs"], r["matmul_floor_runs"]))
        assert r["vs_matmul_floor"] == ratios[1]  # median of the per-round ratios
        assert r["vs_matmul_floor_of_medians"] == r["s_per_batch"] / r["matmul_floor_s"]
        assert r["weight_bytes_per_step"] > 0 and "torch_release_s_per_image_quoted" not in r  # only for B at 24x24
        assert r["attention"] == "cpu_kernel"  # float32 on one CPU device
        assert r["weights_GBps"] == r["weight_bytes_per_step"] * r["steps"] / r["s_per_batch"] / 1e9
        assert "vs_device_bandwidth" not in r  # a CPU has no vendor figure
        # The flops floor: the weight matmuls' FLOPs over the best BLAS rate measured in this process.
        assert r["blas"] == result["machine"]["blas"] and r["blas"]["flops_per_s"] > 1e8
        cfg_rows = 2  # batch 1, guided
        positions = ordering.num_steps((4, 4), r["n"]) - 1 + r["n"]  # every position fed once
        assert r["weight_matmul_flops"] >= 2 * cfg_rows * (positions - r["n"]) * r["weight_bytes_per_step"] // 4
        assert r["flops_floor_s"] == r["weight_matmul_flops"] / r["blas"]["flops_per_s"]
        assert r["physical_floor_s"] == max(r["flops_floor_s"], r["bandwidth_floor_s"])
        assert r["first_call_s"] > 0 and r["first_call_cpu_s"] > 0 and r["later_call_cpu_s"] > 0
        assert r["first_call_vs_median"] == r["first_call_s"] / r["s_per_batch"]
    one, four = result["results"]
    assert one["speedup_vs_n1"] == 1.0 and four["speedup_vs_n1"] == one["s_per_batch"] / four["s_per_batch"]
    assert four["step_ratio_vs_n1"] == one["steps"] / four["steps"] > 1
    assert "matmul floor" in capsys.readouterr().out


def test_sample_bench_times_a_baseline_attention_in_the_same_rounds(tmp_path, capsys):
    out = tmp_path / "s.json"
    bench_sample.main(["bench", "--size=tiny", "--grid=4x4", "--n=4", "--vocab=64", "--num_classes=10", "--runs=3",
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
    bench_train.main(["bench", "--sizes=tiny", "--batch=2", "--res=64", "--runs=3", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == "tiny" and row["tokens_per_step"] == 2 * 16 and 0 < row["mfu"] < 1


def test_benchmarks_take_the_experiment_config_like_every_job(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the config is read by path, from any directory
    # Sampling: the config's model and sample blocks are the defaults; an explicit flag wins.
    f = config_args.parse_flags(["bench", f"--config={PAR}:size=L,res=256", "--config.sample.guidance=2.5",
                                 "--dtype=float32"], bench_sample.define_flags)
    args = bench_sample.settings_from_flags(f)
    assert (args.size, args.n, args.grid, args.vocab, args.num_classes) == ("L", "4", (16, 16), 16384, 1000)
    assert (args.guidance, args.dtype) == (2.5, "float32")
    assert args.shape == {}  # configs/par.py names its size and sets nothing over it
    args = bench_sample.settings_from_flags(config_args.parse_flags(["bench"], bench_sample.define_flags))
    assert (args.size, args.n, args.grid, args.dtype) == ("B", "1,4,16", (24, 24), "float32")  # no config: flags
    assert args.shape == {}
    # A demo config: its decoder block (config.par), with the demo's own depth and width, not the named size's.
    video = str(pathlib.Path(PAR).with_name("demo_video.py"))
    args = bench_sample.settings_from_flags(config_args.parse_flags(["bench", f"--config={video}"],
                                                                    bench_sample.define_flags))
    assert (args.grid, args.vocab, args.num_classes, args.n, args.guidance) == ((5, 8, 8), 512, 10, "4", 3.0)
    assert args.shape == {"num_layers": 4, "num_heads": 4, "dim": 128}
    args = bench_sample.settings_from_flags(config_args.parse_flags(["bench", f"--config={video}", "--size=tiny"],
                                                                    bench_sample.define_flags))
    assert args.size == "tiny" and args.shape == {}  # an explicit --size wins, shape included
    # Training: one config per size; --sizes/--res/--n are the config's arguments, given once.
    f = config_args.parse_flags(["bench", f"--config={PAR}:size=B,n=16", "--res=128",
                                 "--config.model.remat=full"], bench_train.define_flags)
    (config,) = bench_train.experiments(f)
    assert (config.model.size, config.model.n, config.model.grid_shape, config.model.remat) == ("B", 16, (8, 8), "full")
    default = bench_train.experiments(config_args.parse_flags(["bench"], bench_train.define_flags))
    assert [(c.model.size, c.model.grid_shape) for c in default] == [("tiny", (16, 16)), ("B", (16, 16))]
    with pytest.raises(config_args.UsageError, match="size is given twice"):
        bench_train.experiments(config_args.parse_flags(["bench", f"--config={PAR}:size=B", "--sizes=L"],
                                                        bench_train.define_flags))
    with pytest.raises(config_args.UsageError, match="runs"):  # at least 3 timed runs
        config_args.parse_flags(["bench", "--runs=2"], bench_train.define_flags)


def test_data_bench_writes_codes_of_the_config_grid(tmp_path):
    out = tmp_path / "d.json"
    bench_data.main(["bench", f"--config={PAR}:res=128", "--records=64", "--batch=16", "--repeats=1",
                     "--read_threads=1", f"--out={out}"])
    result = json.loads(out.read_text())
    assert result["config"] == "configs/par.py:res=128" and result["grid"] == [8, 8]
    assert set(result["rows"]) == {"raw read", "train loader", "synthetic loader", "ten_crop views"}
    assert all(rate > 0 for rate in result["rows"].values())


def test_sample_bench_release_needs_a_checkout(tmp_path):
    with pytest.raises(config_args.UsageError, match="not a checkout of the PyTorch PAR release"):
        bench_sample.main(["bench", "--size=tiny", "--grid=4x4", "--n=4", f"--release={tmp_path}",
                           "--json", str(tmp_path / "s.json")])


@pytest.mark.skipif(not os.environ.get("PAR_RELEASE_DIR"),
                    reason="set PAR_RELEASE_DIR to a checkout of github.com/YuqingWang1029/PAR")
def test_sample_bench_times_the_release_on_the_same_weights(tmp_path, capsys):
    out = tmp_path / "s.json"
    bench_sample.main(["bench", "--size=tiny", "--grid=4x4", "--n=1,4", "--vocab=64", "--num_classes=10", "--runs=3",
                       "--floor_forms=sampler", f"--release={os.environ['PAR_RELEASE_DIR']}", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["args"]["release"] == os.path.basename(os.path.normpath(os.environ["PAR_RELEASE_DIR"]))
    for r in result["results"]:
        assert r["release_logits_max_abs_diff"] <= 1e-4 * r["release_logits_max_abs"]
        assert len(r["release_s_per_batch_runs"]) == 3  # in the same rounds as the sampler
        ratios = sorted(b / t for t, b in zip(r["s_per_batch_runs"], r["release_s_per_batch_runs"]))
        assert r["speedup_vs_release"] == ratios[1]
        assert "torch_release_s_per_image_quoted" not in r
    assert "release and par_jax logits agree" in capsys.readouterr().out


def test_release_logits_match_par_jax_and_notice_a_wrong_weight():
    directory = os.environ.get("PAR_RELEASE_DIR")
    if not directory:
        pytest.skip("set PAR_RELEASE_DIR to a checkout of github.com/YuqingWang1029/PAR")
    from par_jax.bench import release
    from par_jax.model import model_config
    cfg = model_config("tiny", n=4, grid_shape=(4, 4), vocab_size=64, num_classes=10, num_heads=4, dtype="float32")
    rel = release.Release(directory, cfg)
    model = rel.par_jax_model()
    diff, scale = release.max_logits_difference(rel, model)
    assert scale > 0.1 and diff <= 1e-5 * scale
    model.norm.weight[...] = model.norm.weight[...] * 1.01  # one parameter off by 1%
    diff, scale = release.max_logits_difference(rel, model)
    assert diff > 1e-3 * scale
