"""Causal attention for CPUs: dense, in [batch, heads, seq, head_dim] layout, with a hand-written backward.

XLA's CPU code for `jax.nn.dot_product_attention` spends most of its time on layout changes and on the generic
backward of the masked softmax (profile in docs/benchmarks.md). This version keeps the softmax probabilities
from the forward pass and computes the gradient directly, dS = P * (dP - rowsum(dP * P)), which halves the time
of attention on a CPU. Same maths as the reference; the tests compare both, values and gradients.
"""

from functools import partial

import jax
import jax.numpy as jnp

from chipwise.attention import reference


def unsupported_reason(*, platform, **_) -> str | None:
    return None if platform == "cpu" else f"written for CPUs, this is {platform}"


def attend(q, k, v, *, is_causal: bool, kv_lengths=None, segment_ids=None):
    """segment_ids [batch, seq], where given: a query sees only keys of its own segment (its document)."""
    if not is_causal or kv_lengths is not None:  # decode steps: tiny, the reference is fine
        return reference.attend(q, k, v, is_causal=is_causal, kv_lengths=kv_lengths, segment_ids=segment_ids)
    t, s = q.shape[1], k.shape[1]
    allowed = jnp.tril(jnp.ones((t, s), bool))[None, None]  # [1, 1, t, s]
    if segment_ids is not None:
        allowed = allowed & reference.same_segment(segment_ids)
    return _causal_attention(q, k, v, allowed, q.shape[2] // k.shape[2])


def _to_heads(x, group: int):
    """[b, s, kv_heads, d] -> [b, kv_heads * group, s, d] (each KV head serves `group` query heads)."""
    x = x.transpose(0, 2, 1, 3)
    return jnp.repeat(x, group, axis=1) if group > 1 else x


def _from_heads(x, group: int):
    """Gradient of `_to_heads`: sum each KV head's query-head copies, back to [b, s, kv_heads, d]."""
    b, h, s, d = x.shape
    return x.reshape(b, h // group, group, s, d).sum(axis=2).transpose(0, 2, 1, 3)


def _einsum(spec, a, b):
    """In the operands' dtype, accumulated in fp32: XLA:CPU reaches AMX only for bf16 dots with an fp32 result
    (chipwise/dots.py); for fp32 operands this is the plain einsum."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _forward(q, k, v, allowed, group: int):
    scale = q.shape[-1] ** -0.5
    qh, kh, vh = q.transpose(0, 2, 1, 3), _to_heads(k, group), _to_heads(v, group)
    scores = jnp.einsum("bhtd,bhsd->bhts", qh, kh, preferred_element_type=jnp.float32) * scale
    # Every query sees at least itself (causal, and its own segment), so no row is all -inf.
    probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    out = _einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), vh)
    return out.transpose(0, 2, 1, 3), (qh, kh, vh, probs)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_attention(q, k, v, allowed, group: int):
    """`allowed` [1 or batch, 1, t, s]: which keys each query may see (causal, and within its segment)."""
    return _forward(q, k, v, allowed, group)[0]


def _backward(group: int, residuals, d_out):
    qh, kh, vh, probs = residuals
    scale = qh.shape[-1] ** -0.5
    d_oh = d_out.transpose(0, 2, 1, 3)
    p = probs.astype(vh.dtype)
    d_v = _einsum("bhts,bhtd->bhsd", p, d_oh)
    d_p = jnp.einsum("bhtd,bhsd->bhts", d_oh, vh, preferred_element_type=jnp.float32)
    # Softmax backward; masked positions have p = 0 and so get no gradient.
    d_s = (probs * (d_p - jnp.sum(d_p * probs, axis=-1, keepdims=True))).astype(qh.dtype)
    d_q = _einsum("bhts,bhsd->bhtd", d_s, kh) * scale
    d_k = _einsum("bhts,bhtd->bhsd", d_s, qh) * scale
    return d_q.transpose(0, 2, 1, 3), _from_heads(d_k, group), _from_heads(d_v, group), None


_causal_attention.defvjp(_forward, _backward)
