"""Context parallelism: the sequence of a step's activations split over the mesh's `context` axis.

Every activation carries the logical axis `seq`, which the sharding rules map onto `context` (sharding.py), so
each device holds 1/context of every sequence through the embedding, the layers and the loss. Attention needs
every key before a query, so it gathers K and V over `context` (an all-gather of the kv heads only: grouped-query
K/V are a small share of a layer's activations) and attends its own queries to all of them, a block of queries
at a time so that the scores never exist whole.

Causal load balancing: under a causal mask, contiguous shards would give the last device most of the work (its
queries see every key) and the first almost none. So the step reorders each sequence before the model
("zig-zag", as Llama 3 and Megatron's context parallelism do): the sequence is cut into 2 x context chunks and
device i holds chunks i and 2 x context - 1 - i, one early and one late, so every device attends to the same
number of (query, key) pairs. Rotary embeddings take each token's true position, the causal mask compares true
positions, and the loss is a mean over tokens, so the reordering changes nothing but where work happens
(tests/test_context.py: the losses and gradients of one device).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from chipwise.attention import AttentionChoice
from chipwise.sharding import active_mesh, logical_to_spec


def zigzag_order(seq_len: int, context: int) -> np.ndarray:
    """Token positions in the order the step lays them out: contiguous block i (of seq_len / context) holds chunks
    i and 2 x context - 1 - i of 2 x context equal chunks. The identity when context is 1."""
    if context == 1:
        return np.arange(seq_len)
    chunk = seq_len // (2 * context)
    chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


QUERY_BLOCK = 512  # at most this many queries' scores exist at once: [batch, heads, block, seq] per device
SCORE_ELEMENTS = 2**26  # and at most this many scores (256 MiB in fp32): at 128k tokens a block is 16 queries


def context_attention(order: np.ndarray):
    """Attention over a sequence laid out in `order`: each device attends its own queries to K and V gathered
    whole, with the causal mask taken from the tokens' true positions (the per-backend kernels assume positions in
    index order and would mask the wrong pairs). Runs per device (shard_map: batch and heads split as the rules
    say, queries by `context`), a block of queries at a time (QUERY_BLOCK, fewer where SCORE_ELEMENTS asks), each
    block rematerialised in the backward pass: the scores of one block exist at a time, never the
    [seq/context, seq] square. Dense within a block: the masked half of the scores is computed too."""
    positions = jnp.asarray(order, jnp.int32)

    def attend(q, k, v, *, is_causal: bool, kv_lengths=None, segment_ids=None):
        """segment_ids [batch, seq] in the same `order` as q: each query sees only keys of its own segment."""
        if kv_lengths is not None:
            raise ValueError("context-parallel attention is for training; the KV-cache decode runs without it")
        mesh, rules = active_mesh()
        local = functools.partial(_attend_local, kv_positions=positions, is_causal=is_causal)
        segments = () if segment_ids is None else (segment_ids, segment_ids)  # the queries', the keys'
        if mesh is None or mesh.size == 1:
            return local(q, k, v, positions, *segments)
        q_spec = logical_to_spec(("batch", "seq", "heads", "head_dim"), q.shape, mesh, rules)
        kv_spec = logical_to_spec(("batch", None, "kv_heads", "head_dim"), k.shape, mesh, rules)  # gathered
        if q_spec[2] != kv_spec[2]:  # KV heads too few to split like the query heads: one per query head
            group = q.shape[2] // k.shape[2]
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
            kv_spec = PartitionSpec(q_spec[0], None, q_spec[2], q_spec[3])
        specs = (q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[1]))
        if segments:  # the queries' ids split like the queries, the keys' gathered like the keys
            specs += (PartitionSpec(q_spec[0], q_spec[1]), PartitionSpec(q_spec[0], None))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(
            q, k, v, positions, *segments)

    attend.order = order  # which layout it masks for (train/step.py checks it matches the step's)
    return attend


def _attend_local(q, k, v, q_positions, q_segments=None, kv_segments=None, *, kv_positions, is_causal: bool):
    """This device's queries [b, t, h, d] (at `q_positions`, in `q_segments` [b, t] if given) against all keys,
    QUERY_BLOCK queries at a time."""
    b, t, h, d = q.shape
    fits = max(1, SCORE_ELEMENTS // (b * h * k.shape[1]))  # queries whose scores fit the budget
    block = math.gcd(t, min(QUERY_BLOCK, 1 << (fits.bit_length() - 1)))  # a power of two dividing t

    @jax.checkpoint  # the backward pass recomputes one block's scores instead of keeping every block's
    def one_block(args):
        q_block, pos_block, seg_block = args
        mask = (pos_block[:, None] >= kv_positions[None, :])[None, None] if is_causal else None
        if seg_block is not None:
            same = (seg_block[:, :, None] == kv_segments[:, None, :])[:, None]  # [b, 1, block, s]
            mask = same if mask is None else mask & same
        return jax.nn.dot_product_attention(q_block, k, v, mask=mask, implementation="xla")

    blocks = q.reshape(b, t // block, block, h, d).swapaxes(0, 1)
    seg_blocks = None if q_segments is None else q_segments.reshape(b, t // block, block).swapaxes(0, 1)
    out = jax.lax.map(one_block, (blocks, q_positions.reshape(t // block, block), seg_blocks))
    return out.swapaxes(0, 1).reshape(b, t, h, d)


def choice_for(context: int, seq_len: int, preferred: AttentionChoice) -> AttentionChoice:
    """The attention a step with `context` devices per sequence runs: `preferred` (the platform's pick) when the
    sequence is not split, else the context-parallel attention, saying why the preferred one is not used."""
    if context == 1:
        return preferred
    why = f"context parallelism over {context} devices needs a position-masked attention"
    reason = f"{preferred.name} not used: {why}" if preferred.name != "reference" else why
    return AttentionChoice("context_zigzag", context_attention(zigzag_order(seq_len, context)), reason)
