import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chipwise.config import MeshConfig
from chipwise.sharding import make_mesh, use_mesh
from chipwise.train.loss import chunk_size, default_chunk_tokens, next_token_loss


def full_loss(hidden, head, targets, dtype):
    logits = (hidden @ head.astype(dtype)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def chunked(chunk_tokens, dtype):
    return lambda h, w, t: next_token_loss(h, w, t, chunk_tokens=chunk_tokens, compute_dtype=dtype)


def inputs(batch, seq, d, vocab, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k[0], (batch, seq, d), jnp.float32).astype(dtype)
    head = jax.random.normal(k[1], (d, vocab), jnp.float32) / np.sqrt(d) * 3.0
    targets = jax.random.randint(k[2], (batch, seq), 0, vocab, jnp.int32)
    return hidden, head, targets


def value_and_grads(fn, hidden, head, targets):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, head, targets)


def test_chunk_size_is_the_largest_divisor_not_above_the_request():
    assert chunk_size(96, 32) == 32
    assert chunk_size(96, 40) == 32
    assert chunk_size(96, 50) == 48
    assert chunk_size(96, 7) == 6
    assert chunk_size(97, 50) == 1  # a prime: correct, just slow
    assert chunk_size(96, 0) == chunk_size(96, -1) == chunk_size(96, 96) == chunk_size(96, 500) == 96


def test_default_chunk_tokens():
    assert default_chunk_tokens(128_256) == 256
    assert default_chunk_tokens(32_000) == 1024
    assert default_chunk_tokens(262_144) == 256  # the floor
    assert default_chunk_tokens(128) == 262_144
    for vocab in (1000, 32_000, 50_257, 128_256, 151_936):
        tokens = default_chunk_tokens(vocab)
        assert tokens & (tokens - 1) == 0
        assert tokens == 256 or 64 * 2**20 < 4 * vocab * tokens <= 128 * 2**20


@pytest.mark.parametrize("chunk_tokens", [0, 16, 24, 50, 7, 96, 1000])
def test_chunked_equals_full_fp32(chunk_tokens):
    hidden, head, targets = inputs(3, 32, 16, 200)  # N = 96 tokens
    loss, (dh, dw) = value_and_grads(lambda h, w, t: full_loss(h, w, t, jnp.float32), hidden, head, targets)
    closs, (cdh, cdw) = value_and_grads(chunked(chunk_tokens, jnp.float32), hidden, head, targets)
    assert closs.dtype == jnp.float32 and closs.shape == ()
    assert cdh.dtype == hidden.dtype and cdw.dtype == jnp.float32
    np.testing.assert_allclose(closs, loss, rtol=1e-6)
    # fp32 matmuls of different shapes sum in different orders: a few 1e-9 differences on ~1e-2 gradients.
    np.testing.assert_allclose(cdh, dh, rtol=1e-6, atol=1e-6 * float(jnp.abs(dh).max()))
    np.testing.assert_allclose(cdw, dw, rtol=1e-6, atol=1e-6 * float(jnp.abs(dw).max()))


def test_chunked_equals_full_bf16():
    hidden, head, targets = inputs(2, 64, 32, 300, dtype=jnp.bfloat16)
    loss, (dh, dw) = value_and_grads(lambda h, w, t: full_loss(h, w, t, jnp.bfloat16), hidden, head, targets)
    closs, (cdh, cdw) = value_and_grads(chunked(32, jnp.bfloat16), hidden, head, targets)
    assert cdh.dtype == jnp.bfloat16 and cdw.dtype == jnp.float32
    # bf16 logits: XLA's CPU backend emits the [batch, seq, d] and the [tokens, d] bf16 matmuls differently, and
    # their outputs differ by up to one bf16 ulp; each token's d_logits is cast to bf16 in both; the full d_head comes
    # out of one bf16 matmul, the chunked one is summed over chunks in fp32. So they agree to bf16 precision.
    np.testing.assert_allclose(closs, loss, rtol=1e-3)
    scale_h, scale_w = float(jnp.abs(dh.astype(jnp.float32)).max()), float(jnp.abs(dw).max())
    np.testing.assert_allclose(cdh.astype(jnp.float32), dh.astype(jnp.float32), rtol=2e-2, atol=2e-2 * scale_h)
    np.testing.assert_allclose(cdw, dw, rtol=2e-2, atol=2e-2 * scale_w)


