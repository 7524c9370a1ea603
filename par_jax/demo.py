"""The `demo` job: PAR end to end on Fashion-MNIST (configs/demo.py) or on Moving Fashion-MNIST clips
(configs/demo_video.py: the same phases with a video tokenizer, (t, h, w) codes, GIF samples and the video
classifier's metrics; a config is a video one when `config.par.data.video_source` is set).

Each phase runs an ordinary par_jax job in its own folder under the workdir and leaves a `phase.json` with its
results and wall time; a re-run reuses finished phases (and the jobs themselves resume from their checkpoints). The
phase machinery and the tokenizer, codes and classifier phases are `par_jax.phases`, shared with the ablation grid.
With `config.demo.shared_dir` (a finished demo's workdir) the tokenizer, codes and classifier are that run's, so runs
that differ only in the decoder (n, seed) share them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np
from etils import epath

from par_jax import phases as phases_lib
from par_jax.core.config_args import UsageError

PHASES = ("tokenizer", "codes", "par", "samples", "classifier", "eval", "report")


def read_scalar_curve(logdir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar written by CLU's TensorBoard writer under `logdir`."""
    import tensorflow as tf  # noqa: PLC0415 (TensorBoard event files)

    points = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    v = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                    points[event.step] = float(np.asarray(v))
    steps = np.array(sorted(points))
    return steps, np.array([points[s] for s in steps])


def plot_curve(steps, values, path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, values, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config, workdir: str) -> dict[str, Any]:
    from par_jax.evaluation import job as eval_job  # noqa: PLC0415 (jobs are imported only when the demo runs)
    from par_jax.sampling import job as sample_job  # noqa: PLC0415
    from par_jax.training import train as par_train  # noqa: PLC0415

    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    force = bool(config.demo.force)
    start = time.perf_counter()
    dirs = {name: root / name for name in PHASES}
    shared = config.demo.get("shared_dir", "")
    if shared:
        dirs.update(_shared_dirs(epath.Path(shared), root))
    par = config.par
    video = bool(par.data.get("video_source", ""))
    with par.unlocked():
        par.data.tokenizer = os.fspath(dirs["tokenizer"])
        par.data.codes_dir = os.fspath(dirs["codes"])
        par.sample.checkpoint = os.fspath(dirs["par"])
        par.eval.checkpoint = os.fspath(dirs["par"])
        par.eval.classifier = os.fspath(dirs["classifier"])
    results: dict[str, dict] = {}
    phases = phases_lib.Phases(root, "demo", len(PHASES), force)

    what = "clips" if video else "images"
    if shared:  # finished phases of another run: reused as they are, never trained again here
        for name in ("tokenizer", "codes", "classifier"):
            results[name] = dict(_finished(dirs[name], name), shared_from=os.fspath(dirs[name].parent))
    else:
        results["tokenizer"] = phases.run(
            1, "tokenizer", f"training the {'video ' if video else ''}VQ tokenizer "
                            f"({config.tokenizer.train.num_steps} steps)",
            lambda: phases_lib.train_tokenizer(config.tokenizer, dirs["tokenizer"]),
            finished=lambda _: phases_lib.tokenizer_finished(dirs["tokenizer"]))
        results["codes"] = phases.run(2, "codes", f"extracting token codes of the training {what}",
                                      lambda: phases_lib.extract_codes(par, config.demo.max_images))
    results["par"] = phases.run(
        3, "par", f"training PAR-{par.model.n}x ({par.train.num_steps} steps)",
        lambda: phases_lib.scalars(par_train.train_and_evaluate(par, os.fspath(dirs["par"])) or {}),
        finished=lambda r: r.get("step", par.train.num_steps) >= par.train.num_steps)  # {}: finished before

    def sample():
        out = sample_job.run(par, os.fspath(root))  # writes root/samples/<settings>/
        files = {"png": out["png"], "npz": out["npz"], "gif": out.get("gif")}
        return {k: phases_lib.relative(v, root) for k, v in files.items() if v}

    results["samples"] = phases.run(4, "samples", f"sampling {'an animated ' if video else 'a '}grid with a row "
                                                  f"per class", sample)
    if not shared:
        if video:
            results["classifier"] = phases.run(
                5, "classifier", "the Moving Fashion-MNIST video classifier for evaluation",
                lambda: phases_lib.train_video_classifier(
                    par.eval.classifier, config.demo.classifier_steps, config.demo.classifier_test_clips,
                    num_frames=par.data.num_frames, frame_size=par.data.frame_size))
        else:
            results["classifier"] = phases.run(
                5, "classifier", "the Fashion-MNIST classifier for evaluation",
                lambda: phases_lib.train_classifier(par.eval.classifier, config.demo.classifier_steps))

    def evaluate():
        record = eval_job.run(par, os.fspath(root))  # writes root/eval/<name>/results.json
        return {**phases_lib.scalars(record["metrics"]),
                "results_dir": phases_lib.relative(record["settings"].get("samples_file", ""), root)}

    results["eval"] = phases.run(6, "eval", f"evaluating {par.eval.num_samples} samples", evaluate)

    def report():
        dirs["report"].mkdir(parents=True, exist_ok=True)
        steps, loss = read_scalar_curve(os.fspath(dirs["par"]), "train/loss")
        out = {}
        if len(steps):
            path = dirs["report"] / "loss.png"
            data = "Moving Fashion-MNIST clip" if video else "Fashion-MNIST image"
            plot_curve(steps, loss, os.fspath(path), f"PAR-{par.model.n}x on {data} codes: training loss")
            out.update(loss_png=os.fspath(path), first_loss=float(loss[0]), last_loss=float(loss[-1]))
        shutil.copy(os.fspath(root / results["samples"]["png"]), dirs["report"] / "samples.png")  # relative to root
        out["samples_png"] = os.fspath(dirs["report"] / "samples.png")
        if results["samples"].get("gif"):
            shutil.copy(os.fspath(root / results["samples"]["gif"]), dirs["report"] / "samples.gif")
            out["samples_gif"] = os.fspath(dirs["report"] / "samples.gif")
        return out

    results["report"] = phases.run(7, "report", "loss curve and summary", report, force=True)
    total = time.perf_counter() - start
    summary = {"wall_seconds_this_run": total, "phase_seconds": {k: v["seconds"] for k, v in results.items()},
               "results": results}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=phases_lib.jsonable))
    _print_summary(root, dirs, results, total)
    return summary


