"""The `demo` job: PAR end to end on Fashion-MNIST (see configs/demo.py).

Each phase runs an ordinary par_jax job in its own folder under the workdir and leaves a `phase.json` with its
results and wall time; a re-run reuses finished phases (and the jobs themselves resume from their checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np
from absl import logging
from etils import epath

PHASES = ("tokenizer", "codes", "par", "samples", "classifier", "eval", "report")


def _banner(i: int, name: str, what: str) -> None:
    line = f"[demo {i}/{len(PHASES)}] {name}: {what}"
    logging.info(line)
    print(line, flush=True)


class PhaseIncomplete(RuntimeError):
    """A phase's job returned before finishing (e.g. it saved and stopped on SIGTERM); nothing is marked done."""


def _run_phase(workdir: epath.Path, i: int, name: str, what: str, fn: Callable[[], dict], force: bool,
               finished: Callable[[dict], bool] = lambda result: True) -> dict:
    marker = workdir / name / "phase.json"
    if marker.exists() and not force:
        result = json.loads(marker.read_text())
        _banner(i, name, f"done before ({result['seconds']:.0f} s), reused")
        return result
    _banner(i, name, what)
    start = time.perf_counter()
    result = dict(fn() or {})
    if not finished(result):
        raise PhaseIncomplete(f"demo phase {name!r} stopped before finishing (preempted?); its job saved a "
                              f"checkpoint: run the same command again to resume.")
    result["seconds"] = time.perf_counter() - start
    (workdir / name).mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(result, indent=2, default=_jsonable))
    print(f"[demo {i}/{len(PHASES)}] {name}: finished in {result['seconds']:.0f} s", flush=True)
    return result


