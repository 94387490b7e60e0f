import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chipwise import flops
from chipwise.config import ModelConfig
from chipwise.model import Transformer, layer_params, stack_layers
from chipwise.train.step import next_token_loss


def make(cfg, seed=0):
    return Transformer(cfg, nnx.Rngs(params=seed))


def tokens(cfg, batch=2, seq=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)


@pytest.mark.parametrize("variant", [
    dict(),  # grouped-query attention (4 heads, 2 KV heads), SwiGLU, tied
    dict(num_kv_heads=1),  # multi-query
    dict(num_kv_heads=4, ffn="gelu", tie_embeddings=False),
])
def test_shapes_and_parameter_count(small_model_cfg, variant):
    cfg = ModelConfig(**{**small_model_cfg.__dict__, **variant})
    model = make(cfg)
    logits = model(tokens(cfg))
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert counted == flops.param_count(cfg)


def test_causal_future_tokens_do_not_change_the_past(small_model_cfg):
    model = make(small_model_cfg)
    x = tokens(small_model_cfg)
    y = x.at[:, 10:].set((x[:, 10:] + 1) % small_model_cfg.vocab_size)
    a, b = model(x), model(y)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_remat_changes_nothing_numerically(small_model_cfg):
    model = make(small_model_cfg)
    graphdef, params = nnx.split(model)
    x = tokens(small_model_cfg, seq=17)

    def loss(params, remat):
        m = nnx.merge(graphdef, params)
        return next_token_loss(m(x[:, :-1], remat=remat), x[:, 1:])

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # compiled: eager dispatch is slower
    base, g_base = value_and_grad(params, "none")
    for policy in ("full", "dots"):
        value, grads = value_and_grad(params, policy)
        np.testing.assert_allclose(value, base, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_base)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compute_keeps_fp32_params_and_is_close(small_model_cfg):
    model = make(small_model_cfg)
    x = tokens(small_model_cfg)
    full, half = model(x), model(x, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model)))
    assert half.dtype == jnp.float32  # logits come back in fp32 for the loss
    np.testing.assert_allclose(half, full, atol=0.1)
    assert not np.array_equal(half, full)  # bf16 really was used


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decode_matches_full_forward(small_model_cfg, scan_layers):
    cfg = dataclasses.replace(small_model_cfg, scan_layers=scan_layers)
    model = make(cfg)
    x = tokens(cfg, batch=1, seq=12)
    full = model(x)
    prefill, caches = model(x[:, :8], caches=model.init_cache(1, 12))
    np.testing.assert_allclose(prefill, full[:, :8], rtol=1e-5, atol=1e-5)
    for pos in range(8, 12):
        logits, caches = model(x[:, pos:pos + 1], positions=jnp.array([[pos]]), caches=caches, cache_start=pos)
        np.testing.assert_allclose(logits[:, 0], full[:, pos], rtol=1e-4, atol=1e-4)


def test_rope_makes_attention_depend_on_relative_position(small_model_cfg):
    # Shifting all positions by a constant must leave logits unchanged (rotary encodes relative offsets).
    model = make(small_model_cfg)
    x = tokens(small_model_cfg)
    pos = jnp.broadcast_to(jnp.arange(16), x.shape)
    np.testing.assert_allclose(model(x, positions=pos), model(x, positions=pos + 7), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_layers_equal_unrolled_ones(small_model_cfg, remat):
    """The same parameters, stacked, give the same loss and gradients under the scan."""
    unrolled_cfg = dataclasses.replace(small_model_cfg, num_layers=3, scan_layers=False)
    scanned_cfg = dataclasses.replace(unrolled_cfg, scan_layers=True)
    unrolled = make(unrolled_cfg)
    params = nnx.to_pure_dict(nnx.state(unrolled))
    stacked = dict(params, blocks=stack_layers([params["blocks"][i] for i in range(3)]))
    graphdefs = {cfg.scan_layers: nnx.split(make(cfg))[0] for cfg in (unrolled_cfg, scanned_cfg)}
    x = tokens(unrolled_cfg)

    def loss(params, scan):
        model = nnx.merge(graphdefs[scan], params)
        return next_token_loss(model(x[:, :-1], remat=remat), x[:, 1:])

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # compiled: eager dispatch is slower
    l_unrolled, g_unrolled = value_and_grad(params, False)
    l_scanned, g_scanned = value_and_grad(stacked, True)
    np.testing.assert_allclose(l_scanned, l_unrolled, rtol=1e-5)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(layer_params(g_scanned, i, scanned_cfg)),
                        jax.tree.leaves(layer_params(g_unrolled, i, unrolled_cfg))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_scanned["embed"], g_unrolled["embed"], rtol=1e-5, atol=1e-6)
