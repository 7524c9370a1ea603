"""The ablation grid (configs/reproduce.py, par_jax/reproduce.py): each cell builds the layout it claims, the cells
differ only in their order fields, the interval arithmetic, and the quick variant through the real entry point."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from par_jax import ordering, reproduce
from par_jax.core import config_args
from par_jax.model import from_config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "reproduce.py")
ORDER_FIELDS = {"n", "order_kind", "sequential_prefix", "intra_group"}


@pytest.fixture(scope="module")
def config():
    return config_args.load_config(CONFIG)


@pytest.fixture(scope="module")
def layouts(config, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    return {name: from_config_dict(reproduce.cell_config(config, name, 0, root).model).layout
            for name in config.cells}


def widths(layout):
    return [e - s for s, e in layout.step_bounds()]


def generated(layout):
    """The raster indices predicted at each step."""
    return [layout.perm[s:e] for s, e in layout.step_bounds()]


def test_every_table4_cell_is_in_the_grid(config):
    assert set(config.cells) == {"raster_one", "distant_one", "raster_multi", "distant_multi", "no_prefix",
                                 "causal_group", "distant_multi16"}
    assert config.reproduce.seeds == "0,1,2"  # at least 3 seeds
    # The grid runs and reports in the paper's order, not the alphabetical one a ConfigDict iterates in.
    assert reproduce._names(config.reproduce.cells, list(config.cells), "cells") == [
        "raster_one", "distant_one", "raster_multi", "distant_multi", "no_prefix", "causal_group", "distant_multi16"]


def test_cells_differ_only_in_their_order_fields_and_seed(config, tmp_path):
    base = reproduce.cell_config(config, "distant_multi", 0, tmp_path).to_dict()
    for name in config.cells:
        for seed in (0, 2):
            cell = reproduce.cell_config(config, name, seed, tmp_path).to_dict()
            assert cell["train"] == base["train"] and cell["optimizer"] == base["optimizer"]
            assert {k for k in cell["model"] if cell["model"][k] != base["model"][k]} <= ORDER_FIELDS
            assert (cell["seed"], cell["data"]["seed"], cell["eval"]["seed"]) == (seed,) * 3
            assert cell["data"]["codes_dir"] == base["data"]["codes_dir"]  # the same data
            assert {k: v for k, v in cell["eval"].items() if k not in ("seed", "checkpoint")} == \
                {k: v for k, v in base["eval"].items() if k not in ("seed", "checkpoint")}


def test_raster_one_is_plain_raster_one_token_per_step(layouts):
    lay = layouts["raster_one"]
    n_tok = lay.spec.num_tokens
    assert np.array_equal(lay.perm, np.arange(n_tok)) and widths(lay) == [1] * n_tok
    assert np.array_equal(lay.attention_mask(), np.tril(np.ones((n_tok, n_tok), bool)))


def test_distant_one_decodes_one_token_per_step_in_pars_permutation(layouts):
    lay, par = layouts["distant_one"], layouts["distant_multi"]
    n_tok = lay.spec.num_tokens
    assert np.array_equal(lay.perm, ordering.region_order(lay.spec.grid_shape, 4))
    assert np.array_equal(lay.perm, par.perm)
    assert widths(lay) == [1] * n_tok and lay.num_steps == n_tok
    assert not (lay.input_kind == ordering.TRANSITION).any()  # no parallel step, so no transition token is fed
    assert np.array_equal(lay.attention_mask(), np.tril(np.ones((n_tok, n_tok), bool)))


def test_raster_multi_feeds_consecutive_raster_tokens(layouts):
    lay = layouts["raster_multi"]
    h, w = lay.spec.grid_shape
    assert widths(lay) == [1] * 4 + [4] * (h * w // 4 - 1)
    for tokens in generated(lay)[4:]:
        rows, cols = np.divmod(tokens, w)
        assert np.all(np.diff(tokens) == 1) and len(set(rows)) == 1, tokens  # adjacent, in one row
        assert np.all(np.diff(cols) == 1)


def test_distant_multi_generates_one_token_per_region(layouts):
    for name, n in (("distant_multi", 4), ("distant_multi16", 16)):
        lay = layouts[name]
        h, w = lay.spec.grid_shape
        s = math.isqrt(n)
        assert widths(lay) == [1] * n + [n] * (h * w // n - 1)
        for tokens in generated(lay)[n:]:
            rows, cols = np.divmod(tokens, w)
            regions = set(zip(rows // (h // s), cols // (w // s)))
            assert len(regions) == n, (name, tokens)  # one token in each region, far apart


def test_no_prefix_differs_from_distant_multi_only_in_the_first_group(layouts):
    par, ablation = layouts["distant_multi"], layouts["no_prefix"]
    n_tok = par.spec.num_tokens
    assert np.array_equal(par.perm, ablation.perm)
    assert widths(ablation) == [4] * (n_tok // 4)   # the first 4 tokens in parallel too: one step fewer ...
    assert widths(par)[:4] == [1] * 4 and widths(par)[4:] == widths(ablation)[1:]   # ... the rest alike
    assert np.array_equal(np.concatenate(generated(par)[:4]), generated(ablation)[0])
    for a, b in zip(generated(par)[4:], generated(ablation)[1:]):
        assert np.array_equal(a, b)
    first = ablation.input_kind[:4]  # [cls] M_1 M_2 M_3 predict t_0 .. t_3 at once
    assert first[0] == ordering.CLS and np.all(first[1:] == ordering.TRANSITION)
    assert ablation.num_steps == par.num_steps - 3


def test_causal_group_differs_from_distant_multi_only_inside_groups(layouts):
    par, ablation = layouts["distant_multi"], layouts["causal_group"]
    for field in ("perm", "input_kind", "input_index", "group"):
        assert np.array_equal(getattr(par, field), getattr(ablation, field)), field
    diff = par.attention_mask() != ablation.attention_mask()
    q, k = np.nonzero(diff)
    sizes = np.bincount(par.group)  # a group of c positions loses the c(c-1)/2 keys above the diagonal
    assert len(q) == sum(c * (c - 1) // 2 for c in sizes) and 6 * (par.num_steps - 4) <= len(q)
    assert np.all(par.group[q] == par.group[k]) and np.all(k > q)
    assert np.all(par.attention_mask()[diff]) and not np.any(ablation.attention_mask()[diff])


def test_distant_one_decodes_like_the_training_forward():
    """The cached sampler, fed the tokens (teacher forced), gives the training forward's logits for the new order."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from par_jax.model import ParTransformer, model_config  # noqa: PLC0415
    from par_jax.sampling import SampleSettings, Sampler  # noqa: PLC0415

    cfg = model_config("tiny", n=4, grid_shape=(4, 4), order_kind="region_sequential", vocab_size=32,
                       num_classes=3, dtype="float32", init_std=0.2)
    model = ParTransformer(cfg, rngs=nnx.Rngs(0))
    model.output[...] = jax.random.normal(jax.random.key(1), model.output.shape) * 0.2  # the head starts at zero
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 16), 0, 32))
    labels = np.array([1, 3], np.int32)
    sampler = Sampler(model, SampleSettings(), 2, teacher_forced=True)
    _, forward = model(jnp.asarray(tokens), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(sampler.score(tokens, labels)), np.asarray(forward), atol=1e-4, rtol=0)


