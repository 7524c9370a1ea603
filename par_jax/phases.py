"""Phases: what makes a long Fashion-MNIST command (the demo, the ablation grid) resumable, and the phases they share.

A phase is one ordinary par_jax job run into its own folder under the workdir. When it finishes it leaves
`phase.json` with its results, wall time and (optionally) the protocol that made them; a re-run reuses it, and the
jobs themselves resume from their checkpoints when a phase was interrupted. A finished phase whose recorded protocol
differs from the one asked for now is refused, never silently reused or overwritten.

The shared phases: train the Fashion-MNIST VQ tokenizer (image or video), encode images or clips into codes, train the
evaluation classifier (image or video).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging
from etils import epath

from par_jax.core.config_args import UsageError

MARKER = "phase.json"


class PhaseIncomplete(RuntimeError):
    """A phase's job returned before finishing (e.g. it saved and stopped on SIGTERM); nothing is marked done."""


def jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def scalars(result: dict) -> dict:
    """The plain scalar entries of a job's result."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, np.floating, np.integer))}


def relative(path, root) -> str:
    """A path inside the workdir as relative to it: summaries are copied into docs and must not name this machine's
    folders."""
    text, base = os.fspath(path), os.fspath(root)
    return os.path.relpath(text, base) if text and "://" not in text and text.startswith(base) else text


# Settings added after finished phases had recorded their protocols, with the value that does what was done before the
# setting existed: a record without the key matches a protocol that asks for that value (so an upgrade does not refuse
# a workdir whose results it would reproduce), and any other value is a difference as usual.
ADDED_SETTINGS = {"dead_code_restart": 0, "i3d_weights": ""}


def protocol_diffs(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Where two JSON-like protocols differ, as dotted keys (`a.b: 1 -> 2`)."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out = []
        for k in sorted(set(saved) | set(wanted)):
            old = saved.get(k, ADDED_SETTINGS.get(k))
            out += protocol_diffs(old, wanted.get(k), f"{prefix}{k}.")
        return out
    plain = lambda v: json.loads(json.dumps(v, default=jsonable))
    return [] if plain(saved) == plain(wanted) else [f"{prefix.rstrip('.')}: {saved!r} -> {wanted!r}"]


class Phases:
    """Runs the numbered phases of one command under `root`, printing `[label i/total] name: ...` banners."""

    def __init__(self, root, label: str, total: int, force: bool = False):
        self.root, self.label, self.total, self.force = epath.Path(root), label, total, force

    def say(self, i: int, name: str, what: str) -> None:
        line = f"[{self.label} {i}/{self.total}] {name}: {what}"
        logging.info(line)
        print(line, flush=True)

    def done(self, name: str) -> dict | None:
        """The recorded result of a finished phase, or None."""
        marker = self.root / name / MARKER
        return json.loads(marker.read_text()) if marker.exists() else None

    def run(self, i: int, name: str, what: str, fn: Callable[[], dict], *, force: bool | None = None,
            finished: Callable[[dict], bool] = lambda result: True, protocol: dict | None = None) -> dict:
        """Run `fn` as phase `name` (its folder: root/name) unless it finished before. `protocol`: what makes the
        results (config, seeds, ...); recorded, and compared with the recorded one before a finished phase is
        reused."""
        force = self.force if force is None else force
        result = self.done(name)
        if result is not None and not force:
            if protocol is not None:
                diffs = protocol_diffs(result.get("protocol"), protocol)
                if diffs:
                    raise UsageError(
                        f"{self.root / name} was made with another protocol ({'; '.join(diffs[:3])}"
                        f"{'; ...' if len(diffs) > 3 else ''}): use another --workdir, or delete that folder to "
                        f"redo it.")
            self.say(i, name, f"done before ({result['seconds']:.0f} s), reused")
            return result
        self.say(i, name, what)
        start = time.perf_counter()
        result = dict(fn() or {})
        if not finished(result):
            raise PhaseIncomplete(f"{self.label} phase {name!r} stopped before finishing (preempted?); its job saved "
                                  f"a checkpoint: run the same command again to resume.")
        result["seconds"] = time.perf_counter() - start
        if protocol is not None:
            result["protocol"] = protocol
        (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / name / MARKER).write_text(json.dumps(result, indent=2, default=jsonable))
        print(f"[{self.label} {i}/{self.total}] {name}: finished in {result['seconds']:.0f} s", flush=True)
        return result


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and the two-sided Student-t interval for the mean of `values` (seeds): mean +- t(1 - a/2, k - 1) s/sqrt(k)
    with s the sample standard deviation. One value has no interval (half_width None)."""
    from scipy import stats  # noqa: PLC0415

    x = np.asarray(values, np.float64)
    k = x.size
    if k == 0:
        raise ValueError("no values to summarise.")
    mean = float(x.mean())
    if k < 2:
        return {"mean": mean, "half_width": None, "low": None, "high": None, "seeds": k, "values": x.tolist()}
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 1) * x.std(ddof=1) / math.sqrt(k))
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "seeds": k,
            "values": x.tolist()}


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> dict | None:
    """The per-seed difference a - b over the seeds both have ({seed: value} each), as `mean_interval` plus those
    seeds; None with fewer than 2 (no interval). Runs of one seed share what the seed sets (initialisation, data order,
    sampling keys), so a difference can be resolved this way where the two unpaired intervals overlap."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    return {**mean_interval([a[k] - b[k] for k in common], confidence), "paired_seeds": common}


# ----- the phases the Fashion-MNIST commands share -----

def train_tokenizer(tokenizer_config, directory) -> dict:
    """Train the VQ tokenizer into `directory` (its export, `directory/tokenizer`, is written last)."""
    from par_jax.tokenizer import train as tokenizer_train  # noqa: PLC0415 (jobs are imported only when they run)
    return scalars(tokenizer_train.train_and_evaluate(tokenizer_config, os.fspath(directory)) or {})


def tokenizer_finished(directory) -> bool:
    return (epath.Path(directory) / "tokenizer").exists()


def extract_codes(par, max_images: int = 0, split: str = "") -> dict:
    """Encode the first `max_images` images (0: all) of `par.data`'s image source (`split`, default
    `par.data.split`) with `par.data.tokenizer` into `par.data.codes_dir`. With `par.data.video_source` set, the
    first `max_images` clips of that video source instead (`extract_video_codes`)."""
    if par.data.get("video_source", ""):
        return extract_video_codes(par, max_clips=max_images, split=split)
    from par_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
    from par_jax.data import extract as extract_lib  # noqa: PLC0415
    from par_jax.data import sources as sources_lib  # noqa: PLC0415
    d = par.data
    source = sources_lib.make_image_source(d.image_source, split=split or d.split, image_size=d.image_size)
    if max_images:
        source = Subset(source, int(max_images))
    tok = tokenizer_lib.load(d.tokenizer)
    meta = extract_lib.extract_codes(
        tok, source, d.codes_dir, image_size=d.image_size, views=d.views,
        flip_views=d.flip_views, batch_size=d.extract_batch_size, records_per_shard=d.records_per_shard,
        tokenizer_id=d.tokenizer, tokenizer_fingerprint=tokenizer_lib.fingerprint(tok),
        expected_grid_shape=tuple(par.model.grid_shape), workers=d.extract_workers)
    return {"images": len(source), "codes_dir": d.codes_dir, "metadata": str(meta)}


def extract_video_codes(par, max_clips: int = 0, split: str = "") -> dict:
    """Encode the first `max_clips` clips (0: all) of `par.data.video_source` (`split`, default `par.data.split`;
    the fields are listed in par_jax/tokenizer/extract.py) with the video tokenizer `par.data.tokenizer` into
    `par.data.codes_dir`; the clips' latent grid must be `par.model.grid_shape`."""
    from par_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
    from par_jax.tokenizer import extract as extract_job  # noqa: PLC0415
    d = par.data
    extract_job.video_settings(d)  # bad numbers fail before anything is read
    source = extract_job.make_video_source(d, split)
    if max_clips:
        source = Subset(source, int(max_clips))
    tok = tokenizer_lib.load(d.tokenizer)
    meta = extract_job.encode_video_source(par, source, tok, d.codes_dir, tokenizer_id=d.tokenizer)
    return {"clips": len(source), "codes_dir": d.codes_dir, "metadata": str(meta)}