def test_chunked_loss_cuts_compiled_temp_memory():
    batch, seq, d, vocab = 1, 2048, 64, 128_256
    args = (jax.ShapeDtypeStruct((batch, seq, d), jnp.float32), jax.ShapeDtypeStruct((d, vocab), jnp.float32),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32))

    def temp_bytes(fn):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunk_tokens = default_chunk_tokens(vocab)
    full = temp_bytes(lambda h, w, t: full_loss(h, w, t, jnp.float32))
    small = temp_bytes(chunked(chunk_tokens, jnp.float32))
    print(f"\nLM head + loss fwd+bwd temp memory, vocab {vocab}, seq {seq}: full {full / 2**20:.1f} MiB, "
          f"chunked ({chunk_tokens} tokens) {small / 2**20:.1f} MiB ({1 - small / full:.1%} less)")
    assert full >= 4 * batch * seq * vocab  # the full logits really were there
    assert small <= 0.3 * full


@pytest.mark.parametrize("layout", [(8, 1, 1), (2, 2, 2)])
def test_chunked_loss_under_a_mesh_matches_one_device(layout):
    assert len(jax.devices()) >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (see conftest)"
    hidden, head, targets = inputs(8, 32, 16, 256)
    fn = chunked(64, jnp.float32)
    loss, (dh, dw) = value_and_grads(fn, hidden, head, targets)

    data, fsdp, tensor = layout
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:8])
    with use_mesh(mesh):
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        param = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
        sh, sw, st = jax.device_put(hidden, batch), jax.device_put(head, param), jax.device_put(targets, batch)
        assert not sh.sharding.is_fully_replicated
        sloss, (sdh, sdw) = value_and_grads(fn, sh, sw, st)
    np.testing.assert_allclose(sloss, loss, rtol=1e-6)
    np.testing.assert_allclose(sdh, dh, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sdw, dw, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(loss, full_loss(hidden, head, targets, jnp.float32), rtol=1e-6)


def collectives_in_loops(hlo: str) -> list[str]:
    """Result shapes of the all-reduces that run inside a while loop (and whatever it calls) of compiled HLO text."""
    computations, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?(%[\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            name = header.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)
    pending = [b for line in hlo.splitlines() for b in re.findall(r"body=(%[\w.\-]+)", line)]
    seen, shapes = set(), []
    while pending:
        comp = pending.pop()
        if comp in seen or comp not in computations:
            continue
        seen.add(comp)
        for line in computations[comp]:
            pending += re.findall(r"(?:calls|to_apply|body|condition)=(%[\w.\-]+)", line)
            op = re.search(r"= (.+?) all-reduce(?:-start)?\(", line)
            if op:
                shapes.append(op.group(1))
    return shapes


@pytest.mark.parametrize("layout", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_head_gradient_is_reduced_once_not_per_chunk(layout):
    """Each token shard sums its own d_head over the chunks; the shards' sums meet once, after the loop."""
    hidden, head, targets = inputs(8, 32, 16, 256)
    mesh = make_mesh(MeshConfig(*layout), jax.devices()[:8])
    with use_mesh(mesh):
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        param = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
        args = (jax.device_put(hidden, batch), jax.device_put(head, param), jax.device_put(targets, batch))
        hlo = jax.jit(jax.value_and_grad(chunked(64, jnp.float32), argnums=(0, 1))).lower(*args).compile().as_text()
    assert "while" in hlo
    in_loops = collectives_in_loops(hlo)
    vocab_shard = str(256 // layout[2])
    # Under tensor parallelism the softmax's max and sum over the vocab shards, and d_hidden, are reduced per chunk
    # ([tokens] and [tokens, d] shapes); nothing with a vocab dimension may be.
    assert not [s for s in in_loops if re.search(rf"[\[,]{vocab_shard}[\],]", s)], in_loops
    if layout[2] == 1:
        assert in_loops == []
