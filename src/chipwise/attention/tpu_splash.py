"""TPU splash attention (a Pallas kernel shipped in jax). Imported only when the TPU backend is chosen.

`interpret=True` runs the same kernel in Pallas' interpreter, which is how it is tested on a CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from chipwise.sharding import active_mesh, logical_to_spec

BLOCK = 128  # the kernel's default tiles are 128 x 128: sequence lengths must be multiples of it


def unsupported_reason(*, platform, seq_len, head_dim, **_) -> str | None:
    if platform != "tpu":
        return f"needs a TPU, this is {platform}"
    if seq_len % BLOCK:
        return f"sequence length {seq_len} is not a multiple of {BLOCK}"
    if head_dim % 128 and head_dim not in (64,):
        return f"head_dim {head_dim} is not a multiple of 128 (or 64)"
    return None


def _kernel(group: int, q_len: int, kv_len: int, interpret: bool):
    """Built anew each time it is traced (once per compile), never cached: a kernel first built inside one trace
    (jit, shard_map) holds that trace's arrays, which another caller must not see."""
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((q_len, kv_len)) for _ in range(group)])
    block = min(BLOCK, q_len, kv_len)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # One MQA kernel per KV head: its `group` query heads share that head's keys and values.
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def attend(q, k, v, *, is_causal: bool, kv_lengths=None, segment_ids=None, interpret: bool = False):
    """segment_ids [batch, seq], where given, go to the kernel's own SegmentIds: no attention across documents."""
    if not is_causal or kv_lengths is not None:
        from chipwise.attention import reference  # decode steps are tiny: the kernel buys nothing there
        return reference.attend(q, k, v, is_causal=is_causal, kv_lengths=kv_lengths, segment_ids=segment_ids)
    mesh, rules = active_mesh()
    local = functools.partial(_attend_local, interpret=interpret)
    segments = () if segment_ids is None else (segment_ids.astype(jnp.int32),)
    if mesh is None or mesh.size == 1:
        return local(q, k, v, *segments)
    # XLA cannot partition a Mosaic kernel by itself: run it per shard, batch and heads split as the rules say.
    q_spec = logical_to_spec(("batch", "seq", "heads", "head_dim"), q.shape, mesh, rules)
    kv_spec = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:  # KV heads too few to split like the query heads: give each query head its own
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        kv_spec = q_spec
    specs = (q_spec, kv_spec, kv_spec)
    if segments:
        specs += (logical_to_spec(("batch", "seq"), segment_ids.shape, mesh, rules),)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(q, k, v, *segments)


def _attend_local(q, k, v, segment_ids=None, *, interpret: bool):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    group = h // kvh
    kernel = _kernel(group, t, k.shape[1], interpret)
    scale = np.float32(1.0 / np.sqrt(d))
    # [b, t, kvh*group, d] -> [b, kvh, group, t, d]; k, v -> [b, kvh, s, d]
    qg = (q * scale).astype(q.dtype).reshape(b, t, kvh, group, d).transpose(0, 2, 3, 1, 4)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segment_ids is None:
        out = jax.vmap(jax.vmap(kernel))(qg, kg, vg)  # over batch, then over KV heads
    else:
        def example(qb, kb, vb, ids):  # one sequence: its KV heads share its segment ids
            segments = splash.SegmentIds(q=ids, kv=ids)
            return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(qb, kb, vb)

        out = jax.vmap(example)(qg, kg, vg, segment_ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
