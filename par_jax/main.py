r"""The one entry point: `python -m par_jax.main --config=configs/FILE.py:ARGS --workdir=DIR [--job=JOB]`.

The job (train, sample, evaluate, ...) comes from `config.job` or the --job flag. Each job is a plain function
`fn(config, workdir)` in the library, so tests and notebooks call the same code.
"""

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

# Jobs by name -> "module:function". Imported lazily so a job pulls in only what it needs.
JOBS = {
    "train": "par_jax.training.train:train_and_evaluate",
    "sample": "par_jax.sampling.cli:run",
    "evaluate": "par_jax.evaluation.job:run",
    "extract_codes": "par_jax.data.extract:run",
    "train_tokenizer": "par_jax.tokenizer.train:train_and_evaluate",
    "evaluate_tokenizer": "par_jax.tokenizer.evaluate:run",
    "demo": "par_jax.demo:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/par.py:size=L,n=4.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs and outputs.")
_JOB = flags.DEFINE_enum("job", None, sorted(JOBS), "Overrides config.job.")


def get_job(name: str):
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; known jobs: {sorted(JOBS)}")
    module, fn = JOBS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required.")
    from par_jax.core import checkpoint, distributed  # noqa: PLC0415 (after flags: multi-host JAX starts before any device use)
    distributed.initialize()
    checkpoint.quiet_orbax_logs()  # the process's log policy is the entry point's to set, not the library's
    job = _JOB.value or config.get("job", "train")
    workdir = _WORKDIR.value
    if "://" not in workdir:  # orbax and friends want absolute local paths; a relative --workdir is the cwd's
        workdir = os.path.abspath(workdir)
    logging.info("job %s, workdir %s", job, workdir)
    get_job(job)(config, workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
