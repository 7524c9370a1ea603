r"""Reading a command line: config argument strings, config files loaded by path, flags, and user errors.

Every par_jax command (`python -m par_jax.main`, `.convert`, `.visualize`, `.training.memory`, `.bench.*`) reads its
arguments the same way: absl flags plus an ml_collections config file, `--config=configs/FILE.py[:ARGS]`, whose
fields can be overridden (`--config.train.batch_size=512`). A command defines its flags in `define_flags(fv, argv)`,
parses them with `parse_flags` (a private flag registry per call, so tests call `main(argv)` in-process) and runs
under `run(main)` from its `__main__` block.

A mistake the user can fix (an unknown or mistyped argument, a missing flag, a config file that is not there) is a
`UsageError`: `run` prints it as one short block and exits with status 2, before the heavy imports where it can.
Library code raises `UsageError` for the same kind of mistake found later. Anything else is a crash and keeps its
traceback.

Config files import the installed library, never each other by module name (a config is loaded by path, from any
directory); one that builds on another loads it with `sibling(__file__, "par.py")`.

This module must stay light: it is imported before jax, flax or tensorflow.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import flags
from ml_collections import config_dict

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-helpshort")


class UsageError(ValueError):
    """A mistake the user made and can fix (printed briefly with exit status 2 by `run`, never as a traceback)."""


# ----- config argument strings: "size=L,n=4,runlocal" -----

def parse_arg(arg: str | None, choices: Mapping[str, Iterable[Any]] | None = None,
              **defaults) -> config_dict.ConfigDict:
    """'size=L,n=4,runlocal' -> ConfigDict(size='L', n=4, runlocal=True), typed and checked by the defaults.

    A bare key sets a bool to True; a bool takes true/false/yes/no/1/0/on/off; an int or float must parse as one;
    `choices[key]` lists the values a key may take. Anything else is a UsageError naming what is allowed.
    """
    out = dict(defaults)
    choices = {k: tuple(v) for k, v in (choices or {}).items()}
    for item in filter(None, (a.strip() for a in (arg or "").split(","))):
        key, has_value, value = (s.strip() for s in item.partition("="))
        if key not in defaults:
            raise UsageError(f"unknown config argument {key!r} in {arg!r}; known: {', '.join(defaults)}.")
        default = defaults[key]
        if isinstance(default, bool):
            if not has_value:
                out[key] = True
            elif value.lower() in TRUE + FALSE:
                out[key] = value.lower() in TRUE
            else:
                raise UsageError(f"config argument {key}={value!r} is not a bool; use {key}, {key}=true or "
                                 f"{key}=false ({'/'.join(TRUE + FALSE)}).")
        elif not has_value or not value:
            raise UsageError(f"config argument {key!r} needs a value, e.g. {key}={default!r}.")
        elif isinstance(default, int):
            try:
                out[key] = int(value)
            except ValueError:
                raise UsageError(f"config argument {key}={value!r} is not an integer.") from None
        elif isinstance(default, float):
            try:
                out[key] = float(value)
            except ValueError:
                raise UsageError(f"config argument {key}={value!r} is not a number.") from None
        else:
            out[key] = value
        if key in choices and out[key] not in choices[key]:
            raise UsageError(f"config argument {key}={value!r} is not one of: "
                             f"{', '.join(str(c) for c in choices[key] if c != '')}.")
    return config_dict.ConfigDict(out)


# ----- config files by path -----

def load_module(path: str):
    """The Python module of a config file, loaded by path (relative paths are the current directory's)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UsageError(f"config file {path} does not exist.")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"_par_jax_config_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(config_file: str, name: str):
    """A config file beside `config_file` (pass `__file__`), loaded by path: `sibling(__file__, "par.py")`."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def load_config(spec: str) -> config_dict.ConfigDict:
    """'configs/par.py:size=L,n=4' -> that file's `get_config("size=L,n=4")` (as --config=... gives it)."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    return module.get_config(arg) if arg else module.get_config()


# ----- flags -----

def last_override_wins(argv: Sequence[str], name: str = "config") -> list[str]:
    """Drops all but the last `--NAME.FIELD=VALUE` of each field.

    ml_collections turns a repeated override of a tuple field into one tuple of all the values
    (`--config.model.grid_shape=(8,8) --config.model.grid_shape=(16,16)` gives (8, 8, 16, 16)); with every other
    flag the last one wins, and launch scripts append overrides after the ones they were given. So here the last one
    wins for tuples too: pass a tuple whole, `--config.model.grid_shape=(16,16)`.
    """
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)=")
    last = {}
    for i, a in enumerate(argv):
        m = pattern.match(a)
        if m:
            last[m.group(1)] = i
    return [a for i, a in enumerate(argv) if not (m := pattern.match(a)) or last[m.group(1)] == i]


