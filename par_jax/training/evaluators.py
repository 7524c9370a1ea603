"""The trainer's plug-in runner: evaluators chosen by `config.evals` (the big_vision pattern: plug-ins by name).

`config.evals` maps a name to its settings: `{"every_steps": N, "fn": "module:target" (optional), **kwargs}`. The
target comes from `fn` or, by the entry's name, from `REGISTRY`. Targets are strings, imported when a run uses them,
so the training package depends on no evaluation or sampling code. A target is one of

- a function `fn(model, config, *, step, workdir, **kwargs) -> {metric: scalar}`, called at each evaluation step;
- a class: `cls(config, **kwargs)` is built once before training starts (its constructor does the cheap checks:
  files exist, metric names are known, so a bad entry fails in seconds rather than at the first evaluation, and it
  keeps what is reused between calls, e.g. a feature network), then called as
  `obj(model, config, *, step, workdir) -> {metric: scalar}`.

Either form also receives the loop's metric `writer=` (to write images) when its signature accepts it. `model` is
the current ParTransformer (EMA weights when kept); results are written as `eval/<name>/<metric>`.
`config.train.sample_every_steps` > 0 adds a `samples` entry (a PNG grid every so many steps) unless `config.evals`
has one.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

# name -> "module:target"
REGISTRY: dict[str, str] = {
    "eval": "par_jax.evaluation.plugin:GenerationMetrics",   # FID/IS/... of fresh samples (docs/evaluation.md)
    "samples": "par_jax.evaluation.grids:SampleGrid",        # a PNG grid of samples under WORKDIR/samples/
}

RESERVED = ("every_steps", "fn")


def resolve(name: str, settings: Mapping[str, Any]) -> Callable[..., Any]:
    target = settings.get("fn") or REGISTRY.get(name)
    if not target:
        raise ValueError(f"config.evals.{name}: no evaluator named {name!r}; registered: {sorted(REGISTRY)}. "
                         f"Set config.evals.{name}.fn='module:function' or use a registered name.")
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"config.evals.{name}: cannot load evaluator {target!r}: {e}") from e


def _takes_writer(fn) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == "writer" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def entries_of(config) -> dict[str, dict[str, Any]]:
    """`config.evals`, plus the sample-grid entry that `config.train.sample_every_steps` asks for."""
    entries = {name: dict(settings) for name, settings in dict(config.get("evals") or {}).items()}
    train = config.get("train") or {}
    every = int(train.get("sample_every_steps", 0) or 0)
    if every > 0 and "samples" not in entries:
        entries["samples"] = {"every_steps": every}
    return entries


class Evaluators:
    """The evaluators of one run, resolved (and class plug-ins built) up front so a typo fails before training."""

    def __init__(self, config):
        self.entries = []
        for name, settings in entries_of(config).items():
            every = int(settings.get("every_steps", 0))
            if every < 0:
                raise ValueError(f"config.evals.{name}.every_steps must be >= 0 (0 = only at the end).")
            kwargs = {k: v for k, v in settings.items() if k not in RESERVED}
            target = resolve(name, settings)
            if inspect.isclass(target):
                fn, kwargs = target(config, **kwargs), {}
                call = fn.__call__
            else:
                fn = call = target
            self.entries.append((name, every, fn, kwargs, _takes_writer(call)))

    def due(self, step: int, last: bool) -> list:
        return [e for e in self.entries if last or (e[1] and step % e[1] == 0)]

    def run(self, entries, model, config, *, step: int, workdir, writer=None) -> dict[str, float]:
        out = {}
        for name, _, fn, kwargs, takes_writer in entries:
            extra = {"writer": writer} if takes_writer else {}
            for key, value in dict(fn(model, config, step=step, workdir=workdir, **kwargs, **extra)).items():
                out[f"eval/{name}/{key}"] = value
        return out
