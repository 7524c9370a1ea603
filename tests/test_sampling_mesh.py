"""Sampling on a mesh and across processes (issue 20, item 2).

1. On 8 simulated CPU devices (a subprocess): a sampler on a (data 2, fsdp 2, tensor 2) mesh with the trainer's
   default rules draws the same tokens and scores the same teacher-forced logits as a sampler on one device (float32,
   tiny model; logits within float32 rounding of differently split sums, observed 2e-5), and its weights really are
   split: every matrix, restored parameter and the sampler's prepared copy alike, holds a quarter of itself on each
   device (model dimension over fsdp, heads / MLP units / vocabulary over tensor), and the KV cache is split over
   the batch and the heads.
2. Two processes joined by jax.distributed on 127.0.0.1 run the evaluate job, each sampling its share of the labels;
   process 0's ADM .npz equals, byte for byte in its arrays, the one written by a single process.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MESH = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from flax import nnx
from par_jax.core import mesh as mesh_lib, sharding
from par_jax.model import ParTransformer, model_config
from par_jax.sampling import SampleSettings, Sampler, image_keys, placement

assert jax.device_count() == 8
cfg = model_config("tiny", vocab_size=64, num_classes=10, grid_shape=(8, 8), n=4, dtype="float32", init_std=0.2)
model = ParTransformer(cfg, rngs=nnx.Rngs(0))
model.output[...] = jax.random.normal(jax.random.key(1), model.output.shape) * 0.2  # a non-trivial head
settings = SampleSettings(guidance=1.5)
one = mesh_lib.create_mesh({"data": 1}, jax.devices()[:1])
mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
labels = np.array([1, 5, 10, 3], np.int32)  # 10: the null class
keys = image_keys(jax.random.key(0), np.arange(4))
forced = np.asarray(jax.random.randint(jax.random.key(2), (4, cfg.num_tokens), 0, 64))
out = {}
for name, m in (("one", one), ("mesh", mesh)):
    sampler = Sampler(model, settings, 4, mesh=m, cache_chunks=1)
    out[name + "_tokens"] = np.asarray(sampler(labels, keys)).tolist()
    if name == "one":  # an image's tokens follow its own key, not its place in the batch
        out["reversed"] = np.asarray(sampler(labels[::-1], keys[::-1]))[::-1].tolist()
    scorer = Sampler(model, settings, 4, mesh=m, cache_chunks=1, teacher_forced=True)
    out[name + "_logits"] = np.asarray(scorer.score(forced, labels)).tolist()
out["describe"] = sampler.describe()
out["cache"] = str(sampler.plan.cache_sharding.spec)
# The parameters as the evaluate job restores them (load_params(..., shardings=placement.param_shardings(...))).
params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                        placement.param_shardings(cfg, mesh, sharding.rules_from_config(None)))
shards = {}
for what, state in (("param", params), ("prepared", sampler.weights)):
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = (what + jax.tree_util.keystr(path)).removesuffix(".value")
        shards[name] = [list(x.shape), sorted({tuple(s.data.shape) for s in x.addressable_shards}),
                        len(x.addressable_shards), str(x.dtype)]
out["shards"] = shards
errors = []
for kwargs in (dict(batch_size=2), dict(batch_size=4, block_cols=32)):
    try:
        Sampler(model, settings, mesh=mesh, **kwargs)
    except ValueError as e:
        errors.append(str(e))
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh process compiling four samplers for 8 devices
def test_sampler_on_a_mesh_splits_the_weights_and_samples_like_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", _MESH, REPO], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["mesh_tokens"] == out["one_tokens"] == out["reversed"]
    assert len(np.unique(out["one_tokens"])) > 10  # really sampled, not a constant
    one, mesh = np.asarray(out["one_logits"]), np.asarray(out["mesh_logits"])
    assert np.abs(one).max() > 1.0
    np.testing.assert_allclose(mesh, one, atol=1e-4, rtol=0)

    assert out["describe"]["attention"] == "xla" and out["describe"]["block_cols"] == 0
    assert out["cache"] == "P(('data', 'fsdp'), 'tensor', None, None)"  # (B, heads, head_dim, S)
    matrices = ["attention']['wqkv", "attention']['wo", "feed_forward']['w1", "feed_forward']['w2",
                "feed_forward']['w3"]
    for what, layer in (("param", "['layers']"), ("prepared", "['layers'][1]")):
        for m in matrices:
            shape, shard_shapes, count, dtype = out["shards"][f"{what}{layer}['{m}']"]
            assert count == 8 and dtype == "float32" and len(shard_shapes) == 1, (what, m)
            assert 4 * np.prod(shard_shapes[0]) == np.prod(shape), (what, m, shape, shard_shapes)
        shape, [shard], _, _ = out["shards"][f"{what}['output']"]
        assert shard == [shape[0] // 2, shape[1] // 2]  # (embed over fsdp, vocab over tensor)
    shape, [shard], _, _ = out["shards"]["prepared['layers'][0]['attention']['wqkv']"]
    assert shape == [64, 3, 2, 32] and shard == [32, 3, 1, 32]  # (embed, q|k|v, heads, head_dim)

    assert "batch_size=2 must be a multiple of 4, the batch shards" in out["errors"][0]
    assert "block_cols=32 cuts matrices into column blocks" in out["errors"][1]


def test_the_sampling_mesh_is_one_hosts_and_says_how_to_fix_it():
    import jax

    from par_jax.core import config_args
    from par_jax.sampling import placement
    mesh = placement.local_mesh({"data": -1, "fsdp": 1, "tensor": 1, "rules": {}})
    assert dict(mesh.shape) == {"data": jax.local_device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(config_args.UsageError, match="spans this process's 1 devices.*--config.mesh.tensor=-1"):
        placement.local_mesh({"data": 1, "fsdp": 32, "tensor": 1})  # a whole pod's sizes
    with pytest.raises(ValueError, match="must have the axes \\('data', 'fsdp', 'tensor'\\)"):
        placement.check_mesh(jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)))


_EVALUATE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from par_jax.core import distributed
distributed.initialize()
from configs import par
from par_jax.evaluation import job
config = par.get_config("runlocal")
settings = json.loads(sys.argv[3])
config.eval.update(settings["eval"])
config.data.update(settings["data"])
config.sample.update(guidance=1.5)
job.run(config, sys.argv[2])
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh processes sampling, decoding and scoring
def test_two_processes_write_the_same_samples_as_one(tmp_path):
    from flax import nnx

    from configs import par
    from par_jax import tokenizer as tokenizer_lib
    from par_jax.evaluation import classifier, job
    from par_jax.model import ParTransformer, checkpoint, model_config
    from par_jax.tokenizer import train as tokenizer_train

    vq_cfg = tokenizer_lib.vq_config("fmnist", base_channels=8, z_channels=8, codebook_size=64, num_groups=4,
                                     num_res_blocks=1, attn_levels=())
    tokenizer_dir = tokenizer_train.export(tmp_path, tokenizer_lib.VQModel(vq_cfg, rngs=nnx.Rngs(0)))
    cfg = model_config("tiny", vocab_size=64, num_classes=10, grid_shape=vq_cfg.grid_shape, n=4, dtype="float32")
    checkpoint.save_params(tmp_path / "decoder", ParTransformer(cfg, rngs=nnx.Rngs(1)))
    classifier.save(tmp_path / "classifier", classifier.Classifier(rngs=nnx.Rngs(0)), {"test_accuracy": 0.0})
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    # 10 samples in batches of 4: process 0 samples 0-3 and 8-9, process 1 samples 4-7 and an empty last batch.
    settings = {"eval": dict(checkpoint=str(tmp_path / "decoder"), classifier=str(tmp_path / "classifier"),
                             name="run", reference=str(reference), num_samples=10, batch_size=4, resolution=0,
                             metrics="is", is_split_size=5, grid_images=4),
                "data": dict(tokenizer=str(tokenizer_dir))}

    port, procs = _free_port(), []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        env.pop("XLA_FLAGS", None)
        log = open(tmp_path / f"process{i}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", _EVALUATE, REPO, str(tmp_path / "two"),
                                        json.dumps(settings)], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))

    # Meanwhile, the same evaluation in this process, alone.
    config = par.get_config("runlocal")
    config.eval.update(settings["eval"])
    config.data.update(settings["data"])
    config.sample.update(guidance=1.5)
    one = job.run(config, str(tmp_path / "one"))

    for i, (proc, log) in enumerate(procs):
        proc.wait(timeout=600)
        log.close()
        text = (tmp_path / f"process{i}.log").read_text()
        assert proc.returncode == 0, text[-4000:]
    with np.load(tmp_path / "one" / "eval" / "run" / "samples.npz") as a, \
            np.load(tmp_path / "two" / "eval" / "run" / "samples.npz") as b:
        assert a["arr_0"].shape == (10, 32, 32, 3) and len(np.unique(a["arr_0"])) > 10
        np.testing.assert_array_equal(b["arr_1"], a["arr_1"])
        np.testing.assert_array_equal(b["arr_0"], a["arr_0"])
    two = json.loads((tmp_path / "two" / "eval" / "run" / job.RESULTS_FILE).read_text())
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    np.testing.assert_allclose(two["metrics"]["inception_score"], one["metrics"]["inception_score"], rtol=1e-5)