def test_region_sequential_refuses_a_parallel_first_group():
    with pytest.raises(ValueError, match="region_sequential"):
        ordering.OrderSpec((8, 8), 4, kind="region_sequential", sequential_prefix=False)


def test_mean_interval_matches_the_t_formula_and_covers_the_mean():
    s = reproduce.mean_interval([1.0, 2.0, 3.0])
    assert s["mean"] == pytest.approx(2.0) and s["seeds"] == 3
    # s = 1 with 2 degrees of freedom: t(0.975, 2) = 4.3027 (Student's table)
    assert s["half_width"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert s["low"] == pytest.approx(2.0 - s["half_width"]) and s["high"] == pytest.approx(2.0 + s["half_width"])
    assert reproduce.mean_interval([5.0])["half_width"] is None  # one seed: no interval
    assert reproduce.mean_interval([5.0, 5.0])["half_width"] == 0.0
    # Coverage: 95% intervals from 3 normal draws contain the true mean about 95% of the time.
    rng = np.random.default_rng(0)
    hits = [abs(d["mean"] - 1.5) <= d["half_width"] for d in
            (reproduce.mean_interval(rng.normal(1.5, 2.0, 3)) for _ in range(2000))]
    assert 0.93 < np.mean(hits) < 0.97
    wider = reproduce.mean_interval([1.0, 2.0, 3.0], confidence=0.99)["half_width"]
    assert wider > s["half_width"]


def test_report_aggregates_seeds_and_maps_the_decoders_entropy_increase(config, tmp_path):
    rng = np.random.default_rng(0)
    cells, seeds = ["raster_one", "raster_multi", "distant_one", "distant_multi"], [0, 1, 2]
    maps = {name: rng.uniform(1, 3, 64) for name in cells}
    written = {}
    for name in cells:
        for seed in seeds:
            metrics = {m: float(rng.normal(10, 1)) for m in reproduce.METRICS}
            written.setdefault(name, []).append(metrics)
            entropy = maps[name] + (seed - 1) * 0.1  # the seeds average back to maps[name]
            folder = tmp_path / "cells" / name / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps(
                {"metrics": metrics, "entropy_map": entropy.tolist(), "grid_shape": [8, 8], "num_steps": 7,
                 "samples_grid": f"cells/{name}/seed{seed}/grid.png"}))
            (folder / "grid.png").write_bytes(f"{name} {seed}".encode())
            (folder / "phase.json").write_text(json.dumps({"seconds": 60.0 * (seed + 1)}))  # mean: 2 minutes
            rescored = folder / "eval" / "samples3000"  # the evaluate job again with more samples: 6 s more
            rescored.mkdir(parents=True)
            metrics_3000 = {m: metrics[m] + 0.5 * seed for m in reproduce.SAMPLE_METRICS}
            (rescored / "phase.json").write_text(json.dumps({"seconds": 6.0, "metrics": metrics_3000}))
            written[name][-1].update({f"{m}_3000": v for m, v in metrics_3000.items()})
    for k, name in enumerate(reproduce.SHARED):  # the shared phases' records: 10, 20, 30, 40 s
        (tmp_path / name).mkdir()
        (tmp_path / name / "phase.json").write_text(json.dumps({"seconds": 10.0 * (k + 1)}))
    reproduce.report(config, tmp_path, cells, seeds)
    out = json.loads((tmp_path / "report" / "results.json").read_text())
    assert config.reproduce.rescore_samples == 3000
    for name in cells:
        for m in reproduce.METRICS + tuple(f"{m}_3000" for m in reproduce.SAMPLE_METRICS):
            values = [w[m] for w in written[name]]
            assert out["summary"][name][m]["mean"] == pytest.approx(np.mean(values))
            assert out["summary"][name][m]["values"] == pytest.approx(values)
    increase = {(d["parallel"], d["sequential"]): d for d in out["entropy_increase"]}
    assert list(increase) == [("distant_multi", "distant_one"), ("raster_multi", "raster_one"),
                              ("distant_multi", "raster_one")]
    for (parallel, sequential), d in increase.items():
        want = (maps[parallel] - maps[sequential]).reshape(8, 8)
        np.testing.assert_allclose(d["map"], want, atol=1e-9)
        assert d["mean"] == pytest.approx(want.mean())
        # Paired by seed: the seeds' offsets cancel, so every seed's difference is the same and the interval is 0.
        assert d["interval"]["values"] == pytest.approx([want.mean()] * 3) and d["interval"]["half_width"] < 1e-9
    assert (tmp_path / "report" / "entropy_increase.png").exists()
    text = (tmp_path / "report" / "table.md").read_text()
    d = increase["distant_multi", "raster_one"]
    assert f"distant_multi - raster_one {d['mean']:.3f} ± {d['interval']['half_width']:.3f}" in text
    # The paper's comparisons whose two cells ran, in config order, paired by seed (no_prefix etc. did not run).
    paired = {(c["a"], c["b"]): c for c in out["contrasts"]}
    assert list(paired) == [("raster_multi", "distant_multi"), ("distant_multi", "raster_one"),
                            ("distant_one", "raster_one")]
    main = paired["raster_multi", "distant_multi"]
    for m in reproduce.METRICS + ("fid_3000",):
        diffs = [a[m] - b[m] for a, b in zip(written["raster_multi"], written["distant_multi"])]
        assert main[m]["values"] == pytest.approx(diffs) and main[m]["paired_seeds"] == seeds
        assert main[m]["half_width"] == pytest.approx(reproduce.mean_interval(diffs)["half_width"])
    assert main["paper_fid_difference"] == pytest.approx(3.03)
    table = (tmp_path / "report" / "table.md").read_text()
    assert all(f"| {name} |" in table for name in cells) and "95% t-interval" in table
    rows = [table.index(f"| {name} |") for name in cells]
    assert rows == sorted(rows)  # one row per cell, in the order asked for
    d = main["fid"]
    assert f"| raster_multi minus distant_multi | (d) adjacent vs distant tokens in parallel | +3.03 | " \
           f"{d['mean']:+.2f} ± {d['half_width']:.2f} |" in table
    assert all(f"{name} 2.1" in table for name in cells)  # wall time per seed, from the phases' records
    assert out["total_seconds"] == pytest.approx(100 + 4 * (360 + 18))  # shared + 4 cells x (60 + 120 + 180 + 3 x 6)
    assert "Measured total: 0.45 h (27 min)" in table
    s3000 = out["summary"]["raster_multi"]["fid_3000"]
    assert f"| raster_multi | {s3000['mean']:.2f} ± {s3000['half_width']:.2f} |" in table  # the rescore's own table
    d = main["fid_3000"]
    assert f"{main['nll']['mean']:+.4f} ± {main['nll']['half_width']:.4f} | " \
           f"{d['mean']:+.2f} ± {d['half_width']:.2f} |" in table  # and its FID column among the contrasts
    for name in ("raster_multi", "distant_multi"):  # the sample grids side by side (the paper's Figure 5)
        assert (tmp_path / out["sample_grids"][name]).read_bytes() == f"{name} 0".encode()


