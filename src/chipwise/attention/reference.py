"""The reference attention: XLA's own `jax.nn.dot_product_attention`, correct on every backend."""

import jax


def unsupported_reason(**_) -> None:
    return None


def attend(q, k, v, *, is_causal: bool, kv_lengths=None):
    """kv_lengths [batch] limits each row to its first keys (used by the KV-cache decode)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
                                        implementation="xla")
