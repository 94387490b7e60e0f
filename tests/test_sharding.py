import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from chipwise.attention import reference
from chipwise.config import MeshConfig, load_config
from chipwise.errors import ConfigError
from chipwise.sharding import logical_to_spec, make_mesh, resolve_mesh_shape, use_mesh
from chipwise.train.step import build_steps
from conftest import losses_and_params


def mesh_of(data, fsdp, tensor, n=None):
    devices = jax.devices()[: n or data * fsdp * tensor]
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)


def test_rules_give_megatron_style_parameter_and_activation_specs():
    mesh = mesh_of(2, 2, 2)
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "seq", "embed"), (8, 16, 64), mesh) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("vocab", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
    # One KV head cannot be split over tensor=2: it is replicated instead of failing.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == P("fsdp", None, None)
    # A batch that data x fsdp cannot split falls back to the data axis alone.
    assert logical_to_spec(("batch", "seq"), (2, 16), mesh) == P("data", None)


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == {"pipeline": 1, "data": 4, "fsdp": 2,
                                                                            "context": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="needs 4 devices but 8"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="cannot fill 8 devices"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    # Per-platform rules are data: Trainium caps tensor parallelism at one chip's 4 devices.
    with pytest.raises(ConfigError, match="exceeds 4 on neuron"):
        resolve_mesh_shape(MeshConfig(data=1, fsdp=1, tensor=8), 8, platform="neuron")


SMALL = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "model.vocab_size=128", "train.batch_size=8", "train.seq_len=32", "train.dtype=float32",
         "train.warmup_steps=2", "train.steps=5"]


def five_step_losses(data, fsdp, tensor, extra=()):
    return losses_and_params(SMALL + list(extra), MeshConfig(data=data, fsdp=fsdp, tensor=tensor), steps=5)


def test_sharded_training_matches_one_device():
    assert len(jax.devices()) >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (see conftest)"
    base, base_params = five_step_losses(1, 1, 1)
    assert base[-1] < base[0]  # it really trained
    for layout in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        losses, params = five_step_losses(*layout)
        np.testing.assert_allclose(losses, base, rtol=1e-5, err_msg=str(layout))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sharded_training_matches_one_device_with_unrolled_layers():
    base, base_params = five_step_losses(1, 1, 1, ["model.scan_layers=false"])
    losses, params = five_step_losses(2, 2, 2, ["model.scan_layers=false"])
    np.testing.assert_allclose(losses, base, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch():
    base, _ = five_step_losses(1, 1, 1)
    accumulated, _ = five_step_losses(2, 1, 1, ["train.grad_accum=2"])
    np.testing.assert_allclose(accumulated, base, rtol=1e-5)


def test_parameters_are_really_sharded():
    cfg = load_config(None, SMALL)
    mesh = mesh_of(2, 2, 2)
    with use_mesh(mesh):
        state = build_steps(cfg, mesh, reference.attend, jnp.float32).init()
    w_up = state["params"]["blocks"]["mlp"]["w_up"]  # stacked layers: [layers, embed, mlp]
    assert w_up.sharding.spec == P(None, "fsdp", "tensor")
    assert w_up.addressable_shards[0].data.shape == (2, 32, 64)
    mu = state["opt_state"][1][0].mu["blocks"]["mlp"]["w_up"]  # Adam's first moment shards like its param
    assert mu.sharding.spec == P(None, "fsdp", "tensor")