def _config_paths(fv: flags.FlagValues, argv: Sequence[str]) -> list[tuple[str, str]]:
    """(flag name, file path) of every config-file flag given in argv."""
    from ml_collections.config_flags import config_flags  # noqa: PLC0415

    names = [n for n in fv if config_flags.is_config_flag(fv[n])]
    out = []
    for i, a in enumerate(argv):
        for n in names:
            for prefix in (f"--{n}=", f"-{n}="):
                if a.startswith(prefix):
                    out.append((n, a[len(prefix):]))
            if a in (f"--{n}", f"-{n}") and i + 1 < len(argv):
                out.append((n, argv[i + 1]))
    return out


def _innermost(e: BaseException, kind) -> BaseException | None:
    """The innermost exception of type `kind` in e's cause/context chain (config_flags wraps and re-wraps)."""
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kind):
            found = e
        e = e.__cause__ or e.__context__
    return found


def _from_config_path(e: BaseException) -> bool:
    """The error was raised while ml_collections resolved an override's field path (an unknown field)."""
    return any("ml_collections" in f.filename and "config_path" in f.filename
               for f in traceback.extract_tb(e.__traceback__))


def _unknown_field(e: BaseException, argv: Sequence[str]) -> str:
    """'--config.optimizer.lrr: no such config field; did you mean "lr"?' from ml_collections' KeyError."""
    text = str(e)
    found = re.search(r"[\"']+([^\"'\\]+)", text)
    key = found.group(1) if found else "?"
    hint = re.search(r'Did you mean \\?"([^"\\]+)', text)
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("-") and "." in a
                 and key in a.split("=", 1)[0].split(".")[1:]), key)
    return f"{flag}: no such config field" + (f'; did you mean "{hint.group(1)}"?' if hint else ".")


def parse_flags(argv: Sequence[str] | None, define: Callable[[flags.FlagValues, list[str]], None], *,
                doc: str | None = None) -> flags.FlagValues:
    """Define a command's flags with `define(fv, argv)` on a new registry and parse `argv` (program name first).

    Strict: an unknown flag, a bad value, a missing required flag, a missing config file, a bad config argument or
    an unknown config field is a UsageError with a short message, and so is a positional argument. `--help` prints
    `doc` and the flags.
    """
    argv = list(sys.argv if argv is None else argv)
    argv = last_override_wins(argv)
    fv = flags.FlagValues()
    define(fv, argv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        print((doc or "").strip() + "\n\nflags:\n" + fv.get_help(), file=sys.stdout)
        sys.exit(0)
    for flag, path in _config_paths(fv, argv[1:]):
        file = path.split(":", 1)[0]
        if not os.path.isfile(file):
            raise UsageError(f"--{flag}: no config file {file!r} (relative paths start at {os.getcwd()}).")
    try:
        rest = fv(argv)
    except flags.Error as e:
        user = _innermost(e, UsageError)
        if user is not None:
            raise UsageError(message(user)) from None
        if "Error whilst parsing config file" in str(e):
            raise _innermost(e, Exception) from None  # a config file that crashed: its own traceback only
        text = str(e).replace("Flag --", "--").removeprefix("flag ")
        if "must have a value other than None" in text:
            text = f"{text.split('=')[0].removeprefix('flag ')} is required."
        raise UsageError(text) from None
    except (KeyError, AttributeError) as e:
        if not _from_config_path(e):
            raise
        raise UsageError(_unknown_field(e, argv)) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected argument(s) {' '.join(rest[1:])!r}; flags are written --name=value.")
    return fv


def define_config(fv: flags.FlagValues, argv: Sequence[str], help_string: str, name: str = "config",
                  default: str | None = None):
    """The `--config=FILE.py[:ARGS]` flag (ml_collections config_flags) on `fv`, overridable field by field."""
    from ml_collections import config_flags  # noqa: PLC0415

    return config_flags.DEFINE_config_file(name, default, help_string, flag_values=fv, sys_argv=list(argv))


def message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, UsageError) and e.args else str(e)


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """The `__main__` of a command: absl's app.run (absl logging and its own flags such as --v, --log_dir) around
    `main(argv)`, which parses the command's flags with `parse_flags`. A UsageError is printed as
    `error: ...` plus one line of usage and exits with status 2; anything else keeps its traceback."""
    from absl import app  # noqa: PLC0415

    argv = list(sys.argv if argv is None else argv)
    helps = [a for a in argv[1:] if a in HELP_FLAGS]
    prog = "python -m " + (sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None)
                           else os.path.basename(argv[0]))

    def absl_own_flags(args):
        try:
            return flags.FLAGS([a for a in args if a not in HELP_FLAGS], known_only=True) + helps
        except flags.Error as e:
            usage_exit(prog, e)

    def call(args):
        try:
            main(args)
        except UsageError as e:
            usage_exit(prog, e)
        except app.UsageError as e:
            usage_exit(prog, e)

    app.run(call, argv=argv, flags_parser=absl_own_flags)


def usage_exit(prog: str, e: BaseException) -> None:
    sys.stderr.write(f"{prog}: error: {message(e)}\n  ({prog} --help lists the flags.)\n")
    sys.stderr.flush()
    sys.exit(2)
