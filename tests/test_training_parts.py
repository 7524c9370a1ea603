"""Pieces of training, in process and without compiling a model: mesh shapes, sharding rules, the learning-rate
schedule, the weight-decay mask and its effect, FLOP counts, evaluator lookup."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import par
from par_jax.model import ParTransformer, model_config
from par_jax.core import mesh as mesh_lib, optim, sharding
from par_jax.training import evaluators, flops

OPT = par.get_config("size=B").optimizer


def _specs(cfg):
    return sharding.logical_specs(nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))[1])


def _abstract_mesh(data, fsdp, tensor):
    return jax.sharding.AbstractMesh((data, fsdp, tensor), mesh_lib.AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    assert mesh_lib.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_lib.mesh_shape((2, 4, 1), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="not divisible by 3"):
        mesh_lib.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="has 4 devices but 8"):
        mesh_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_lib.mesh_shape({"data": -1, "expert": 2}, 8)


def test_rules_map_every_parameter_and_respect_divisibility():
    cfg = model_config("B", grid_shape=(16, 16), n=4)
    specs = _specs(cfg)
    names = {n for s in jax.tree.leaves(specs, is_leaf=sharding.is_logical_names) for n in s} - {None}
    assert names <= set(sharding.DEFAULT_RULES), names  # every logical name the model uses has a rule
    rules, mesh = sharding.rules_from_config(), _abstract_mesh(2, 4, 2)
    wqkv = sharding.logical_to_mesh(specs["layers"]["attention"]["wqkv"], (12, 768, 3, 12, 64), mesh, rules)
    assert wqkv == P(None, "fsdp", None, "tensor", None)
    assert sharding.logical_to_mesh(("vocab", "embed"), (16384, 768), mesh, rules) == P("tensor", "fsdp")
    # 1001 class rows do not split 4 ways: replicated instead of failing.
    fsdp_classes = sharding.rules_from_config({"classes": "fsdp", "embed": ""})
    assert sharding.logical_to_mesh(("classes", "embed"), (1001, 768), mesh, fsdp_classes) == P(None, None)
    # A mesh axis is used once per array even if two logical names map to it.
    both = sharding.rules_from_config({"vocab": "fsdp"})
    assert sharding.logical_to_mesh(("vocab", "embed"), (16384, 768), mesh, both) == P("fsdp", None)
    with pytest.raises(ValueError, match="unknown logical axis 'experts'"):
        sharding.rules_from_config({"experts": "tensor"})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.rules_from_config({"embed": "model"})


def test_schedule_warmup_cosine_to_zero_and_constant():
    opt = OPT.copy_and_resolve_references()
    schedule = optim.learning_rate_schedule(opt, total_steps=1000, warmup=100)
    lr = opt.lr
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(50)), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(550)), lr / 2, rtol=1e-5)  # half-way through the cosine
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)
    opt.schedule = "constant"
    constant = optim.learning_rate_schedule(opt, total_steps=1000, warmup=0)
    assert float(constant(0)) == float(constant(999)) == pytest.approx(lr)
    opt.schedule = "linear"
    with pytest.raises(ValueError, match="unknown optimizer.schedule 'linear'"):
        optim.learning_rate_schedule(opt, 1000, 0)
    assert optim.warmup_steps(OPT, steps_per_epoch=5004.6) == round(15 * 5004.6)  # 15 epochs of ImageNet at 256


def test_weight_decay_hits_matrices_and_embeddings_but_not_norms():
    cfg = model_config("tiny", grid_shape=(4, 4), n=4, vocab_size=32, num_classes=4)
    specs = _specs(cfg)
    mask = optim.decay_mask(specs)
    assert mask["layers"]["attention_norm"]["weight"] is False and mask["norm"]["weight"] is False
    assert mask["tok_embeddings"] and mask["cls_embedding"] and mask["transition"] and mask["output"]
    assert mask["layers"]["feed_forward"]["w1"] and mask["layers"]["attention"]["wqkv"]
    # One AdamW step with zero gradients: only decayed parameters shrink, by lr * weight_decay.
    opt = OPT.copy_and_resolve_references()
    tx = optim.make_optimizer(opt, optax.constant_schedule(0.1), specs)
    params = jax.tree.map(lambda s: jnp.ones([2] * len(s)), specs, is_leaf=sharding.is_logical_names)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["output"], 1 - 0.1 * 0.05, rtol=1e-6)
    np.testing.assert_array_equal(new["norm"]["weight"], 1.0)
    np.testing.assert_array_equal(new["layers"]["ffn_norm"]["weight"], 1.0)


def test_gradients_are_clipped_to_the_configured_global_norm():
    specs = {"w": ("embed", "mlp")}
    opt = OPT.copy_and_resolve_references()
    opt.update(weight_decay=0.0, grad_clip=1.0)
    params = {"w": jnp.zeros((3, 3))}
    grads = [{"w": jnp.full((3, 3), 100.0)}, {"w": jnp.arange(9.0).reshape(3, 3) / 10}]

    def second_update(tx):
        state, update = tx.init(params), jax.jit(tx.update)
        for g in grads:
            updates, state = update(g, state, params)
        return updates["w"]

    ours = second_update(optim.make_optimizer(opt, optax.constant_schedule(0.1), specs))
    adam = optax.adamw(0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    # Adam normalises one step, so clipping shows from the second step on: the 100x first gradient would
    # otherwise dominate the moments.
    np.testing.assert_allclose(ours, second_update(optax.chain(optax.clip_by_global_norm(1.0), adam)), rtol=1e-6)
    assert not np.allclose(ours, second_update(adam), rtol=1e-3)
    opt.b1 = 1.5
    with pytest.raises(ValueError, match="b1 must be in"):
        optim.make_optimizer(opt, optax.constant_schedule(1.0), specs)


def test_flops_match_the_closed_form_and_xla():
    b = model_config("B", grid_shape=(16, 16), n=1)
    # For n=1 the sequence is the 256 tokens; the closed form is 2 * tokens * (layer matmul params + head)
    # plus the attention products.
    layer_params = 12 * (4 * 768 * 768 + 3 * 768 * 2048)
    expected = 2 * 256 * layer_params + 2 * 256 * 768 * 16384 + 12 * 4 * 256 * 256 * 768
    assert flops.forward_flops_per_example(b) == expected
    assert flops.train_flops_per_example(b) == 3 * expected
    # XLA's own count for a small model's forward agrees within 3% (it also counts softmax, norms, ...; 1.2% here).
    # Unrolled layers: XLA's cost analysis counts a scanned loop body once.
    cfg = model_config("tiny", grid_shape=(8, 8), n=4, vocab_size=512, num_classes=4, dim=128, num_heads=2,
                       dtype="float32", scan_layers=False)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: ParTransformer(cfg, rngs=nnx.Rngs(0))))

    def forward(params, tokens, labels):
        return nnx.merge(graphdef, params)(tokens, labels, return_logits=False)[0]

    tokens, labels = jax.ShapeDtypeStruct((2, 64), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
    cost = jax.jit(forward).lower(params, tokens, labels).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] == pytest.approx(2 * flops.forward_flops_per_example(cfg), rel=0.03)


def test_peak_flops_table_and_override():
    assert flops.peak_flops_per_device("bfloat16", configured=1e12) == (1e12, "config")

    class FakeDevice:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert flops.table_peak_flops(FakeDevice(), "bfloat16") == 989e12
    assert flops.table_peak_flops(FakeDevice(), "float32") is None


def _scaled_seed(model, config, *, step, workdir, scale=1.0):
    return {"value": scale * config.seed}


class _Counter:
    """A class plug-in: built (and checked) once before training, then called at each evaluation step."""
    built = 0

    def __init__(self, config, *, scale=1.0):
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        type(self).built += 1
        self.scale, self.calls = scale, 0

    def __call__(self, model, config, *, step, workdir, writer=None):
        self.calls += 1
        if writer is not None:
            writer.append(step)
        return {"calls": self.calls * self.scale}


def test_evaluators_resolve_validate_and_run():
    config = par.get_config("runlocal")
    evaluators.REGISTRY["test_counter"] = f"{__name__}:_Counter"
    try:
        config.evals = {"test_counter": {"every_steps": 10, "scale": 3.0},
                        "explicit": {"fn": f"{__name__}:_scaled_seed", "every_steps": 0}}
        _Counter.built = 0
        evals = evaluators.Evaluators(config)
        assert _Counter.built == 1  # built before the first step
        assert [e[0] for e in evals.due(20, last=False)] == ["test_counter"]
        assert sorted(e[0] for e in evals.due(7, last=True)) == ["explicit", "test_counter"]
        written = []
        assert evals.run(evals.due(7, last=True), None, config, step=7, workdir="", writer=written) == {
            "eval/test_counter/calls": 3.0, "eval/explicit/value": 1.0 * config.seed}
        assert evals.run(evals.due(20, last=False), None, config, step=20, workdir="") == {
            "eval/test_counter/calls": 6.0}  # the same object: its state carries over
        assert written == [7] and _Counter.built == 1  # the writer reaches plug-ins that take one
        config.evals = {"test_counter": {"every_steps": 10, "scale": -1.0}}
        with pytest.raises(ValueError, match="scale must be positive"):  # checked before training starts
            evaluators.Evaluators(config)
    finally:
        del evaluators.REGISTRY["test_counter"]
    config.evals = {"fid": {"every_steps": 10}}
    with pytest.raises(ValueError, match="no evaluator named 'fid'"):
        evaluators.Evaluators(config)
    config.evals = {"x": {"fn": "par_jax.nothing:run"}}
    with pytest.raises(ValueError, match="cannot load evaluator 'par_jax.nothing:run'"):
        evaluators.Evaluators(config)


def test_the_registry_names_the_evaluation_and_sample_grid_plugins(tmp_path):
    import importlib
    for name in ("eval", "samples"):
        module, _, attr = evaluators.REGISTRY[name].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    # train.sample_every_steps > 0 is the `samples` entry (unless config.evals has one); its PNG needs a tokenizer.
    config = par.get_config("runlocal")
    config.train.sample_every_steps = 50
    config.data.tokenizer = str(tmp_path / "missing_tokenizer")
    assert evaluators.entries_of(config) == {"samples": {"every_steps": 50}}
    with pytest.raises(FileNotFoundError, match="missing_tokenizer"):
        evaluators.Evaluators(config)
    config.evals = {"samples": {"every_steps": 7, "num_images": 4}}
    assert evaluators.entries_of(config) == {"samples": {"every_steps": 7, "num_images": 4}}
    config.train.sample_every_steps = 0
    config.evals = {}
    assert evaluators.entries_of(config) == {}
