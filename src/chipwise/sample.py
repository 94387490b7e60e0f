"""Text generation from a trained run: a KV cache of fixed length, a prefill, then a scan of decode steps.

Everything is compiled with static shapes: the cache is allocated for prompt + new tokens up front and each
decode step writes one position, so no shape depends on the data.
"""

from __future__ import annotations

import sys
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from chipwise import prng
from chipwise.errors import ChipwiseError
from chipwise.model import Transformer


def filter_logits(logits, top_k, top_p):
    """Mask logits [..., vocab] outside the top-k set and outside the smallest set holding top-p probability.

    top_k (0 keeps every token) and top_p (1 keeps every token) are scalars or one per row, traced or not: one
    compiled program serves rows that ask for different filters (the serving engine's slots)."""
    vocab = logits.shape[-1]
    top_k, top_p = jnp.asarray(top_k, jnp.int32)[..., None], jnp.asarray(top_p, jnp.float32)[..., None]
    rank = jnp.arange(vocab)
    in_top_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(in_top_k, -jnp.sort(-logits, axis=-1), -jnp.inf)  # descending, the top-k set only
    probs = jax.nn.softmax(ranked, axis=-1)
    # keep a token while the probability before it is still below top_p (the most likely one always stays);
    # top_p = 1 keeps the whole top-k set, whatever rounding does to the cumulative sum
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(in_top_k & ((before < top_p) | (top_p >= 1.0)), axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def pick_tokens(logits, temperature, top_k, top_p, keys):
    """One token per row of logits [rows, vocab]: the most likely where temperature is 0, else drawn with
    `keys` [rows] from the filtered distribution at that row's temperature, top-k and top-p ([rows] each)."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    drawn = jax.vmap(jax.random.categorical)(keys, filter_logits(scaled, top_k, top_p))
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def generate(graphdef, params, prompt, key, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    """prompt [1, P] int32 -> new tokens [max_new_tokens]."""
    model: Transformer = nnx.merge(graphdef, params)
    length = prompt.shape[1] + max_new_tokens
    logits, caches = model(prompt, caches=model.init_cache(1, length))

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jax.random.categorical(key, filter_logits(logits / temperature, top_k, top_p)).astype(jnp.int32)

    def decode(carry, step_key):
        caches, token, pos = carry
        positions = jnp.full((1, 1), pos, jnp.int32)
        logits, caches = model(token.reshape(1, 1), positions=positions, caches=caches, cache_start=pos)
        nxt = pick(logits[0, -1], step_key)
        return (caches, nxt, pos + 1), nxt

    first_key, key = jax.random.split(key)
    first = pick(logits[0, -1], first_key)
    carry = (caches, first, jnp.int32(prompt.shape[1]))
    _, rest = jax.lax.scan(decode, carry, jax.random.split(key, max_new_tokens - 1))
    return jnp.concatenate([first[None], rest])


def sample_from_run(run_dir: str, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0) -> str:
    from chipwise.run_dir import RunDir

    run = RunDir(run_dir)
    cfg = run.read_config()
    if max_new_tokens <= 0:
        raise ChipwiseError("--max-new-tokens must be positive")
    if not 0 <= temperature < float("inf") or not 0 < top_p <= 1 or top_k < 0:  # NaN fails too
        raise ChipwiseError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    tokenizer = run.read_tokenizer()
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ChipwiseError("the prompt is empty; pass some text with --prompt")
    if len(ids) + max_new_tokens > cfg.model.max_seq_len:
        raise ChipwiseError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
                            f"max_seq_len ({cfg.model.max_seq_len}); ask for fewer tokens")
    params, graphdef = run.latest_params(cfg, log=lambda message: print(message, file=sys.stderr))  # stdout: text
    key = prng.key(seed)
    out = generate(graphdef, params, jnp.asarray([ids], jnp.int32), key, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    new = [int(i) for i in out]
    eos = tokenizer.token_to_id("<|endoftext|>")
    if eos in new:
        new = new[: new.index(eos)]
    return prompt + tokenizer.decode(new)
