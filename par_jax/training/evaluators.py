"""Evaluators run during training, chosen by `config.evals` (the big_vision pattern: plug-ins by name).

`config.evals` maps a name to its settings: `{"every_steps": N, "fn": "module:function" (optional), **kwargs}`. The
function comes from `fn` or, by the entry's name, from `REGISTRY` (which evaluation code fills with a line each). It
is called as `fn(model, config, *, step, workdir, **kwargs)` with the current ParTransformer (EMA weights when
kept) and returns {metric name: scalar}; the loop writes them as `eval/<name>/<metric>`. If the function has a
`validate` attribute, `fn.validate(config, **kwargs)` runs before training starts (cheap checks: files exist,
metric names are known), so a bad entry fails in seconds rather than at the first evaluation.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

# name -> "module:function"
REGISTRY: dict[str, str] = {}

RESERVED = ("every_steps", "fn")


def resolve(name: str, settings: Mapping[str, Any]) -> Callable[..., Mapping[str, float]]:
    target = settings.get("fn") or REGISTRY.get(name)
    if not target:
        raise ValueError(f"config.evals.{name}: no evaluator named {name!r}; registered: {sorted(REGISTRY)}. "
                         f"Set config.evals.{name}.fn='module:function' or use a registered name.")
    module, _, fn = target.partition(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config.evals.{name}: cannot load evaluator {target!r}: {e}") from e


class Evaluators:
    """The evaluators of one run, resolved up front so a typo fails before training starts."""

    def __init__(self, config):
        self.entries = []
        for name, settings in dict(config.get("evals") or {}).items():
            settings = dict(settings)
            every = int(settings.get("every_steps", 0))
            if every < 0:
                raise ValueError(f"config.evals.{name}.every_steps must be >= 0 (0 = only at the end).")
            kwargs = {k: v for k, v in settings.items() if k not in RESERVED}
            fn = resolve(name, settings)
            if hasattr(fn, "validate"):
                fn.validate(config, **kwargs)
            self.entries.append((name, every, fn, kwargs))

    def due(self, step: int, last: bool) -> list:
        return [e for e in self.entries if last or (e[1] and step % e[1] == 0)]

    def run(self, entries, model, config, *, step: int, workdir) -> dict[str, float]:
        out = {}
        for name, _, fn, kwargs in entries:
            for key, value in dict(fn(model, config, step=step, workdir=workdir, **kwargs)).items():
                out[f"eval/{name}/{key}"] = value
        return out
