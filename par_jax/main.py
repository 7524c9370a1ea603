r"""The one entry point: `python -m par_jax.main --config=configs/FILE.py:ARGS --workdir=DIR [--job=JOB]`.

The job (train, sample, evaluate, ...) comes from `config.job` or the --job flag. Each job is a plain function
`fn(config, workdir)` in the library, so tests and notebooks call the same code. The config file is read by path,
so the command works from any directory. A mistake in the command line (an unknown flag or config field, a bad
config argument such as `size=XXXL`, a missing --workdir, an unknown job) is one short message and exit status 2,
found before jax is imported; a crash keeps its traceback.
"""

import importlib
import os

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


def main(argv=None) -> None:
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    config = f.config
    job = f.job or config.get("job", "train")
    if job not in JOBS:
        raise config_args.UsageError(f"unknown job {job!r} (config.job); known jobs: {', '.join(sorted(JOBS))}.")
    from par_jax.core import checkpoint, distributed  # noqa: PLC0415 (after flags: multi-host JAX starts before any device use)
    distributed.initialize()
    checkpoint.quiet_orbax_logs()  # the process's log policy is the entry point's to set, not the library's
    workdir = f.workdir
    if "://" not in workdir:  # orbax and friends want absolute local paths; a relative --workdir is the cwd's
        workdir = os.path.abspath(workdir)
    logging.info("job %s, workdir %s", job, workdir)
    get_job(job)(config, workdir)


if __name__ == "__main__":
    config_args.run(main)
