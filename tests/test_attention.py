import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipwise import attention
from chipwise.attention import reference


def qkv(b=2, t=256, h=4, kv=2, d=64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, t, h, d)), jax.random.normal(k2, (b, t, kv, d)),
            jax.random.normal(k3, (b, t, kv, d)))


def naive(q, k, v):
    """Causal softmax attention written out, for grouped-query heads."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


def test_reference_is_causal_grouped_query_attention():
    q, k, v = qkv(t=32)
    np.testing.assert_allclose(reference.attend(q, k, v, is_causal=True), naive(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cached_attention_sees_each_query_up_to_its_own_position(dtype):
    """The serving engine's attention over a KV cache: rows at different positions (a prefill chunk from 3, a
    single decode query at 9), and stale entries past them that no query may reach."""
    q, k, v = qkv(b=2, t=16, h=6, kv=2, d=32, seed=3)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    positions = jnp.array([np.arange(3, 7), [9, 9, 9, 9]])  # row 1 repeats one query
    got = reference.attend_cached(q[:, :4], k, v, positions)
    for b in range(2):
        for i in range(4):
            n = int(positions[b, i]) + 1  # the keys this query may see
            scores = jnp.einsum("hd,shd->hs", q[b, i].astype(jnp.float32),
                                jnp.repeat(k[b, :n], 3, axis=1).astype(jnp.float32)) / np.sqrt(32)
            want = jnp.einsum("hs,shd->hd", jax.nn.softmax(scores, -1), jnp.repeat(v[b, :n], 3, axis=1)
                              .astype(jnp.float32))
            tol = 1e-5 if dtype == jnp.float32 else 3e-2
            np.testing.assert_allclose(np.asarray(got[b, i], np.float32), want, rtol=tol, atol=tol)
    assert got.dtype == dtype


def test_registry_prefers_each_backends_kernel_and_explains_fallbacks():
    def pick(platform, seq_len=256, dtype=jnp.bfloat16):
        return attention.select(platform, seq_len=seq_len, head_dim=64, num_heads=4, num_kv_heads=2, dtype=dtype)

    assert pick("cpu").name == "cpu_fused" and pick("cpu").fallback_reason == ""
    assert pick("gpu").name == "cudnn"
    assert pick("tpu").name == "splash"
    fp32_gpu = pick("gpu", dtype=jnp.float32)
    assert fp32_gpu.name == "reference" and "cudnn not used" in fp32_gpu.fallback_reason
    short_tpu = pick("tpu", seq_len=100)
    assert short_tpu.name == "reference" and "multiple of 128" in short_tpu.fallback_reason
    neuron = pick("neuron")  # no Neuron plugin here: the hook declines with its reason
    assert neuron.name == "reference" and "nki not used" in neuron.fallback_reason


def test_cudnn_declines_fp32_and_odd_head_dims():
    from chipwise.attention import cudnn

    ok = dict(platform="gpu", seq_len=128, num_heads=4, num_kv_heads=4)
    assert cudnn.unsupported_reason(head_dim=128, dtype=jnp.bfloat16, **ok) is None
    assert "bf16" in cudnn.unsupported_reason(head_dim=128, dtype=jnp.float32, **ok)
    assert "head_dim" in cudnn.unsupported_reason(head_dim=256, dtype=jnp.bfloat16, **ok)


def test_tpu_splash_kernel_matches_reference_in_interpret_mode():
    """The real Pallas kernel, run by Pallas' interpreter on the CPU: forward and gradients."""
    from chipwise.attention import tpu_splash

    q, k, v = qkv()
    np.testing.assert_allclose(tpu_splash.attend(q, k, v, is_causal=True, interpret=True),
                               reference.attend(q, k, v, is_causal=True), rtol=1e-4, atol=1e-4)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) ** 2)

    splash_grads = jax.grad(lambda *a: loss(lambda *x: tpu_splash.attend(*x, is_causal=True, interpret=True), *a),
                            argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(lambda *a: loss(lambda *x: reference.attend(*x, is_causal=True), *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(splash_grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_splash_declines_unaligned_sequences():
    from chipwise.attention import tpu_splash

    assert "multiple of 128" in tpu_splash.unsupported_reason(platform="tpu", seq_len=100, head_dim=128)


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.select("cpu", seq_len=8, head_dim=8, num_heads=1, num_kv_heads=1, dtype=jnp.float32,
                         override="flash9000")


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_cpu_fused_attention_matches_reference_values_and_gradients(heads, kv_heads):
    from chipwise.attention import cpu_fused

    q, k, v = qkv(t=64, h=heads, kv=kv_heads, d=16)
    np.testing.assert_allclose(cpu_fused.attend(q, k, v, is_causal=True), reference.attend(q, k, v, is_causal=True),
                               rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(7), q.shape)  # a non-trivial upstream gradient

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, is_causal=True) * cotangent), argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(grads(cpu_fused.attend), grads(reference.attend)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 1])  # KV heads split over tensor=2, and one KV head (repeated per shard)
def test_tpu_splash_runs_per_shard_under_a_mesh(kv_heads):
    """XLA cannot partition a Mosaic kernel, so under a mesh splash runs inside shard_map (the TPU AOT test in
    test_planner.py fails without it). Here: the per-shard split of batch and heads gives the reference's values
    and gradients."""
    from chipwise.attention import tpu_splash
    from chipwise.config import MeshConfig
    from chipwise.sharding import make_mesh, use_mesh

    q, k, v = qkv(b=4, t=128, kv=kv_heads)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) ** 2)

    with use_mesh(mesh):
        splash = jax.jit(jax.value_and_grad(
            lambda *a: loss(lambda *x: tpu_splash.attend(*x, is_causal=True, interpret=True), *a), argnums=(0, 1, 2)))
        value, grads = splash(q, k, v)
    ref_value, ref_grads = jax.value_and_grad(lambda *a: loss(lambda *x: reference.attend(*x, is_causal=True), *a),
                                              argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="cuDNN attention needs an NVIDIA GPU (run on the device machine)")
@pytest.mark.parametrize("kv_heads, lengths", [(2, None), (4, None), (1, (256, 100))])
def test_cudnn_attention_matches_reference_values_and_gradients(kv_heads, lengths):
    """cuDNN's flash kernel in bf16 against the fp32 reference: GQA and MHA, causal, and ragged key lengths."""
    from chipwise.attention import cudnn

    assert attention.select("gpu", seq_len=256, head_dim=64, num_heads=4, num_kv_heads=kv_heads,
                            dtype=jnp.bfloat16).name == "cudnn"
    q, k, v = qkv(t=256, h=4, kv=kv_heads, d=64)
    kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    cotangent = jax.random.normal(jax.random.key(7), q.shape)

    def run(fn, dtype):
        def loss(q, k, v):
            out = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), is_causal=True, kv_lengths=kv_lengths)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out.astype(jnp.float32), grads

    out, grads = run(cudnn.attend, jnp.bfloat16)
    ref_out, ref_grads = run(reference.attend, jnp.float32)
    # bf16 keeps 8 bits of mantissa: errors of a few 1e-3 of the values' scale are rounding, not a wrong kernel.
    np.testing.assert_allclose(out, ref_out, atol=3e-2, rtol=3e-2)
    for g, r in zip(grads, ref_grads):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(r) / scale, atol=3e-2)
    # And not trivially: the masked-out keys must change the answer (a kernel ignoring kv_lengths would fail).
    if lengths is not None:
        full, _ = run(lambda q, k, v, **_: reference.attend(q, k, v, is_causal=True), jnp.float32)
        assert float(jnp.max(jnp.abs(full[1] - ref_out[1]))) > 0.1
