"""Context parallelism: the sequence of a step's activations split over the mesh's `context` axis.

Every activation carries the logical axis `seq`, which the sharding rules map onto `context` (sharding.py), so
each device holds 1/context of every sequence through the embedding, the layers and the loss. Attention needs
every key before a query, so it gathers K and V over `context` (an all-gather of the kv heads only: grouped-query
K/V are a small share of a layer's activations) and attends its own queries to all of them.

Causal load balancing: under a causal mask, contiguous shards would give the last device most of the work (its
queries see every key) and the first almost none. So the step reorders each sequence before the model
("zig-zag", as Llama 3 and Megatron's context parallelism do): the sequence is cut into 2 x context chunks and
device i holds chunks i and 2 x context - 1 - i, one early and one late, so every device attends to the same
number of (query, key) pairs. Rotary embeddings take each token's true position, the causal mask compares true
positions, and the loss is a mean over tokens, so the reordering changes nothing but where work happens
(tests/test_context.py: the losses and gradients of one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chipwise.attention import AttentionChoice
from chipwise.sharding import constrain


def zigzag_order(seq_len: int, context: int) -> np.ndarray:
    """Token positions in the order the step lays them out: contiguous block i (of seq_len / context) holds chunks
    i and 2 x context - 1 - i of 2 x context equal chunks. The identity when context is 1."""
    if context == 1:
        return np.arange(seq_len)
    chunk = seq_len // (2 * context)
    chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def context_attention(order: np.ndarray):
    """Attention over a sequence laid out in `order`: K and V gathered whole, the causal mask taken from the tokens'
    true positions. XLA's dot-product attention (the reference's), which takes any mask; the per-backend kernels
    assume positions in index order and would mask the wrong pairs."""
    positions = jnp.asarray(order, jnp.int32)

    def attend(q, k, v, *, is_causal: bool, kv_lengths=None):
        if kv_lengths is not None:
            raise ValueError("context-parallel attention is for training; the KV-cache decode runs without it")
        k = constrain(k, ("batch", None, "kv_heads", "head_dim"))  # the all-gather over `context`
        v = constrain(v, ("batch", None, "kv_heads", "head_dim"))
        mask = (positions[:, None] >= positions[None, :])[None, None] if is_causal else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    return attend


def choice_for(context: int, seq_len: int, preferred: AttentionChoice) -> AttentionChoice:
    """The attention a step with `context` devices per sequence runs: `preferred` (the platform's pick) when the
    sequence is not split, else the context-parallel attention, saying why the preferred one is not used."""
    if context == 1:
        return preferred
    why = f"context parallelism over {context} devices needs a position-masked attention"
    reason = f"{preferred.name} not used: {why}" if preferred.name != "reference" else why
    return AttentionChoice("context_zigzag", context_attention(zigzag_order(seq_len, context)), reason)
