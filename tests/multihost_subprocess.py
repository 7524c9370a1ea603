"""The single-process reference for tests/test_multihost.py, run in a fresh process with its own device count.

  python tests/multihost_subprocess.py reference OUT.npz NUM_PROCESSES [config overrides...]

Trains with `train.make_trainer` on all local devices, feeding each step the global batch a multi-process run
builds: the per-process batches of processes 0..NUM_PROCESSES-1 (each from its own data shard) stacked in process
order. Writes the final parameters and the losses to OUT.npz.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import par  # noqa: E402


def config_with(overrides):
    config = par.get_config("runlocal")
    argv = ["prog", *overrides]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_dict("config", config, flag_values=fv, sys_argv=argv)
    fv(argv)
    return holder.value


def reference(out, num_processes, overrides):
    from par_jax.data import pipeline
    from par_jax.core import mesh as mesh_lib, optim
    from par_jax.training import train

    config = config_with(overrides)
    tc = config.train
    loaders = [iter(pipeline.make_train_loader(config, global_batch_size=tc.batch_size, process_index=i,
                                               process_count=num_processes)) for i in range(num_processes)]
    schedule = optim.learning_rate_schedule(config.optimizer, tc.num_steps, optim.warmup_steps(config.optimizer, 0))
    mesh = mesh_lib.create_mesh(config.mesh)
    trainer = train.make_trainer(config, mesh, schedule)
    losses = []
    with jax.set_mesh(mesh):
        state = trainer.init()
        for _ in range(tc.num_steps):
            parts = [next(it) for it in loaders]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, metrics = trainer.step(state, trainer.put(batch))
            losses.append(float(metrics["loss"]))
    arrays = {"losses": np.array(losses)}
    for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]:
        arrays["params" + jax.tree_util.keystr(path)] = np.asarray(x)
    np.savez(out, **arrays)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode != "reference":
        raise SystemExit(f"unknown mode {mode!r}")
    reference(args[0], int(args[1]), args[2:])
