"""The reference attention, correct on every backend: XLA's own `jax.nn.dot_product_attention` for training, and
attention over a KV cache written out in jnp for serving (`attend_cached`)."""

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
    entries; no query reaches them, because a row's next write always lands at its next position.

    Grouped-query heads are laid out [batch, kv_heads, query, group, key] from the start (the order the dot makes
    them in), so the scores, the large array of a prefill (q_len x visible per head), are made, masked and
    normalised without being transposed; only q, the cache window and the output, which are small, are.
    `jax.nn.dot_product_attention` transposed the scores between its steps, three copies of them per layer on
    XLA:CPU (docs/benchmarks.md has what this saves in a prefill)."""
    b, t, h, d = q.shape
    kv = k_cache.shape[2]
    grouped = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bktgs", grouped, k_cache, preferred_element_type=jnp.float32)
    visible = jnp.arange(k_cache.shape[1])[None, None, :] <= positions[:, :, None]  # [batch, q_len, keys]
    scores = jnp.where(visible[:, None, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bktgs,bskd->btkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