def train_classifier(directory, steps: int) -> dict:
    """The offline Fashion-MNIST evaluation classifier (trained once, reused)."""
    from par_jax.evaluation import classifier as classifier_lib  # noqa: PLC0415
    _, meta = classifier_lib.load_or_train(directory, classifier_lib.TrainSettings(steps=int(steps)))
    return scalars(meta)


def train_video_classifier(directory, steps: int, test_clips: int = 1000, *, num_frames: int = 17,
                           frame_size: int = 32) -> dict:
    """The offline Moving Fashion-MNIST video classifier for the video metrics (trained once, reused)."""
    from par_jax.evaluation import video_classifier  # noqa: PLC0415
    settings = video_classifier.TrainSettings(steps=int(steps), test_clips=int(test_clips), num_frames=int(num_frames),
                                              frame_size=int(frame_size))
    _, meta = video_classifier.load_or_train(directory, settings)
    return scalars(meta)


class Subset:
    """The first `count` images (or clips) of a source (quick runs)."""

    def __init__(self, source, count: int):
        self._source, self._count = source, min(count, len(source))
        self.name, self.num_classes, self.class_names = source.name, source.num_classes, source.class_names
        if hasattr(source, "num_frames"):  # a video source: its clips' shape travels with it
            self.num_frames, self.frame_size = source.num_frames, source.frame_size

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int):
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._source[index]
