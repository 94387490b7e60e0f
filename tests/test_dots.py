"""bf16 dots on CPUs (chipwise/dots.py, sharding.PLATFORM_RULES' dot_result): under the CPU rule they multiply bf16
operands into an fp32 result (the form XLA:CPU runs on AMX) in the forward and the backward pass, with the value
and gradients of the plain bf16 dot; outside a mesh (the bare model) they are plain dots."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from chipwise.config import MeshConfig
from chipwise.dots import matmul
from chipwise.sharding import make_mesh, platform_dot_result, use_mesh


def operands():
    x = jax.random.normal(jax.random.key(0), (48, 32), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (32, 24), jnp.float32)  # an fp32 master weight
    g = jax.random.normal(jax.random.key(2), (48, 24), jnp.float32)
    return x, w, g


def loss_and_grads(x, w, g):
    return jax.value_and_grad(lambda x, w: jnp.sum(matmul(x, w, jnp.bfloat16).astype(jnp.float32) * g),
                              argnums=(0, 1))(x, w)


def dots_in(hlo: str) -> list[tuple[str, ...]]:
    """(result type, operand types) of every dot in compiled HLO text; operands are looked up in the dot's own
    computation (fused computations name their parameters param_0, param_1, ... each)."""
    dots = []
    for computation in hlo.split("\n\n"):
        types = dict(re.findall(r"(%?[\w.-]+) = (\w+)\[", computation))
        for name, result, operands in re.findall(r"(%?[\w.-]+) = (\w+)\[[^=]*? dot\(([^)]*)\)", computation):
            dots.append((result, *(types[o.strip()] for o in operands.split(","))))
    return dots


def test_the_cpu_rule_gives_bf16_dots_an_fp32_result_forward_and_backward():
    x, w, g = operands()
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    with use_mesh(mesh):
        assert platform_dot_result() == "float32"
        lowered = jax.jit(loss_and_grads).lower(x, w, g)
        value, (d_x, d_w) = jax.jit(loss_and_grads)(x, w, g)
    # What chipwise asks of XLA: three bf16 x bf16 -> fp32 dots (forward, input gradient, weight gradient).
    assert dots_in(lowered.as_text("hlo")) == [("f32", "bf16", "bf16")] * 3
    # (What XLA:CPU then keeps in bf16 depends on the CPU and the jaxlib; docs/benchmarks.md has this machine's.)
    assert d_x.dtype == jnp.bfloat16 and d_w.dtype == jnp.float32  # the weight gradient never passes through bf16

    # The plain bf16 dot's value and gradients (what GPUs and TPUs compute), to bf16 precision.
    with_plain = jax.value_and_grad(
        lambda x, w: jnp.sum((x @ w.astype(jnp.bfloat16)).astype(jnp.float32) * g), argnums=(0, 1))
    ref_value, (ref_x, ref_w) = with_plain(x, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-2)
    for got, want in ((d_x, ref_x), (d_w, ref_w)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_outside_a_mesh_dots_are_plain():
    x, w, g = operands()
    assert platform_dot_result() is None
    lowered = jax.jit(loss_and_grads).lower(x, w, g)
    assert dots_in(lowered.as_text("hlo")) == [("bf16", "bf16", "bf16")] * 3

    assert matmul(x.astype(jnp.float32), w, jnp.float32).dtype == jnp.float32


def test_cpu_fused_attention_in_bf16_matches_the_fp32_reference():
    from chipwise.attention import cpu_fused, reference

    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(key, (2, 32, n, 16), jnp.float32) for key, n in zip(keys, (4, 2, 2)))
    cotangent = jax.random.normal(keys[3], q.shape)

    def out_and_grads(fn, dtype):
        def f(q, k, v):
            return jnp.sum(fn(q, k, v, is_causal=True).astype(jnp.float32) * cotangent)
        return jax.value_and_grad(f, argnums=(0, 1, 2))(*(a.astype(dtype) for a in (q, k, v)))

    value, grads = out_and_grads(cpu_fused.attend, jnp.bfloat16)
    ref_value, ref_grads = out_and_grads(reference.attend, jnp.float32)
    np.testing.assert_allclose(value, ref_value, rtol=2e-2, atol=2e-2 * abs(float(ref_value)))
    for got, want in zip(grads, ref_grads):
        got, want = np.asarray(got, np.float32), np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=5e-2, atol=3e-2 * np.abs(want).max())
