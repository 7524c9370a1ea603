"""The `reproduce` job: the paper's ablation grid (Table 4) on Fashion-MNIST codes (see configs/reproduce.py).

Phases, each resumable and reused when the command runs again (`par_jax.phases`): the tokenizer, the training
codes, the held-out codes (the test split) and the evaluation classifier, shared by every cell; then one phase per
cell and seed (train the decoder, sample and score it with the evaluate job, score the held-out codes under teacher
forcing), and when `reproduce.rescore_samples` is set, the evaluate job once more on the same checkpoint with that many
samples; then the report: mean and 95% t-interval over seeds of every number, per cell.

Layout under the workdir:
    tokenizer/ codes/ heldout_codes/ classifier/      shared phases
    cells/<cell>/seed<k>/train/                       the decoder's run (checkpoints, TensorBoard)
    cells/<cell>/seed<k>/eval/eval/                   the evaluate job's samples, grid and results.json
    cells/<cell>/seed<k>/results.json                 this cell's numbers and its full protocol
    cells/<cell>/seed<k>/eval/samples<N>/             the evaluate job again with reproduce.rescore_samples samples
    report/results.json, report/table.md              the grid over seeds
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import numpy as np
from etils import epath

from par_jax import phases as phases_lib
from par_jax.phases import mean_interval
from par_jax.core.config_args import UsageError

SHARED = ("tokenizer", "codes", "heldout_codes", "classifier")
METRICS = ("fid", "precision", "recall", "class_consistency", "nll", "entropy")
SAMPLE_METRICS = ("fid", "precision", "recall", "class_consistency")  # the ones a rescore measures again
RESULTS_FILE = "results.json"


# ----- the interval arithmetic -----

# ----- cells -----

def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise UsageError(f"config.reproduce.{what}={text!r}: unknown or no entries {unknown}; choose from "
                         f"{', '.join(known)} (comma-separated).")
    return names


def seeds_of(config) -> list[int]:
    try:
        seeds = [int(s) for s in str(config.reproduce.seeds).split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"config.reproduce.seeds={config.reproduce.seeds!r} must be distinct integers, "
                         f"comma-separated (e.g. 0,1,2).")
    return seeds


def cell_config(config, name: str, seed: int, root: epath.Path):
    """The decoder experiment of one cell and seed: config.par with the cell's order fields, the seed, and the
    workdir's shared tokenizer, codes and classifier."""
    cell = config.cells[name]
    par = config.par.copy_and_resolve_references()
    with par.unlocked():
        par.model.update(n=int(cell.n), order_kind=str(cell.order_kind),
                         sequential_prefix=bool(cell.sequential_prefix), intra_group=str(cell.intra_group))
        par.seed = seed                      # initialisation and dropout
        par.data.seed = seed                 # shuffling and view choice (the same images in every cell)
        par.eval.seed = seed                 # the sampled labels and samples
        par.data.tokenizer = os.fspath(root / "tokenizer")
        par.data.codes_dir = os.fspath(root / "codes")
        train_dir = root / "cells" / name / f"seed{seed}" / "train"
        par.sample.checkpoint = os.fspath(train_dir)
        par.eval.checkpoint = os.fspath(train_dir)
        par.eval.classifier = os.fspath(root / "classifier")
        par.eval.name = "eval"
    return par