def _relative(path, root: epath.Path) -> str:
    """A path inside the workdir as relative to it: the summary is copied into docs and must not name this
    machine's folders."""
    text, base = os.fspath(path), os.fspath(root)
    return os.path.relpath(text, base) if text and "://" not in text and text.startswith(base) else text


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def _scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, np.floating, np.integer))}


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
    from par_jax.data import extract as extract_lib  # noqa: PLC0415 (jobs are imported only when the demo runs)
    from par_jax.data import sources as sources_lib  # noqa: PLC0415
    from par_jax.evaluation import classifier as classifier_lib  # noqa: PLC0415
    from par_jax.evaluation import job as eval_job  # noqa: PLC0415
    from par_jax.sampling import job as sample_job  # noqa: PLC0415
    from par_jax.tokenizer import train as tokenizer_train  # noqa: PLC0415
    from par_jax.training import train as par_train  # noqa: PLC0415

    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    force = bool(config.demo.force)
    start = time.perf_counter()
    dirs = {name: root / name for name in PHASES}
    par = config.par
    with par.unlocked():
        par.data.tokenizer = os.fspath(dirs["tokenizer"])
        par.data.codes_dir = os.fspath(dirs["codes"])
        par.sample.checkpoint = os.fspath(dirs["par"])
        par.eval.checkpoint = os.fspath(dirs["par"])
        par.eval.classifier = os.fspath(dirs["classifier"])
    results: dict[str, dict] = {}

    results["tokenizer"] = _run_phase(
        root, 1, "tokenizer", f"training the VQ tokenizer ({config.tokenizer.train.num_steps} steps)",
        lambda: _scalars(tokenizer_train.train_and_evaluate(config.tokenizer, os.fspath(dirs["tokenizer"])) or {}),
        force, finished=lambda _: (dirs["tokenizer"] / "tokenizer").exists())  # the export is written last

    def extract():
        from par_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
        d = par.data
        source = sources_lib.make_image_source(d.image_source, split=d.split, image_size=d.image_size)
        if config.demo.max_images:
            source = _Subset(source, int(config.demo.max_images))
        tok = tokenizer_lib.load(d.tokenizer)
        meta = extract_lib.extract_codes(
            tok, source, d.codes_dir, image_size=d.image_size, views=d.views,
            flip_views=d.flip_views, batch_size=d.extract_batch_size, records_per_shard=d.records_per_shard,
            tokenizer_id=d.tokenizer, tokenizer_fingerprint=tokenizer_lib.fingerprint(tok),
            expected_grid_shape=tuple(par.model.grid_shape), workers=d.extract_workers)
        return {"images": len(source), "codes_dir": d.codes_dir, "metadata": str(meta)}

    results["codes"] = _run_phase(root, 2, "codes", "extracting token codes of the training images", extract, force)
    results["par"] = _run_phase(
        root, 3, "par", f"training PAR-{par.model.n}x ({par.train.num_steps} steps)",
        lambda: _scalars(par_train.train_and_evaluate(par, os.fspath(dirs["par"])) or {}), force,
        finished=lambda r: r.get("step", par.train.num_steps) >= par.train.num_steps)  # {}: finished before

    def sample():
        out = sample_job.run(par, os.fspath(root))  # writes root/samples/<settings>/
        return {"png": _relative(out["png"], root), "npz": _relative(out["npz"], root)}

    results["samples"] = _run_phase(root, 4, "samples", "sampling a grid with a row per class", sample, force)

    def classifier():
        _, meta = classifier_lib.load_or_train(par.eval.classifier,
                                               classifier_lib.TrainSettings(steps=int(config.demo.classifier_steps)))
        return _scalars(meta)

    results["classifier"] = _run_phase(root, 5, "classifier", "the Fashion-MNIST classifier for evaluation",
                                       classifier, force)

    def evaluate():
        record = eval_job.run(par, os.fspath(root))  # writes root/eval/<name>/results.json
        return {**_scalars(record["metrics"]),
                "results_dir": _relative(record["settings"].get("samples_file", ""), root)}

    results["eval"] = _run_phase(root, 6, "eval", f"evaluating {par.eval.num_samples} samples", evaluate, force)

    def report():
        dirs["report"].mkdir(parents=True, exist_ok=True)
        steps, loss = read_scalar_curve(os.fspath(dirs["par"]), "train/loss")
        out = {}
        if len(steps):
            path = dirs["report"] / "loss.png"
            plot_curve(steps, loss, os.fspath(path), f"PAR-{par.model.n}x on Fashion-MNIST codes: training loss")
            out.update(loss_png=os.fspath(path), first_loss=float(loss[0]), last_loss=float(loss[-1]))
        shutil.copy(os.fspath(root / results["samples"]["png"]), dirs["report"] / "samples.png")  # relative to root
        out["samples_png"] = os.fspath(dirs["report"] / "samples.png")
        return out

    results["report"] = _run_phase(root, 7, "report", "loss curve and summary", report, True)
    total = time.perf_counter() - start
    summary = {"wall_seconds_this_run": total, "phase_seconds": {k: v["seconds"] for k, v in results.items()},
               "results": results}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    _print_summary(root, results, total)
    return summary


class _Subset:
    """The first `count` images of a source (quick runs)."""

    def __init__(self, source, count: int):
        self._source, self._count = source, min(count, len(source))
        self.name, self.num_classes, self.class_names = source.name, source.num_classes, source.class_names

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int):
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._source[index]


def _print_summary(root: epath.Path, results: dict, total: float) -> None:
    ev = results["eval"]
    lines = [
        "",
        f"PAR demo finished in {total / 60:.1f} min. Everything is under {root}:",
        f"  tokenizer checkpoint     {root / 'tokenizer'}",
        f"  training codes           {root / 'codes'}",
        f"  PAR checkpoints, curves  {root / 'par'}   (tensorboard --logdir {root})",
        f"  sample grid (row/class)  {root / results['samples']['png']}",
        f"  loss curve               {results['report'].get('loss_png', '-')}",
        f"  metrics                  {root / 'eval'}   "
        + ", ".join(f"{k}={ev[k]:.4g}" for k in ("fid", "inception_score", "precision", "recall",
                                                 "class_consistency") if isinstance(ev.get(k), (int, float))),
        f"  summary                  {root / 'summary.json'}",
    ]
    print("\n".join(lines), flush=True)