def _shared_dirs(shared: epath.Path, root: epath.Path) -> dict[str, epath.Path]:
    """The tokenizer, codes and classifier folders of the finished demo in `shared` (not this run's own)."""
    if shared.resolve() == root.resolve():
        raise UsageError(f"config.demo.shared_dir is this run's own workdir {root}; leave it empty, or name another "
                         f"finished demo's workdir.")
    return {name: shared / name for name in ("tokenizer", "codes", "classifier")}


def _finished(directory: epath.Path, name: str) -> dict:
    marker = directory / phases_lib.MARKER
    if not marker.exists():
        raise UsageError(f"config.demo.shared_dir: {directory} has no finished {name} phase ({phases_lib.MARKER} "
                         f"missing); run that demo to the end first, or leave shared_dir empty.")
    return json.loads(marker.read_text())


def _print_summary(root: epath.Path, dirs: dict, results: dict, total: float) -> None:
    ev = results["eval"]
    samples = results["samples"]
    lines = [
        "",
        f"PAR demo finished in {total / 60:.1f} min. Everything is under {root}:",
        f"  tokenizer checkpoint     {dirs['tokenizer']}",
        f"  training codes           {dirs['codes']}",
        f"  PAR checkpoints, curves  {root / 'par'}   (tensorboard --logdir {root})",
        f"  sample grid (row/class)  {root / samples.get('gif', samples['png'])}",
        f"  loss curve               {results['report'].get('loss_png', '-')}",
        f"  metrics                  {root / 'eval'}   "
        + ", ".join(f"{k}={ev[k]:.4g}" for k in ("fid", "fd_video_classifier", "fvd", "inception_score",
                                                 "precision", "recall", "class_consistency")
                    if isinstance(ev.get(k), (int, float))),
        f"  summary                  {root / 'summary.json'}",
    ]
    print("\n".join(lines), flush=True)


# ----- comparing finished runs: the n = 1 / 4 / 16 table over seeds -----

TABLE_METRICS = ("fid", "fd_video_classifier", "fvd", "precision", "recall", "class_consistency")


