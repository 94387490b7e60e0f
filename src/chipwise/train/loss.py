"""Next-token loss with a chunked LM head: the [batch, seq, vocab] logits never exist at once.

At a 128k vocabulary the fp32 logits of one 2k-token sequence are 1 GiB, and autodiff keeps the logits and their
gradient alive together (about twice that), far more than any other activation of a small model. Like MaxText's
vocabulary tiling, Levanter's blockwise cross-entropy and torchtitan's chunked loss, `next_token_loss` computes the
LM head and the softmax cross-entropy a chunk of tokens at a time:

* Tokens are flattened to N = batch * seq and split into C equal chunks of T tokens, with T the largest divisor of N
  that is <= `chunk_tokens`; shapes stay static and nothing is padded or masked. (N = batch * seq_len is a power of
  two times the batch in practice, so T is then `chunk_tokens` itself; an N with few divisors gives small chunks,
  correct but slower.) `chunk_tokens <= 0` or `>= N` is one chunk: exactly the plain computation below.
* Chunks are strided, not contiguous: chunk j holds tokens j, j + C, j + 2C, ... (the loss is a mean, so which tokens
  share a chunk does not matter). Under a mesh that splits the token axis G ways (the "batch" rule: data x fsdp),
  each chunk is laid out [G, T / G, ...] so that shard s of every chunk holds tokens of the contiguous N / G block of
  the flattened batch that the batch sharding already put on shard s's devices: no resharding of the hidden states,
  and each chunk's logits are constrained to ("batch", ..., "vocab") like the model's own logits.
* A `jax.lax.scan` runs over the chunks; its body is wrapped in `jax.checkpoint`, so the forward pass keeps only each
  chunk's per-token losses, and the backward pass recomputes one chunk's logits at a time from its slice of the
  hidden states (which are stored anyway), turns them into d_logits, and accumulates d_head in the scan's carry.
* With G > 1 the head is broadcast to one copy per token shard ([G, d, vocab], sharded over G, so each device holds
  one gathered copy: the all-gather an fsdp-sharded head needs anyway, done once before the loop). The carry then
  holds each shard's partial d_head, and the shards are summed once after the loop. With a single shared head GSPMD
  all-reduces the full [d, vocab] gradient inside the loop, once per chunk (checked in the compiled HLO).

Why rematerialisation and not a hand-written `custom_vjp` (both were built and measured on the CPU backend, vocab
128,256, seq 2,048, d_model 64-256, 256-1,024-token chunks): both cut the step's temporary memory by ~85-90% (a
custom_vjp needs ~1.2 chunk buffers of fp32 logits at peak, remat ~2: the recomputed logits and their gradient),
but the remat scan ran as fast or faster (by up to ~40%) on every shape tried, is the autodiff of optax's own
cross-entropy (so each token's value and gradient come from exactly the formula the unchunked loss uses, bf16 casts
included), keeps forward-mode and higher-order differentiation working, and leaves no second backward pass to keep
in step with the forward. The per-chunk recompute is one extra [T, d] x [d, vocab] matmul, the same either way.

The head's cast to the compute dtype happens inside the chunk body, so d_head is accumulated across chunks in fp32
(the master weight's dtype) rather than in bf16. No lax.cond, no data-dependent loops, no host callbacks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax

from chipwise.dots import matmul
from chipwise.sharding import active_mesh, constrain, logical_to_spec

# Target size of one chunk's fp32 logits (see `default_chunk_tokens`).
CHUNK_LOGITS_BYTES = 128 * 2**20
MIN_CHUNK_TOKENS = 256


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk whose fp32 logits take about 128 MiB: max(256, 128 MiB // (4 * vocab)), rounded down to a
    power of two (so 64-128 MiB of logits up to a 131,072 vocabulary; above that the 256-token floor, which keeps the
    [T, d] x [d, vocab] matmul large enough to run efficiently, gives up to 256 MiB at a 262,144 vocabulary).

    E.g. 32,000 -> 1,024 tokens (125 MiB); 128,256 -> 256 tokens (125 MiB). The backward pass holds about two such
    buffers (the recomputed logits and their gradient). The count is for the whole, unsharded chunk: with the batch
    sharded over data x fsdp each device holds its share of it.
    """
    tokens = max(MIN_CHUNK_TOKENS, CHUNK_LOGITS_BYTES // (4 * max(int(vocab_size), 1)))
    return 1 << (tokens.bit_length() - 1)


def chunk_size(num_tokens: int, chunk_tokens: int, multiple_of: int = 1) -> int:
    """Tokens per chunk: the largest divisor of `num_tokens` that is <= `chunk_tokens` and a multiple of
    `multiple_of` (all of them if `chunk_tokens` <= 0 or >= `num_tokens`). `multiple_of` is how many ways the
    mesh splits the tokens: every device then keeps a share of every chunk, instead of the hidden states being
    gathered onto each device (at 512 data-parallel ranks and 256-token chunks that would be the whole global
    batch's hidden states on every device)."""
    if chunk_tokens <= 0 or chunk_tokens >= num_tokens:
        return num_tokens
    if num_tokens % multiple_of:
        multiple_of = 1
    best = multiple_of
    for i in range(1, math.isqrt(num_tokens) + 1):
        if num_tokens % i == 0:
            for divisor in (i, num_tokens // i):
                if best < divisor <= chunk_tokens and divisor % multiple_of == 0:
                    best = divisor
    return best


def token_shards(num_tokens: int) -> int:
    """How many ways the enclosing `use_mesh` splits a token axis of `num_tokens` named "batch" (1 outside a mesh)."""
    mesh, rules = active_mesh()
    if mesh is None or mesh.size == 1:
        return 1
    axes = logical_to_spec(("batch",), (num_tokens,), mesh, rules)[0]
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def next_token_loss(hidden, head, targets, *, chunk_tokens: int, compute_dtype) -> jax.Array:
    """Mean softmax cross-entropy (fp32 scalar) of the LM head's logits against `targets`, chunk by chunk.

    hidden [batch, seq, d_model]: final hidden states (after the final norm), in `compute_dtype`.
    head [d_model, vocab]: the LM head weight (fp32 master), cast to `compute_dtype` for the matmul.
    targets [batch, seq] int32.

    Equal (up to fp32 summation order) to
    `optax.softmax_cross_entropy_with_integer_labels((hidden @ head.astype(compute_dtype)).astype(f32), targets)
    .mean()`, in value and gradients, without ever holding more than one chunk of logits; see the module docstring.
    """
    *lead, d = hidden.shape
    vocab = head.shape[-1]
    n = math.prod(lead)
    t = chunk_size(n, chunk_tokens, token_shards(n))
    if t == n:  # one chunk: the plain computation
        logits = matmul(hidden.reshape(n, d), head, compute_dtype, out_dtype=jnp.float32).reshape(*lead, vocab)
        logits = constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    c = n // t
    g = token_shards(t)
    # Strided chunks: token n = i * C + j is row i of chunk j, and row i = s * (T / G) + r is row r of token shard s.
    # So shard s of every chunk holds tokens from the same contiguous N / G block of the flattened batch: the block
    # that the batch sharding already put on the devices of shard s.
    xs = constrain(hidden.reshape(g, t // g, c, d), ("batch", None, None, None)).transpose(2, 0, 1, 3)
    ys = targets.reshape(g, t // g, c).transpose(2, 0, 1)
    w = head
    if g > 1:
        # One copy of the head per token shard (each device holds only its own, so this is the all-gather an
        # fsdp-sharded head needs anyway, done once before the loop). The backward pass then accumulates each
        # shard's d_head locally across chunks and sums the shards once, after the loop; with one shared [d, vocab]
        # head GSPMD would all-reduce the whole head gradient once per chunk.
        w = constrain(jnp.broadcast_to(head, (g, d, vocab)), ("batch", None, "vocab"))

    @functools.partial(jax.checkpoint, prevent_cse=False)  # scan already keeps XLA from merging the recompute away
    def body(carry, chunk):
        x, y = chunk
        if g == 1:  # a plain 2-D matmul: XLA's CPU backend needs less scratch for it
            x, y = x[0], y[0]
        x = constrain(x, ("batch",) + (None,) * (x.ndim - 1))
        if g == 1:
            logits = matmul(x, w, compute_dtype, out_dtype=jnp.float32)
        else:
            logits = jnp.einsum("gtd,gdv->gtv", x, w.astype(compute_dtype)).astype(jnp.float32)
        logits = constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))
        return carry, optax.softmax_cross_entropy_with_integer_labels(logits, y)

    _, losses = jax.lax.scan(body, None, (xs, ys))
    return losses.mean()
