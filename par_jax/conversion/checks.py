"""Checking a state dict against the parameters a config expects, and its values, reporting every problem at once."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

# Trained weights of these networks are O(1). A flipped exponent bit turns a weight of size 1e-3..1 into one of 1e16 to
# 1e38 (or inf / NaN); nothing a trained network holds is near this bound.
ABSURD_MAGNITUDE = 1e6
VALUES_HINT = ("Values like these come from a damaged or truncated download, flipped bits, or a training run that "
               "diverged: fetch the file again and compare its checksum with the source's. Only if these values are "
               "meant to be there, convert anyway with check_values=False (--allow_bad_values).")


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


def value_problems(state_dict: Mapping[str, np.ndarray], keys: Sequence[str]) -> list[str]:
    """One line per floating-point array among `keys` that holds NaN, inf or values beyond +-ABSURD_MAGNITUDE."""
    problems = []
    for key in keys:
        a = np.asarray(state_dict[key]) if key in state_dict else None
        if a is None or a.size == 0 or not np.issubdtype(a.dtype, np.floating):
            continue
        lo, hi = a.min(), a.max()  # one pass each, no copy; NaN propagates
        if np.isfinite(lo) and np.isfinite(hi) and max(-lo, hi) <= ABSURD_MAGNITUDE:
            continue
        finite = a[np.isfinite(a)]
        big = finite[np.abs(finite) > ABSURD_MAGNITUDE]
        found = [f"{n} {name}" for n, name in ((int(np.isnan(a).sum()), "NaN"), (int(np.isinf(a).sum()), "inf"))
                 if n]
        if big.size:
            found.append(f"{big.size} with |x| > {ABSURD_MAGNITUDE:g}, largest {big[np.argmax(np.abs(big))]:.2g}")
        problems.append(f"bad values  {key}: {', '.join(found)} (of {a.size} values)")
    return problems