def test_bad_cell_or_seed_names_are_usage_errors(config):
    c = config.copy_and_resolve_references()
    c.reproduce.seeds = "0,0"
    with pytest.raises(config_args.UsageError, match="distinct integers"):
        reproduce.seeds_of(c)
    with pytest.raises(config_args.UsageError, match="raster_mult"):
        reproduce._names("raster_mult", list(c.cells), "cells")


def _run(workdir, *extra):
    rel = os.path.relpath(workdir, ROOT)
    cmd = [sys.executable, "-m", "par_jax.main", "--config=configs/reproduce.py:quick", f"--workdir={rel}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=900)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
def test_quick_grid_runs_end_to_end_reuses_phases_and_refuses_another_protocol(tmp_path):
    workdir = tmp_path / "grid"
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "[reproduce 1/9] tokenizer" in proc.stdout and "[reproduce 9/9] report" in proc.stdout
    report = json.loads((workdir / "report" / "results.json").read_text())
    assert report["cells"] == ["raster_multi", "distant_multi"] and report["seeds"] == [0]
    for name in report["cells"]:
        r = json.loads((workdir / "cells" / name / "seed0" / "results.json").read_text())
        for key in ("fid", "precision", "recall", "class_consistency", "nll", "entropy"):
            assert np.isfinite(r["metrics"][key]), (name, key)
            assert report["summary"][name][key]["mean"] == pytest.approx(r["metrics"][key])
        assert 0 < r["metrics"]["nll"] < 10 and len(r["entropy_map"]) == 64
        protocol = r["protocol"]
        assert protocol["seed"] == 0 and protocol["config"]["train"]["num_steps"] == 6
        assert protocol["config"]["model"]["order_kind"] == ("raster_multi" if name == "raster_multi" else "region")
        assert r["checkpoint_step"] == 6 and r["checkpoint"].startswith(f"cells/{name}/seed0/train")
        assert r["eval_settings"]["num_samples"] == 20 and "--config.reproduce.cells=" + name in r["rerun"]
        assert str(tmp_path) not in json.dumps(r)  # no absolute path of this machine
        # The rescore: the evaluate job again on the same checkpoint with reproduce.rescore_samples samples.
        rescored = json.loads((workdir / "cells" / name / "seed0" / "eval" / "samples40" / "results.json").read_text())
        assert rescored["settings"]["num_samples"] == 40 and rescored["settings"]["checkpoint_step"] == 6
        assert report["summary"][name]["fid_40"]["mean"] == pytest.approx(rescored["metrics"]["fid"])
    assert "| raster_multi |" in (workdir / "report" / "table.md").read_text()
    for name in report["cells"]:
        assert (workdir / report["sample_grids"][name]).stat().st_size > 0

    # A second run reuses the finished phases, and refuses a cell whose recorded protocol differs from the one asked.
    other = _run(workdir, "--config.par.train.num_steps=7")
    assert "tokenizer: done before" in other.stdout and "classifier: done before" in other.stdout
    assert other.returncode == 2 and "another protocol" in other.stderr and "num_steps" in other.stderr


def test_a_setting_added_later_matches_an_older_record_only_at_its_as_before_value():
    from par_jax import phases
    saved = {"tokenizer": {"train": {"num_steps": 10}}}  # recorded before train.dead_code_restart existed
    assert phases.protocol_diffs(saved, {"tokenizer": {"train": {"num_steps": 10, "dead_code_restart": 0}}}) == []
    diffs = phases.protocol_diffs(saved, {"tokenizer": {"train": {"num_steps": 10, "dead_code_restart": 10}}})
    assert diffs == ["tokenizer.train.dead_code_restart: 0 -> 10"]
    assert phases.protocol_diffs({"eval": {}}, {"eval": {"i3d_weights": ""}}) == []
    # Any other new key is still a difference, and so is a recorded value that differs.
    assert phases.protocol_diffs(saved, {"tokenizer": {"train": {"num_steps": 10, "lr": 0.1}}}) == [
        "tokenizer.train.lr: None -> 0.1"]
    assert phases.protocol_diffs(saved, {"tokenizer": {"train": {"num_steps": 11}}}) == [
        "tokenizer.train.num_steps: 10 -> 11"]
