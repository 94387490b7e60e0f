"""Precision and optimizer memory: ZeRO-1 (train.shard_optimizer), bf16 AdamW moments (train.moments_dtype) and bf16
parameters (train.param_dtype), on tiny models and simulated CPU devices."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from chipwise.config import MeshConfig, load_config
from chipwise.plan.memory import training_memory
from chipwise.sharding import add_axis, make_mesh, use_mesh
from chipwise.train.compiled_step import build_train_step

SMALL = ["model.scan_layers=true",  # the layout accelerators default to; CPUs default to unrolled
         "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "model.vocab_size=128", "train.batch_size=8", "train.seq_len=32", "train.dtype=float32",
         "train.warmup_steps=2", "train.lr=1e-2"]
DATA, FSDP = 4, 2
# bf16 moments end a 20-step run within this share of the fp32-moments loss (docs/architecture.md).
BF16_MOMENTS_LOSS_TOLERANCE = 0.02


def batches(steps: int, batch: int = 8, seq: int = 32, vocab: int = 128) -> np.ndarray:
    """Learnable sequences (each token the previous one plus 1, from a random start), as in test_sharding."""
    starts = np.random.default_rng(0).integers(0, vocab, (steps, batch, 1))
    return ((starts + np.arange(seq + 1)) % vocab).astype(np.int32)


def run(extra=(), steps: int = 3, data: int = 1, fsdp: int = 1):
    """(losses, final state, compiled TrainStep) of `steps` steps of SMALL + `extra` on a data x fsdp mesh."""
    cfg = load_config(None, SMALL + [f"train.steps={max(steps, 3)}", *extra])
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=1), jax.devices()[: data * fsdp])
    step = build_train_step(cfg, mesh, "cpu").compile()
    losses = []
    with use_mesh(mesh, step.rules):
        state = step.steps.init()
        for tokens in batches(steps):
            state, metrics = step.train(state, jax.device_put(tokens, step.steps.batch_sharding), 0.0)
            losses.append(float(metrics["loss"]))
    return np.array(losses), state, step


@pytest.fixture(scope="module")
def zero1_runs():
    assert len(jax.devices()) >= DATA * FSDP, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (conftest)"
    return {shard: run([f"train.shard_optimizer={str(shard).lower()}"], data=DATA, fsdp=FSDP)
            for shard in (False, True)}


def moments(opt_state):
    adam = opt_state[1][0]  # chain(clip, adamw): adamw's first transform is Adam's scaling
    return [adam.mu, adam.nu]


def per_device_bytes(tree) -> int:
    """Bytes of `tree` (arrays or ShapeDtypeStructs with shardings) on one device."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_zero1_gives_the_same_updates(zero1_runs):
    (base, base_state, _), (zero1, zero1_state, _) = zero1_runs[False], zero1_runs[True]
    assert base[-1] < base[0]
    np.testing.assert_allclose(zero1, base, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(zero1_state["params"]), jax.tree.leaves(base_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The moments really are split over data as well; the parameters are not.
    mu = moments(zero1_state["opt_state"])[0]["blocks"]["mlp"]["w_up"]  # [layers=2, embed=64, mlp=128]
    assert mu.sharding.spec == P(None, ("fsdp", "data"), None)
    assert zero1_state["params"]["blocks"]["mlp"]["w_up"].sharding.spec == P(None, "fsdp", None)


def test_zero1_cuts_the_optimizer_state_xla_takes_by_the_data_factor(zero1_runs):
    (_, _, base), (_, _, zero1) = zero1_runs[False], zero1_runs[True]
    optimizer = per_device_bytes(moments(base.abstract_state["opt_state"]))
    assert per_device_bytes(moments(zero1.abstract_state["opt_state"])) == optimizer / DATA  # all dims divide here
    args = {k: r[2].train.memory_analysis().argument_size_in_bytes for k, r in zero1_runs.items()}
    assert args[False] - args[True] == pytest.approx((1 - 1 / DATA) * optimizer, rel=0.1)
    # The planner's memory model counts what XLA takes: parameters + moments (+ tokens, counters and the key).
    est = training_memory(load_config(None, SMALL).model, 32, 8 / (DATA * FSDP), fsdp=FSDP, tensor=1, pipeline=1,
                          microbatches=1, remat="none", data=DATA, shard_optimizer=True)
    state = zero1.abstract_state
    counters = (per_device_bytes(state) - per_device_bytes(state["params"])
                - per_device_bytes(moments(state["opt_state"])))
    tokens_and_fault = 8 // (DATA * FSDP) * 33 * 4 + 4
    assert est.params + est.optimizer == pytest.approx(args[True] - counters - tokens_and_fault, rel=0.01)


def test_bf16_moments_train_like_fp32_moments():
    fp32, _, _ = run(steps=20)
    bf16, state, _ = run(["train.moments_dtype=bfloat16"], steps=20)
    assert {m.dtype for m in jax.tree.leaves(moments(state["opt_state"]))} == {jnp.dtype(jnp.bfloat16)}
    assert {p.dtype for p in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert fp32[-1] < 0.5 * fp32[0]  # it learns the sequences
    assert bf16[-1] == pytest.approx(fp32[-1], rel=BF16_MOMENTS_LOSS_TOLERANCE)


def test_bf16_params_are_stored_in_bf16_and_still_train():
    losses, state, step = run(["train.param_dtype=bfloat16"], steps=20)
    assert {p.dtype for p in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert {m.dtype for m in jax.tree.leaves(moments(state["opt_state"]))} == {jnp.dtype(jnp.float32)}
    assert {p.dtype for p in jax.tree.leaves(step.abstract_state["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_compute_on_cpu_follows_fp32(zero1_runs):
    """train.dtype=bfloat16 on a CPU: every dot bf16 x bf16 -> fp32 (dots.py, the CPU rule), through the sharded
    step (data 4 x fsdp 2), gives the fp32 step's losses to bf16 precision."""
    fp32 = zero1_runs[False][0]
    bf16, state, _ = run(["train.dtype=bfloat16"], data=DATA, fsdp=FSDP)
    assert {p.dtype for p in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}  # fp32 master weights
    np.testing.assert_allclose(bf16, fp32, rtol=0.01)
    assert bf16[-1] < bf16[0]


def test_add_axis_splits_the_first_dimension_it_can():
    mesh = SimpleNamespace(shape={"data": 4, "fsdp": 2, "context": 1, "tensor": 1})
    assert add_axis(P(None, "fsdp", None), (2, 64, 128), mesh) == P(None, ("fsdp", "data"), None)
    assert add_axis(P(None, "fsdp"), (8, 64), mesh) == P("data", "fsdp")
    assert add_axis(P("fsdp"), (6,), mesh) == P("fsdp")  # nothing divides: left as it was
    assert add_axis(P("data"), (8,), mesh) == P("data")
    assert add_axis(P(None), (8,), SimpleNamespace(shape={"data": 1})) == P(None)



def test_defaults_stay_fp32_without_zero1():
    t = load_config(None, []).train
    assert (t.param_dtype, t.moments_dtype, t.shard_optimizer) == ("float32", "float32", False)
