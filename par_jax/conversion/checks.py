"""Checking a state dict against the parameters a config expects, and reporting every problem at once."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np


class ConversionError(ValueError):
    """A state dict does not fit the config. `problems` holds one line per offending key or setting."""

    def __init__(self, what: str, problems: Sequence[str], hint: str = ""):
        self.problems = list(problems)
        lines = [f"{what}: {len(self.problems)} problem(s)"] + [f"  {p}" for p in self.problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def key_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, np.ndarray]) -> list[str]:
    """One line per missing key, unexpected key, wrong shape and non-float dtype, with expected and found shapes."""
    problems = []
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"missing     {key}: expected {tuple(shape)}")
        elif _shape(found[key]) != tuple(shape):
            problems.append(f"wrong shape {key}: expected {tuple(shape)}, found {_shape(found[key])}")
        elif not np.issubdtype(np.asarray(found[key]).dtype, np.floating):
            problems.append(f"wrong dtype {key}: expected floating point, found {np.asarray(found[key]).dtype}")
    problems += [f"unexpected  {key}: found {_shape(found[key])}" for key in found if key not in expected]
    return problems


def drop_ignored(state_dict: Mapping[str, np.ndarray], ignored: re.Pattern) -> dict[str, np.ndarray]:
    """The state dict without its non-parameter entries (buffers such as rotary tables or usage counters)."""
    return {k: v for k, v in state_dict.items() if not ignored.fullmatch(k)}
