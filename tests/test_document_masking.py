"""data.document_masking: attention within each document of a packed sequence, through every attention that takes
segment ids (reference, cpu_fused, splash in interpret mode, context-parallel), the pipeline, and the train step."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chipwise import attention
from chipwise.attention import cpu_fused, reference
from chipwise.config import MeshConfig, ModelConfig, load_config
from chipwise.model import Transformer
from chipwise.sharding import make_mesh, use_mesh
from chipwise.train.context import context_attention, zigzag_order
from chipwise.train.step import build_steps, document_segments

EOS = 0
SMALL = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=50, max_seq_len=64)


def test_segments_count_the_eos_before_each_token():
    tokens = jnp.asarray([[5, 0, 7, 8, 0, 9], [0, 3, 3, 3, 3, 0]])
    assert document_segments(tokens, EOS).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]


@functools.partial(jax.jit, static_argnames=("graphdef", "attend"))
def token_losses(graphdef, params, tokens, attend, segment_ids=None):
    """Per-token next-token losses [batch, seq - 1] of the bare model."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(tokens[:, :-1], attend=attend, segment_ids=segment_ids)
    logits = hidden @ model.head()
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


@pytest.mark.parametrize("attend", [cpu_fused.attend], ids=["cpu_fused"])  # the kernel test covers the reference
def test_packed_documents_with_masking_equal_each_document_alone(attend):
    model = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, SMALL.vocab_size, 11) for _ in range(3)]  # one length: one compile for all three alone
    packed = np.concatenate([np.append(d, EOS) for d in docs])  # each document followed by EOS, as data packs them
    tokens = jnp.asarray(packed[None])
    masked = token_losses(*model, tokens, attend, document_segments(tokens[:, :-1], EOS))[0]
    unmasked = token_losses(*model, tokens, attend)[0]
    start = 0
    for doc in docs:
        alone = token_losses(*model, jnp.asarray(np.append(doc, EOS)[None]), attend)[0]  # from position 0
        inside = masked[start: start + len(doc)]  # its tokens predicting the next, up to its EOS
        np.testing.assert_allclose(inside, alone, rtol=1e-4, atol=1e-5)
        start += len(doc) + 1
    assert not np.allclose(masked[12:23], unmasked[12:23], atol=1e-3)  # the second document saw the first before


def random_qkv(b=2, t=128, h=2, kv=1, d=16):
    keys = jax.random.split(jax.random.key(2), 3)
    return tuple(jax.random.normal(key, (b, t, n, d)) for key, n in zip(keys, (h, kv, kv)))


def random_segments(b, t, docs=4):
    cuts = np.sort(np.random.default_rng(3).integers(1, t, (b, docs - 1)), axis=1)
    return jnp.asarray((np.arange(t)[None, None, :] >= cuts[:, :, None]).sum(axis=1), jnp.int32)


def test_kernels_with_segments_match_the_reference():
    """cpu_fused and the context-parallel attention (split over 2 devices) in values and gradients, splash (Pallas
    interpret mode; its backward is jax's own kernel) in values, against the reference."""
    from chipwise.attention import tpu_splash

    q, k, v = random_qkv()
    seg = random_segments(q.shape[0], q.shape[1])
    cotangent = jax.random.normal(jax.random.key(4), q.shape)
    order = zigzag_order(q.shape[1], 2)
    mesh = make_mesh(MeshConfig(data=1, context=2), jax.devices()[:2])

    def in_order(fn):  # the context-parallel attention takes its inputs laid out in `order`
        def run(q, k, v, *, is_causal, segment_ids):
            out = fn(q[:, order], k[:, order], v[:, order], is_causal=is_causal, segment_ids=segment_ids[:, order])
            return out[:, np.argsort(order)]
        return run

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, is_causal=True, segment_ids=seg) * cotangent)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want_value, want_grads = grads(reference.attend)
    with use_mesh(mesh):  # the context-parallel one runs per device: its queries and their segment ids split in 2
        context = grads(in_order(context_attention(order)))
    for value, got in (grads(cpu_fused.attend), context):
        np.testing.assert_allclose(value, want_value, rtol=1e-4)
        for a, b in zip(got, want_grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    splash = tpu_splash.attend(q, k, v, is_causal=True, segment_ids=seg, interpret=True)
    np.testing.assert_allclose(splash, reference.attend(q, k, v, is_causal=True, segment_ids=seg),
                               rtol=1e-4, atol=1e-4)


def test_registry_chooses_only_kernels_that_take_segment_ids():
    shape = dict(seq_len=256, head_dim=64, num_heads=4, num_kv_heads=2, dtype=jnp.bfloat16)
    assert attention.select("gpu", **shape).name == "cudnn"
    choice = attention.select("gpu", document_masking=True, **shape)
    assert choice.name == "reference" and "within documents" in choice.fallback_reason
    assert attention.select("cpu", document_masking=True, **shape).name == "cpu_fused"


PIPELINED = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
             "model.d_ff=64", "model.vocab_size=64", "model.scan_layers=true", "train.batch_size=8",
             "train.seq_len=32", "train.dtype=float32", "data.document_masking=true"]


def step_loss(settings, mesh_cfg, tokens):
    """The train step's own forward loss (run.eval) of `tokens` on the devices `mesh_cfg` names."""
    cfg = load_config(None, [*settings, *(f"mesh.{k}={v}" for k, v in vars(mesh_cfg).items())])
    mesh = make_mesh(mesh_cfg, jax.devices()[:math.prod(vars(mesh_cfg).values())])
    with use_mesh(mesh):
        run = build_steps(cfg, mesh, reference.attend, jnp.float32, eos_id=EOS)
        state = run.init()
        return float(run.eval(state["params"], jax.device_put(tokens, run.batch_sharding)))


def test_train_step_masks_documents_alike_on_one_device_and_in_a_pipeline():
    # Each row has its own documents (EOS at different places), so a micro-batch given another's segment ids
    # changes the loss.
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, 64, (8, 33)).astype(np.int32)
    for row, cuts in enumerate(rng.integers(1, 32, (8, 3))):
        tokens[row, cuts] = EOS
    alone = step_loss(PIPELINED, MeshConfig(data=1), tokens)
    assert step_loss(PIPELINED[:-1], MeshConfig(data=1), tokens) != pytest.approx(alone, rel=1e-4)  # it masks
    assert step_loss(PIPELINED, MeshConfig(pipeline=2, data=2), tokens) == pytest.approx(alone, rel=1e-5)
