"""Sample grids during training (the `samples` plug-in, par_jax.evaluation.grids) on two processes.

Two processes on 127.0.0.1 joined by jax.distributed (CPU, 2 devices each) hold a tiny decoder whose parameters are
split over both processes (FSDP over 4 devices), as in a multi-host training run. The plug-in must gather them,
sample each process's share of the grid, gather the images and let process 0 alone write the PNG. The picture must
equal the same shares sampled by one process (same keys, same per-process batch of 4 on 2 devices).
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES, STEP = 6, 5

_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from absl import logging
logging.set_verbosity(logging.INFO)
from par_jax.core import distributed
distributed.initialize()
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from configs import par
from par_jax import sampling, tokenizer as tokenizer_lib
from par_jax.evaluation import generate, grids
from par_jax.model import ParTransformer, model_config
from par_jax.utils import images as images_lib

mode, workdir, tokenizer = sys.argv[2:5]
num, step = int(sys.argv[5]), int(sys.argv[6])
model = ParTransformer(model_config("tiny", vocab_size=64, num_classes=10, grid_shape=(8, 8), n=4, dtype="float32"),
                       rngs=nnx.Rngs(1))
config = par.get_config("runlocal")
config.data.tokenizer = tokenizer
config.train.sample_num_images = num
if mode == "two_processes":
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    def split(x):  # every parameter split over the 4 devices of both processes where a dimension allows it
        x = np.asarray(x)
        axis = next((i for i, d in enumerate(x.shape) if d % 4 == 0), None)
        spec = P(*[("fsdp" if i == axis else None) for i in range(x.ndim)])
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(split, state))
    assert not all(x.is_fully_addressable for x in jax.tree.leaves(nnx.state(model)))
    grids.SampleGrid(config)(model, config, step=step, workdir=workdir)
else:  # one process: the two processes' shares (samples 0-3 and 4-5, padded to 4), sampled the way each does
    vq = tokenizer_lib.load(tokenizer)
    labels = np.arange(num, dtype=np.int32) % 10
    key = jax.random.fold_in(jax.random.key(config.sample.seed), step)
    sampler = sampling.Sampler(model, sampling.SampleSettings.from_config(config.sample), batch_size=4)
    decode = generate.make_decoder(vq, (8, 8), 0)
    parts = []
    for p in range(2):
        index = np.arange(4 * p, 4 * p + 4)  # sample i draws with its own key, fold_in(key, i)
        part = labels[index[index < num]]
        tokens = sampler(np.concatenate([part, np.zeros(4 - len(part), np.int32)]), sampling.image_keys(key, index))
        parts.append(decode(tokens)[:len(part)])
    grid = images_lib.make_grid(np.concatenate(parts), rows=int(np.sqrt(num)))
    images_lib.save_png(f"{workdir}/reference.png", grid)
print("DONE", jax.process_index())
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS="--xla_force_host_platform_device_count=2", **extra)


def _pixels(path):
    return np.asarray(Image.open(path))


@pytest.mark.slow  # three fresh processes compiling the sampler
def test_sample_grid_on_two_processes_equals_one_process(tmp_path):
    from flax import nnx

    from par_jax import tokenizer as tokenizer_lib
    from par_jax.tokenizer import train as tokenizer_train
    cfg = tokenizer_lib.vq_config("fmnist", base_channels=8, z_channels=8, codebook_size=64, num_groups=4,
                                  num_res_blocks=1, attn_levels=())
    tokenizer = str(tokenizer_train.export(tmp_path, tokenizer_lib.VQModel(cfg, rngs=nnx.Rngs(0))))
    workdir = tmp_path / "run"
    args = [str(workdir), tokenizer, str(NUM_IMAGES), str(STEP)]

    port, procs = _free_port(), []
    for i in range(2):
        env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        log = open(tmp_path / f"process{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", _SCRIPT, REPO, "two_processes", *args], env=env,
                                       cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log))
    reference = subprocess.run([sys.executable, "-c", _SCRIPT, REPO, "one_process", *args], env=_env(), cwd=REPO,
                               capture_output=True, text=True, timeout=600)
    logs = []
    for proc, log in procs:
        proc.wait(timeout=600)
        log.close()
        logs.append(open(log.name).read())
    assert all(p.returncode == 0 for p, _ in procs), "\n".join(text[-3000:] for text in logs)
    assert reference.returncode == 0, reference.stderr[-3000:]

    png = workdir / "samples" / f"step_{STEP:08d}.png"
    assert sorted(os.listdir(workdir / "samples")) == [png.name]
    # Process 0 wrote it; process 1 only sampled its share.
    assert "wrote the sample grid of step 5" in logs[0] and "wrote the sample grid" not in logs[1]
    got, want = _pixels(png), _pixels(workdir / "reference.png")
    assert got.shape == (2 * 34 + 2, 3 * 34 + 2, 3) and got.std() > 0
    np.testing.assert_array_equal(got, want)