def seed_table(run_dirs, confidence: float = 0.95) -> tuple[str, dict]:
    """Finished demo runs grouped by their decoder's n: (markdown table, JSON-able dict) with, per n, the decoding
    steps and the mean and `confidence` Student-t interval over the runs' seeds of each metric and the final loss.

    Runs must differ only in n and seed (e.g. the `config.demo.shared_dir` runs of docs/video.md); anything else that
    differs in their decoder configs is refused by name rather than averaged.
    """
    from par_jax import ordering  # noqa: PLC0415

    runs = []
    for d in map(epath.Path, run_dirs):
        summary, config = d / "summary.json", d / "par" / "config.json"
        if not summary.exists() or not config.exists():
            raise UsageError(f"{d} is not a finished demo run (no summary.json or par/config.json); finish it with "
                             f"the command that made it, or leave it out.")
        cfg = json.loads(config.read_text())
        runs.append((d, cfg, json.loads(summary.read_text())["results"]))
    if not runs:
        raise UsageError("no runs given: pass the workdirs of finished demo runs.")

    def protocol(cfg):  # everything but n, the seed and the run's own paths; shared paths compared resolved
        def resolve(v):
            if isinstance(v, dict):
                return {k: resolve(x) for k, x in v.items()}
            return os.path.realpath(v) if isinstance(v, str) and v and os.path.exists(v) else v
        out = resolve(cfg)
        for section, keys in ((out, ("seed", "arg")), (out["model"], ("n",))):
            for key in keys:
                section.pop(key, None)
        for name in ("train", "sample", "eval", "data"):
            for key in ("seed", "checkpoint", "workdir"):
                out.get(name, {}).pop(key, None)
        return out

    base = protocol(runs[0][1])
    for d, cfg, _ in runs[1:]:
        diffs = phases_lib.protocol_diffs(base, protocol(cfg))
        if diffs:
            raise UsageError(f"{d} differs from {runs[0][0]} in more than n and the seed ({'; '.join(diffs[:3])}); "
                             f"compare runs of one protocol.")
    metrics = [m for m in TABLE_METRICS if all(isinstance(r["eval"].get(m), (int, float)) for _, _, r in runs)]
    by_n: dict[int, list] = {}
    for _, cfg, results in runs:
        by_n.setdefault(int(cfg["model"]["n"]), []).append((int(cfg["seed"]), results))
    grid = runs[0][1]["model"]["grid_shape"]
    rows, table = [], {}
    for n in sorted(by_n):
        seeds = sorted(s for s, _ in by_n[n])
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"two runs of n = {n} have the same seed ({seeds}); each seed once.")
        values = {m: phases_lib.mean_interval([r["eval"][m] for _, r in by_n[n]], confidence) for m in metrics}
        values["loss"] = phases_lib.mean_interval([r["par"]["loss"] for _, r in by_n[n]], confidence)
        steps = ordering.num_steps(grid, n)
        table[n] = {"steps": steps, "seeds": seeds, **values}

        def cell(v):
            return f"{v['mean']:.3g}" + (f" ± {v['half_width']:.2g}" if v["half_width"] is not None else "")
        rows.append(f"| {n} | {steps} | {', '.join(map(str, seeds))} | "
                    + " | ".join(cell(values[m]) for m in (*metrics, "loss")) + " |")
    head = ("| n | steps | seeds | " + " | ".join((*metrics, "final loss")) + " |\n|"
            + "---|" * (3 + len(metrics) + 1))
    note = (f"\n\nMean ± half-width of the {confidence:.0%} Student-t interval over seeds (none for one seed); token "
            f"grid {'x'.join(map(str, grid))}.")
    text = head + "\n" + "\n".join(rows) + note

    # Paired by seed: runs of one seed share the data order and the sampling keys, so the per-seed difference
    # between two n can be resolved where the two intervals above overlap. Neighbouring n, and the extremes.
    ns = sorted(by_n)
    pairs = list(zip(ns[1:], ns[:-1])) + ([(ns[-1], ns[0])] if len(ns) > 2 else [])
    paired, prow = {}, []
    score = {m: (lambda r, m=m: r["eval"][m]) for m in metrics}
    score["loss"] = lambda r: r["par"]["loss"]
    for a, b in pairs:
        va, vb = (dict(by_n[k]) for k in (a, b))
        common = sorted(set(va) & set(vb))
        if len(common) < 2:  # no interval to give
            continue
        diffs = {m: phases_lib.paired_difference({k: f(va[k]) for k in common}, {k: f(vb[k]) for k in common},
                                                 confidence) for m, f in score.items()}
        paired[f"{a}-{b}"] = {"seeds": common, **diffs}
        prow.append(f"| n = {a} minus n = {b} | {', '.join(map(str, common))} | "
                    + " | ".join(f"{d['mean']:+.3g} ± {d['half_width']:.2g}" for d in diffs.values()) + " |")
    if prow:
        text += ("\n\n| paired by seed | seeds | " + " | ".join((*metrics, "final loss")) + " |\n|"
                 + "---|" * (2 + len(metrics) + 1) + "\n" + "\n".join(prow)
                 + "\n\nThe mean per-seed difference ± the half-width of its Student-t interval: an interval that "
                   "excludes 0 resolves the difference.")
    return text, {"grid_shape": grid, "confidence": confidence, "by_n": table, "paired": paired}


def _define_flags(fv, argv) -> None:
    from absl import flags  # noqa: PLC0415
    del argv
    flags.DEFINE_list("runs", None, "Workdirs of finished demo runs that differ only in n and seed.", flag_values=fv)
    flags.DEFINE_string("out", "", "Also write the table's numbers as JSON here.", flag_values=fv)
    flags.DEFINE_float("confidence", 0.95, "Confidence of the intervals over seeds.", flag_values=fv)
    flags.mark_flag_as_required("runs", flag_values=fv)


def main(argv=None) -> None:
    """`python -m par_jax.demo --runs=DIR,DIR,... [--out=table.json]`: the n = 1 / 4 / 16 table of finished demo runs
    (mean and interval over seeds of every metric), as markdown on stdout."""
    from par_jax.core import config_args  # noqa: PLC0415
    f = config_args.parse_flags(argv, _define_flags, doc=main.__doc__)
    text, numbers = seed_table(f.runs, f.confidence)
    print(text)
    if f.out:
        epath.Path(f.out).write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    from par_jax.core import config_args
    config_args.run(main)
