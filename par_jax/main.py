r"""The one entry point: `python -m par_jax.main --config=configs/FILE.py:ARGS --workdir=DIR [--job=JOB]`.

The job (train, sample, evaluate, ...) comes from `config.job` or the --job flag. Each job is a plain function
`fn(config, workdir)` in the library, so tests and notebooks call the same code. The config file is read by path,
so the command works from any directory. A mistake in the command line (an unknown flag or config field, a bad
config argument such as `size=XXXL`, a missing --workdir, an unknown job) is one short message and exit status 2,
found before jax is imported; a crash keeps its traceback.
"""

import importlib
import os
import signal
import sys

from absl import flags, logging

from par_jax.core import config_args

# Jobs by name -> "module:function". Imported lazily so a job pulls in only what it needs.
JOBS = {
    "train": "par_jax.training.train:train_and_evaluate",
    "sample": "par_jax.sampling.job:run",
    "evaluate": "par_jax.evaluation.job:run",
    "extract_codes": "par_jax.tokenizer.extract:run",
    "train_tokenizer": "par_jax.tokenizer.train:train_and_evaluate",
    "evaluate_tokenizer": "par_jax.tokenizer.evaluate:run",
    "demo": "par_jax.demo:run",
    "reproduce": "par_jax.reproduce:run",
}


def define_flags(fv: flags.FlagValues, argv) -> None:
    config_args.define_config(fv, argv, "Experiment config file, e.g. configs/par.py:size=L,n=4.")
    flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs and outputs.",
                        flag_values=fv)
    flags.DEFINE_enum("job", None, sorted(JOBS), "Overrides config.job.", flag_values=fv)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def get_job(name: str):
    if name not in JOBS:
        raise config_args.UsageError(f"unknown job {name!r}; known jobs: {', '.join(sorted(JOBS))}.")
    module, fn = JOBS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def _sigterm_during_start_up(signum, frame) -> None:
    """A SIGTERM before a training loop takes the signal over (imports, set-up, compilation): no step has run, so
    nothing is lost; say so and exit 128 + 15 rather than die silently. (Python runs a handler between bytecodes:
    one arriving during a long compilation is acted on when it returns.)"""
    del frame
    logging.warning("received signal %d during start-up, before any training step: nothing to save; stopping.",
                    signum)
    sys.exit(128 + signum)


def _orphaned_storage_callback(error: BaseException) -> bool:
    """After a failed asynchronous save, the storage layer's callbacks (tensorstore, from its own threads) still try
    to reach orbax's closed event loop and print an `Event loop is closed` traceback each, dozens of them, burying the
    one message the run gives about the failure. Only those are dropped (`sys.excepthook`, `sys.unraisablehook`)."""
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _excepthook(kind, value, tb) -> None:
    if not _orphaned_storage_callback(value):
        sys.__excepthook__(kind, value, tb)


def _unraisablehook(unraisable) -> None:
    if not _orphaned_storage_callback(unraisable.exc_value):
        sys.__unraisablehook__(unraisable)


def main(argv=None) -> None:
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    config = f.config
    job = f.job or config.get("job", "train")
    if job not in JOBS:
        raise config_args.UsageError(f"unknown job {job!r} (config.job); known jobs: {', '.join(sorted(JOBS))}.")
    # Before the heavy imports and jax.distributed (whose preemption service then owns the signal on pods).
    signal.signal(signal.SIGTERM, _sigterm_during_start_up)
    sys.excepthook, sys.unraisablehook = _excepthook, _unraisablehook
    # After flags, before any device use (multi-host JAX starts here).
    from par_jax.core import checkpoint, distributed, loop  # noqa: PLC0415
    distributed.initialize()
    checkpoint.quiet_orbax_logs()  # the process's log policy is the entry point's to set, not the library's
    workdir = f.workdir
    if "://" not in workdir:  # orbax and friends want absolute local paths; a relative --workdir is the cwd's
        workdir = os.path.abspath(workdir)
    logging.info("job %s, workdir %s", job, workdir)
    try:
        get_job(job)(config, workdir)
    except loop.STOPS as e:  # the run stopped on purpose and its message says why: no traceback
        logging.error("%s", e)
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        logging.flush()
        # os._exit: a failed asynchronous save can leave orbax threads that crash noisily at interpreter shutdown
        # (`sys.meta_path is None`), burying the message above. Everything was saved or closed by the job already.
        os._exit(2 if isinstance(e, loop.IncompatibleCheckpointError) else 1)


if __name__ == "__main__":
    config_args.run(main)
