"""Programs that the training tests run in a fresh Python process (own device count, own signals, real kills).

  python tests/training_subprocess.py meshes OUT_DIR     same train steps on several meshes -> OUT_DIR/<case>.npz
  python tests/training_subprocess.py poisoned WORKDIR STEP [overrides...]
                                                         train with a corrupt batch at STEP; exit 3 on the
                                                         NonFiniteLossError, printing its message
  python tests/training_subprocess.py huge_lr WORKDIR STEP [overrides...]
                                                         a learning rate of 1e30 for the one update that makes
                                                         STEP (loss and gradients finite, the new parameters not);
                                                         exit 3 on the NonFiniteLossError
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import par  # noqa: E402

# The tests' model: tiny, a 4x4 grid with n=4 (4 sequential tokens + 3 parallel steps), 64 codes, 4 classes.
TINY = dict(grid_shape=(4, 4), vocab_size=64, num_classes=4)


def tiny_config(overrides=()):
    """configs/par.py:runlocal shrunk further, then command-line style overrides ("--config.a.b=v")."""
    config = par.get_config("runlocal")
    config.model.update(TINY)
    config.data.update(synthetic_count=256, read_threads=1, prefetch=4)
    config.train.update(batch_size=8, num_steps=30, log_every_steps=5, checkpoint_every_steps=10)
    config.optimizer.update(warmup_steps=5)
    if overrides:
        from absl import flags  # noqa: PLC0415
        argv = ["prog", *overrides]
        fv = flags.FlagValues()
        holder = config_flags.DEFINE_config_dict("config", config, flag_values=fv, sys_argv=argv)
        fv(argv)
        config = holder.value
    return config


def meshes(out_dir):
    from par_jax.data import pipeline
    from par_jax.core import mesh as mesh_lib, optim
    from par_jax.training import train

    base = tiny_config()
    base.optimizer.ema_decay = 0.9  # EMA weights are sharded and compared too
    loader = iter(pipeline.make_train_loader(base, global_batch_size=8))
    batches = [next(loader) for _ in range(4)]
    # No warmup: with a zero-initialised vocabulary head only the head moves in step 1, so every step must count.
    schedule = optim.learning_rate_schedule(base.optimizer, 10, 0)
    no_dropout = dict(embed_dropout=0.0, resid_dropout=0.0, mlp_dropout=0.0, attn_dropout=0.0, class_dropout=0.0)
    cases = {  # name: (data, fsdp, tensor), grad_accum_steps, model overrides
        "1x1x1": ((1, 1, 1), 1, {}),
        "8x1x1": ((8, 1, 1), 1, {}),
        "2x4x1": ((2, 4, 1), 1, {}),
        "2x2x2": ((2, 2, 2), 1, {}),
        "1x1x1_nodropout": ((1, 1, 1), 1, no_dropout),
        "2x2x2_accum2_nodropout": ((2, 2, 2), 2, no_dropout),
    }
    for name, (shape, accum, model_overrides) in cases.items():
        config = base.copy_and_resolve_references()
        config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        config.train.grad_accum_steps = accum
        config.model.update(model_overrides)
        mesh = mesh_lib.create_mesh(config.mesh, devices=jax.devices()[:int(np.prod(shape))])
        trainer = train.make_trainer(config, mesh, schedule)
        state = trainer.init()
        losses = []
        for batch in batches:
            state, metrics = trainer.step(state, trainer.put(batch))
            losses.append(float(metrics["loss"]))
        arrays = {"losses": np.array(losses), "step": np.asarray(state["step"])}
        for prefix in ("params", "ema"):
            for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state[prefix]))[0]:
                arrays[prefix + jax.tree_util.keystr(path)] = np.asarray(x)
        np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
        print(name, losses, flush=True)


class _PoisonedIterator:
    """The real grain iterator (state and checkpointing unchanged) with one corrupt batch at `bad_step`.

    Tokens are int32, so a NaN cannot sit in them literally; the poison is a token id one past the vocabulary,
    which the embedding gather under jit turns into a NaN row (jnp.take's fill mode), the way a corrupt record would.
    """

    def __init__(self, inner, bad_step, vocab_size):
        self.inner, self.bad_step, self.vocab_size, self.count = inner, bad_step, vocab_size, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        self.count += 1
        if self.count == self.bad_step:
            tokens = batch["tokens"].copy()
            tokens[0, 0] = self.vocab_size
            batch["tokens"] = tokens
        return batch

    # grain's orbax handler stores a non-grain iterator's state as bytes.
    def get_state(self):
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state):
        self.inner.set_state(json.loads(state))

    def start_prefetch(self):
        self.inner.start_prefetch()


def poisoned(workdir, bad_step, *overrides):
    from par_jax.data import pipeline

    config = tiny_config(overrides)
    make_loader = pipeline.make_train_loader

    class Loader:
        def __init__(self, *args, **kwargs):
            self.loader = make_loader(*args, **kwargs)

        def __iter__(self):
            return _PoisonedIterator(iter(self.loader), int(bad_step), config.model.vocab_size)

    pipeline.make_train_loader = Loader
    _train_until_non_finite(config, workdir)


def _train_until_non_finite(config, workdir):
    from par_jax.training import train

    try:
        train.train_and_evaluate(config, workdir)
    except train.NonFiniteLossError as e:
        print(f"NonFiniteLossError: {e}", flush=True)
        sys.exit(3)


def huge_lr(workdir, bad_step, *overrides):
    import jax.numpy as jnp

    from par_jax.core import optim

    config = tiny_config(overrides)
    make_schedule = optim.learning_rate_schedule

    def schedule(*args, **kwargs):
        base = make_schedule(*args, **kwargs)
        # The update that turns step `bad_step - 1` into `bad_step` reads the schedule at bad_step - 1.
        return lambda step: jnp.where(step == int(bad_step) - 1, 1e30, base(step))

    optim.learning_rate_schedule = schedule
    _train_until_non_finite(config, workdir)


if __name__ == "__main__":
    {"meshes": meshes, "poisoned": poisoned, "huge_lr": huge_lr}[sys.argv[1]](*sys.argv[2:])