def _relative_tree(value: Any, root) -> Any:
    """A config as JSON with the workdir's paths made relative to it (results carry no path of this machine)."""
    if isinstance(value, dict):
        return {k: _relative_tree(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative_tree(v, root) for v in value]
    if isinstance(value, str):
        return phases_lib.relative(value, root)
    return value


def cell_protocol(config, par, name: str, seed: int, root) -> dict:
    """Everything that makes one cell's numbers: its decoder config (model, data, optimizer, steps, sampling,
    evaluation), the seed and the held-out scoring."""
    return {"cell": name, "seed": seed, "config": _relative_tree(par.to_dict(), root),
            "heldout": {"split": "test", "images": int(config.reproduce.heldout_images),
                        "batch_size": int(config.reproduce.heldout_batch_size), "view": "eval view of the codes",
                        "labels": "the images' own classes", "dropout": "off"}}


def heldout_batches(par, heldout_dir, batch_size: int):
    from par_jax.data import pipeline  # noqa: PLC0415
    return pipeline.make_eval_loader(par, global_batch_size=batch_size, codes_dir=os.fspath(heldout_dir))


def run_cell(config, name: str, seed: int, root: epath.Path) -> dict:
    """Train, evaluate and score one cell with one seed; writes cells/<name>/seed<seed>/results.json."""
    from par_jax.evaluation import job as eval_job  # noqa: PLC0415 (jobs are imported only when they run)
    from par_jax.evaluation import likelihood  # noqa: PLC0415
    from par_jax.model import checkpoint as model_ckpt  # noqa: PLC0415
    from par_jax.training import train as par_train  # noqa: PLC0415

    par = cell_config(config, name, seed, root)
    cell_dir = root / "cells" / name / f"seed{seed}"
    train_result = phases_lib.scalars(par_train.train_and_evaluate(par, os.fspath(cell_dir / "train")) or {})
    if train_result.get("step", par.train.num_steps) < par.train.num_steps:
        return {"train": train_result}  # stopped early (preempted): not finished, the phase says so
    record = eval_job.run(par, os.fspath(cell_dir))
    model = model_ckpt.restore_model(par.eval.checkpoint)
    scored = likelihood.teacher_forced(model, heldout_batches(par, root / "heldout_codes",
                                                              int(config.reproduce.heldout_batch_size)))
    layout = model.config.layout
    metrics = {k: float(v) for k, v in record["metrics"].items()}
    metrics.update(nll=scored["nll"], entropy=scored["entropy"])
    settings = record["settings"]
    result = {
        "cell": name, "seed": seed, "metrics": metrics,
        "entropy_map": scored["entropy_map"].tolist(), "nll_map": scored["nll_map"].tolist(),
        "grid_shape": list(model.config.grid_shape), "num_steps": layout.num_steps,
        "step_widths": [e - s for s, e in layout.step_bounds()], "perm": layout.perm.tolist(),
        "heldout_images": scored["images"],
        "checkpoint": phases_lib.relative(settings["checkpoint"], root),
        "checkpoint_step": settings["checkpoint_step"], "weights": settings["weights"],
        "eval_settings": _relative_tree({k: v for k, v in settings.items() if k not in ("model",)}, root),
        "samples_grid": phases_lib.relative(os.fspath(cell_dir / "eval" / "eval" / eval_job.GRID_FILE), root),
        "protocol": cell_protocol(config, par, name, seed, root),
        "rerun": (f"python -m par_jax.main --config=configs/reproduce.py{':' + config.arg if config.arg else ''} "
                  f"--workdir=WORKDIR --config.reproduce.cells={name} --config.reproduce.seeds={seed} "
                  f"(after deleting WORKDIR/cells/{name}/seed{seed} to redo it)"),
    }
    (cell_dir / RESULTS_FILE).write_text(json.dumps(result, indent=1, default=phases_lib.jsonable))
    return {"train": train_result, **{k: v for k, v in metrics.items()},
            "results": phases_lib.relative(os.fspath(cell_dir / RESULTS_FILE), root)}


def rescore_name(config) -> str:
    return f"samples{int(config.reproduce.rescore_samples)}"


def rescore_phase(name: str, seed: int, config) -> str:
    """The rescore's phase folder: where the evaluate job writes (WORKDIR/<cell dir>/eval/<eval.name>)."""
    return f"cells/{name}/seed{seed}/eval/{rescore_name(config)}"


def rescore_config(config, name: str, seed: int, root: epath.Path):
    par = cell_config(config, name, seed, root)
    with par.unlocked():
        par.eval.update(num_samples=int(config.reproduce.rescore_samples), name=rescore_name(config))
    return par


def rescore_cell(config, name: str, seed: int, root: epath.Path) -> dict:
    """The evaluate job once more on the cell's final checkpoint, with reproduce.rescore_samples samples: FID and
    precision/recall from the cell's own 300 samples are noisy and biased upwards (FID), and sampling is cheap next to
    training (seconds per thousand images here), so the contrasts get the same scores with less sampling noise."""
    from par_jax.evaluation import job as eval_job  # noqa: PLC0415

    par = rescore_config(config, name, seed, root)
    record = eval_job.run(par, os.fspath(root / "cells" / name / f"seed{seed}"))
    return {"metrics": {k: float(v) for k, v in record["metrics"].items()},
            "num_samples": int(record["settings"]["num_samples"]),
            "checkpoint_step": record["settings"]["checkpoint_step"],
            "results": phases_lib.relative(os.fspath(root / rescore_phase(name, seed, config) / RESULTS_FILE), root)}


# ----- the report -----

def summarise(cell_results: dict[str, list[dict]], confidence: float = 0.95,
              metrics: Sequence[str] = METRICS) -> dict:
    """{cell: {metric: mean_interval over seeds}} from each cell's per-seed results."""
    out = {}
    for name, seeds in cell_results.items():
        out[name] = {m: mean_interval([r["metrics"][m] for r in seeds], confidence)
                     for m in metrics if all(m in r["metrics"] for r in seeds)}
    return out


# The decoders' version of the dependency analysis's increase: parallel cell minus a sequential one. Against the
# sequential cell of the same order (the analysis's comparison), and PAR-4x against raster/one too: a perfect
# sequential model has the same mean NLL in every order (the chain rule), so the best-trained sequential cell is a
# reference for both orders, where distant/one's own may be undertrained.
INCREASES = (("distant_multi", "distant_one"), ("raster_multi", "raster_one"), ("distant_multi", "raster_one"))


def entropy_increase(cell_results: dict[str, list[dict]], parallel: str, sequential: str,
                     confidence: float = 0.95) -> dict | None:
    """The trained decoders' predictive entropy per position, parallel cell minus a sequential cell (means over
    seeds), as a grid map, its mean and the mean's interval paired by seed; None when either cell is not in the
    run."""
    if parallel not in cell_results or sequential not in cell_results:
        return None
    maps = lambda name: np.asarray([r["entropy_map"] for r in cell_results[name]], np.float64)
    per_seed = maps(parallel) - maps(sequential)  # the runs of one seed share keys and data order
    diff = per_seed.mean(axis=0)
    shape = cell_results[parallel][0]["grid_shape"]
    return {"parallel": parallel, "sequential": sequential, "mean": float(diff.mean()),
            "interval": mean_interval(per_seed.mean(axis=1), confidence),
            "max": float(diff.max()), "map": diff.reshape(shape).tolist()}


def contrasts(config, cell_results: dict[str, list[dict]], seeds: list[int],
              metrics: Sequence[str] = METRICS) -> list[dict]:
    """The paper's comparisons (config.contrasts) whose two cells are in the run: per metric, the difference a - b
    paired by seed with its t-interval (None with fewer than 2 seeds)."""
    def by_seed(name, m):
        return {s: r["metrics"][m] for s, r in zip(seeds, cell_results[name]) if m in r["metrics"]}

    out = []
    for a, b, what, paper in config.contrasts:
        if a not in cell_results or b not in cell_results:
            continue
        out.append({"a": a, "b": b, "what": what, "paper_fid_difference": paper,
                    **{m: phases_lib.paired_difference(by_seed(a, m), by_seed(b, m),
                                                       float(config.reproduce.confidence)) for m in metrics}})
    return out


def contrast_table(rows: list[dict], rescored: str | None = None) -> str:
    """`rescored`: the suffix of the rescore's metrics (e.g. "_3000"), whose FID gets a column too."""
    def fmt(d, digits):
        return "-" if d is None else f"{d['mean']:+.{digits}f} ± {d['half_width']:.{digits}f}"
    extra = f" FID ({rescored.strip('_')} samples) |" if rescored else ""
    lines = ["| a minus b | Table 4 | paper FID difference | FID | precision | recall | class consistency | "
             "held-out NLL (nats/token) |" + extra, "|" + "---|" * (9 if rescored else 8)]
    for r in rows:
        lines.append(f"| {r['a']} minus {r['b']} | {r['what']} | {r['paper_fid_difference']:+.2f} | "
                     f"{fmt(r['fid'], 2)} | {fmt(r['precision'], 3)} | {fmt(r['recall'], 3)} | "
                     f"{fmt(r['class_consistency'], 3)} | {fmt(r['nll'], 4)} |"
                     + (f" {fmt(r.get('fid' + rescored), 2)} |" if rescored else ""))
    lines += ["", "Per-seed differences (seeds share the initialisation key, data order and sampling keys), mean ± "
                  "half-width of their t-interval: an interval that excludes 0 resolves the difference."]
    return "\n".join(lines)


def _fmt(s: dict | None, digits: int = 3) -> str:
    if not s:
        return "-"
    if s["half_width"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['half_width']:.{digits}f}"


def table(config, summary: dict, decode_steps: dict[str, int]) -> str:
    """The grid as a Markdown table, one row per cell, with the paper's FID beside."""
    head = ("| cell | Table 4 | paper FID (ImageNet) | decoding steps | FID | precision | recall | class consistency | "
            "held-out NLL (nats/token) | predictive entropy |")
    lines = [head, "|" + "---|" * 10]
    for name, s in summary.items():
        cell = config.cells[name]
        lines.append(f"| {name} | {cell.table} | {cell.paper_fid} | {decode_steps[name]} | "
                     f"{_fmt(s.get('fid'), 2)} | {_fmt(s.get('precision'))} | {_fmt(s.get('recall'))} | "
                     f"{_fmt(s.get('class_consistency'))} | {_fmt(s.get('nll'), 4)} | {_fmt(s.get('entropy'), 4)} |")
    seeds = {s["fid"]["seeds"] for s in summary.values() if "fid" in s}
    lines.append("")
    lines.append(f"Mean ± half-width of the {100 * float(config.reproduce.confidence):.0f}% t-interval over "
                 f"{'/'.join(str(k) for k in sorted(seeds))} seeds (no interval with one seed).")
    return "\n".join(lines)


def rescore_table(summary: dict, suffix: str) -> str:
    n = suffix.strip("_")
    lines = [f"The sample scores again, from {n} samples per cell and seed (the same checkpoints):", "",
             "| cell | FID | precision | recall | class consistency |", "|" + "---|" * 5]
    for name, s in summary.items():
        if "fid" + suffix in s:
            lines.append(f"| {name} | {_fmt(s['fid' + suffix], 2)} | {_fmt(s['precision' + suffix])} | "
                         f"{_fmt(s['recall' + suffix])} | {_fmt(s['class_consistency' + suffix])} |")
    return "\n".join(lines)


def _save_increase_png(increases: list[dict], path) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(increases), figsize=(3.6 * len(increases), 3.4), squeeze=False)
    vmax = max(max(abs(np.asarray(d["map"])).max(), 1e-6) for d in increases)
    for ax, d in zip(axes[0], increases):
        im = ax.imshow(np.asarray(d["map"]), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{d['parallel']} - {d['sequential']}\nmean {d['mean']:.3f} nats", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="predictive entropy increase (nats)")
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def report(config, root: epath.Path, cells: list[str], seeds: list[int]) -> dict:
    cell_results = {name: [json.loads((root / "cells" / name / f"seed{s}" / RESULTS_FILE).read_text())
                           for s in seeds] for name in cells}
    metrics, suffix = METRICS, None
    if int(config.reproduce.rescore_samples) > 0:  # the rescore's numbers as metrics of their own: fid_3000, ...
        suffix = f"_{int(config.reproduce.rescore_samples)}"
        metrics = METRICS + tuple(m + suffix for m in SAMPLE_METRICS)
        for name in cells:
            for s, r in zip(seeds, cell_results[name]):
                marker = root / rescore_phase(name, s, config) / phases_lib.MARKER
                if marker.exists():
                    rescored = json.loads(marker.read_text())["metrics"]
                    r["metrics"].update({m + suffix: rescored[m] for m in SAMPLE_METRICS if m in rescored})
    summary = summarise(cell_results, float(config.reproduce.confidence), metrics)
    increases = [d for d in (entropy_increase(cell_results, p, q, float(config.reproduce.confidence))
                             for p, q in INCREASES) if d]
    out_dir = root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(config, summary, {name: results[0]["num_steps"] for name, results in cell_results.items()})

    def phase_seconds(name, s):  # a cell and seed's wall time, its rescore included; None if it did not run
        folders = [f"cells/{name}/seed{s}"] + ([rescore_phase(name, s, config)] if suffix else [])
        found = [root / f / phases_lib.MARKER for f in folders]
        found = [json.loads(m.read_text())["seconds"] for m in found if m.exists()]
        return sum(found) if found else None

    seconds = {name: [t for t in (phase_seconds(name, s) for s in seeds) if t is not None] for name in cells}
    if suffix and any("fid" + suffix in s for s in summary.values()):
        text += "\n\n" + rescore_table(summary, suffix)
    paired = contrasts(config, cell_results, seeds, metrics)
    if paired and len(seeds) > 1:  # one seed gives no paired interval
        text += "\n\n" + contrast_table(paired, suffix)
    what = "training, sampling and scoring" + (", and the rescore" if suffix else "")
    text += f"\n\nWall time per seed ({what}), minutes: " + ", ".join(
        f"{name} {np.mean(v) / 60:.1f}" for name, v in seconds.items() if v) + "."
    if increases:
        text += ("\n\nThe trained decoders' predictive entropy, parallel minus sequential cell (nats/token, mean over "
                 "positions; paired by seed): " + "; ".join(
                     f"{d['parallel']} - {d['sequential']} {_fmt(d['interval'], 3)}"
                     for d in increases) + " (report/entropy_increase.png maps them).")
    # The grid's measured total: every phase's own record, so runs spread over several sessions still add up.
    shared = {name: json.loads((root / name / phases_lib.MARKER).read_text())["seconds"] for name in SHARED
              if (root / name / phases_lib.MARKER).exists()}
    total = sum(shared.values()) + sum(sum(v) for v in seconds.values())
    text += (f"\n\nMeasured total: {total / 3600:.2f} h ({total / 60:.0f} min): shared phases "
             + ", ".join(f"{name} {v:.0f} s" for name, v in shared.items())
             + f"; {sum(len(v) for v in seconds.values())} cell runs {sum(sum(v) for v in seconds.values()) / 60:.0f}"
               " min (the sum of the phases' own times, without the report).")
    (out_dir / "table.md").write_text(text + "\n")
    grids = {}
    for name in ("raster_multi", "distant_multi"):  # the paper's Figure 5: adjacent vs distant tokens in parallel
        grid = root / cell_results.get(name, [{}])[0].get("samples_grid", "missing")
        if name in cell_results and grid.exists():
            grids[name] = f"report/samples_{name}_seed{seeds[0]}.png"
            (root / grids[name]).write_bytes(grid.read_bytes())
    (out_dir / RESULTS_FILE).write_text(json.dumps(
        {"summary": summary, "contrasts": paired, "entropy_increase": increases, "cells": cells, "seeds": seeds,
         "confidence": float(config.reproduce.confidence), "seconds_per_seed": seconds, "shared_seconds": shared,
         "total_seconds": total, "rescore_samples": int(config.reproduce.rescore_samples), "sample_grids": grids,
         "cell_results": {n: [phases_lib.relative(os.fspath(root / "cells" / n / f"seed{s}" / RESULTS_FILE), root)
                              for s in seeds] for n in cells}}, indent=1, default=phases_lib.jsonable))
    if increases:
        _save_increase_png(increases, out_dir / "entropy_increase.png")
    print(text, flush=True)
    for d in increases:
        print(f"trained decoders' predictive entropy, {d['parallel']} - {d['sequential']}: mean {d['mean']:+.4f} "
              f"nats/token (max {d['max']:+.3f})", flush=True)
    return {"table": "report/table.md", "results": "report/results.json",
            **{f"fid_{n}": s["fid"]["mean"] for n, s in summary.items() if "fid" in s},
            **{f"nll_{n}": s["nll"]["mean"] for n, s in summary.items() if "nll" in s}}


# ----- the job -----

def run(config, workdir: str) -> dict[str, Any]:
    cells = _names(config.reproduce.cells, list(config.cells), "cells")  # in the order given (a ConfigDict sorts)
    seeds = seeds_of(config)
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    rescore = int(config.reproduce.rescore_samples) > 0
    total = len(SHARED) + len(cells) * len(seeds) * (2 if rescore else 1) + 1
    phases = phases_lib.Phases(root, "reproduce", total, bool(config.reproduce.force))
    start = time.perf_counter()
    dirs = {name: root / name for name in SHARED}
    base = cell_config(config, cells[0], seeds[0], root)  # the shared phases read its data block only

    phases.run(1, "tokenizer", f"training the VQ tokenizer ({config.tokenizer.train.num_steps} steps)",
               lambda: phases_lib.train_tokenizer(config.tokenizer, dirs["tokenizer"]),
               finished=lambda _: phases_lib.tokenizer_finished(dirs["tokenizer"]),
               protocol={"tokenizer": config.tokenizer.to_dict()})
    phases.run(2, "codes", f"extracting codes of {config.reproduce.max_images or 'all'} training images",
               lambda: phases_lib.extract_codes(base, config.reproduce.max_images),
               protocol={"split": base.data.split, "max_images": int(config.reproduce.max_images)})
    heldout = base.copy_and_resolve_references()
    with heldout.unlocked():
        heldout.data.codes_dir = os.fspath(dirs["heldout_codes"])
    phases.run(3, "heldout_codes", f"extracting codes of {config.reproduce.heldout_images} test images (held out)",
               lambda: phases_lib.extract_codes(heldout, config.reproduce.heldout_images, split="test"),
               protocol={"split": "test", "max_images": int(config.reproduce.heldout_images)})
    phases.run(4, "classifier", "the Fashion-MNIST classifier for evaluation",
               lambda: phases_lib.train_classifier(dirs["classifier"], config.reproduce.classifier_steps),
               protocol={"steps": int(config.reproduce.classifier_steps)})

    i, done_times = len(SHARED), []
    todo = [(name, seed) for name in cells for seed in seeds]
    for k, (name, seed) in enumerate(todo):
        i += 1
        par = cell_config(config, name, seed, root)
        phase = f"cells/{name}/seed{seed}"
        cell_start = time.perf_counter()
        eta = (f"; ETA of the grid {np.mean(done_times) * (len(todo) - k) / 60:.0f} min" if done_times else "")
        phases.run(
            i, phase, f"cell {k + 1}/{len(todo)}: {config.cells[name].table}, seed {seed} "
                      f"({par.train.num_steps} steps){eta}",
            lambda: run_cell(config, name, seed, root),
            finished=lambda r: "results" in r,
            protocol=cell_protocol(config, par, name, seed, root))
        trained = time.perf_counter() - cell_start > 1  # not reused: its time is the ETA's unit
        if rescore:
            i += 1
            n = int(config.reproduce.rescore_samples)
            phases.run(i, rescore_phase(name, seed, config),
                       f"cell {k + 1}/{len(todo)}: the evaluate job again with {n} samples",
                       lambda: rescore_cell(config, name, seed, root),
                       protocol=_relative_tree(rescore_config(config, name, seed, root).eval.to_dict(), root))
        if trained:
            done_times.append(time.perf_counter() - cell_start)
    result = phases.run(total, "report", "the grid over seeds", lambda: report(config, root, cells, seeds),
                        force=True)
    wall = time.perf_counter() - start
    summary = {"wall_seconds_this_run": wall, "cells": cells, "seeds": seeds, "report": result}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=phases_lib.jsonable))
    print(f"\nablation grid finished in {wall / 60:.1f} min: {root / 'report' / 'table.md'}", flush=True)
    return summary
