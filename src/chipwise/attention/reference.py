"""The reference attention: XLA's own `jax.nn.dot_product_attention`, correct on every backend."""

import jax
import jax.numpy as jnp


def unsupported_reason(**_) -> None:
    return None


def same_segment(segment_ids):
    """[batch, seq] segment ids -> [batch, 1, seq, seq]: whether query t and key s are in the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def attend(q, k, v, *, is_causal: bool, kv_lengths=None, segment_ids=None):
    """kv_lengths [batch] limits each row to its first keys (used by the KV-cache decode); segment_ids [batch, seq]
    (self-attention over packed documents) keeps each query to keys of its own segment."""
    mask = None if segment_ids is None else same_segment(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
                                        implementation="xla")


def attend_cached(q, k_cache, v_cache, positions):
    """Queries at absolute `positions` [batch, q_len] over a KV cache [batch, cache_len, kv_heads, head_dim]: each
    query sees the keys at or before its own position. Positions past what a row has written hold stale or padding
    entries; no query reaches them, because a row's next write always lands at its next position."""
    visible = jnp.arange(k_cache.shape[1])[None, None, :] <= positions[:, :, None]
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=visible[:, None], implementation="xla")
