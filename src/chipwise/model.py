"""A Llama-style decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU (or GELU), grouped-query attention.

Parameters are fp32 and carry logical axis names in their `axes` metadata; activations get sharding hints
through `constrain`. Nothing here knows about devices: `sharding.py` maps the names onto a mesh and
`attention/` picks the kernel.

Layers (`model.scan_layers`; by default the platform's choice, sharding.PLATFORM_RULES) are stacked: every block
parameter has a leading `layers` axis and one block's body runs under `jax.lax.scan`, so the compiled program does
not grow with depth (MaxText's scan_layers, AXLearn's Repeat, Levanter's Stacked). With scan_layers off, blocks
are a Python list, unrolled.
`layer_params` and `stack_layers` convert between the two layouts (Hugging Face files are per layer).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chipwise.attention import reference
from chipwise.config import ModelConfig
from chipwise.dots import matmul
from chipwise.sharding import constrain


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], fan_in: int | None = None,
          init: str = "normal", scale: float = 1.0) -> nnx.Param:
    """An fp32 parameter; `axes` names each dimension for the sharding rules."""
    if init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        std = scale * (fan_in or shape[0]) ** -0.5
        value = std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32)
    return nnx.Param(value, axes=axes)


def project(x, w: nnx.Param, dtype, contract: int = 1):
    """x [..., k1..kn] times the parameter w [k1..kn, o...] over the n = `contract` shared dimensions, as one 2-D
    matmul [tokens, k] @ [k, o]. XLA:CPU turns the weight gradient of a 3-D dot_general into a physical transpose of
    the activations' gradient, fused with the element-wise work before it and run slowly; the 2-D form avoids it
    (30% of the step at width 384, docs/benchmarks.md). The reshapes are free (row-major bitcasts); the merged
    dimensions keep the sharding of their major one (w's axis names), and batch x sequence become `tokens`."""
    axes, value = w.get_metadata()["axes"], w[...]
    lead, shared = x.shape[: x.ndim - contract], math.prod(value.shape[:contract])
    rows = constrain(x.reshape(-1, shared), ("tokens", axes[0]))
    out = constrain(matmul(rows, value.reshape(shared, -1), dtype), ("tokens", axes[contract]))
    return out.reshape(*lead, *value.shape[contract:])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), init="ones")
        self.eps = eps

    def __call__(self, x):
        # Normalise in fp32 whatever the compute dtype: bf16 variance loses too many bits.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[float, ...]:
    """The rotary angular frequencies of one head (head_dim / 2 of them), fp32 values: theta^(-2i/head_dim), and
    for rope_type llama3 the Llama 3.1 scaling: low frequencies (wavelength beyond original_max / low_freq_factor)
    divided by the factor, high ones (wavelength under original_max / high_freq_factor) kept, and in between a
    linear blend of the two by how many wavelengths fit the original context."""
    half = cfg.head_dim // 2
    freqs = cfg.rope_theta ** (-np.arange(half, dtype=np.float32) / np.float32(half))
    if cfg.rope_type == "llama3":
        wavelength = 2 * np.pi / freqs
        old, low, high = cfg.rope_original_max_seq_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        blend = np.clip((old / wavelength - low) / (high - low), 0.0, 1.0)  # 0 at low-frequency end, 1 at high
        freqs = (1 - blend) * freqs / cfg.rope_factor + blend * freqs
    return tuple(float(f) for f in np.asarray(freqs, np.float32))


def rotary(x, positions, freqs: tuple[float, ...]):
    """Rotary position embedding on x [batch, seq, heads, head_dim] (pairs are the two halves) at the angular
    frequencies `freqs` (rope_frequencies)."""
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(freqs, jnp.float32)  # [batch, seq, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"))
        self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        # Layers add into the residual stream: shrink their output projections with depth (as GPT-2 does).
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), fan_in=h * hd,
                        scale=(2 * cfg.num_layers) ** -0.5)
        self.rope_freqs = rope_frequencies(cfg)  # static: a tuple of floats, part of the graph definition

    def __call__(self, x, positions, attend: Callable, cache=None):
        dt = x.dtype
        q, k, v = (project(x, w, dt) for w in (self.wq, self.wk, self.wv))
        q = constrain(rotary(q, positions, self.rope_freqs), ("batch", "seq", "heads", "head_dim"))
        k = constrain(rotary(k, positions, self.rope_freqs), ("batch", "seq", "kv_heads", "head_dim"))
        if cache is None:
            out = attend(q, k, v, is_causal=True)
        else:
            # KV cache of fixed length: write this chunk at its position, attend to everything written so far.
            k_cache, v_cache, start = cache
            if isinstance(start, SlotPositions):  # serving: each row (a decode slot) at its own position
                k_cache, v_cache = _write_rows(k_cache, k, start), _write_rows(v_cache, v, start)
                out = reference.attend_cached(q, _read_rows(k_cache, start), _read_rows(v_cache, start), positions)
                out = constrain(out, ("batch", "seq", "heads", "head_dim"))
                return project(out, self.wo, dt, contract=2), (k_cache, v_cache)
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
            if x.shape[1] > 1:  # prefill from position 0: causal over the chunk
                out = reference.attend(q, k_cache[:, : x.shape[1]], v_cache[:, : x.shape[1]], is_causal=True)
            else:
                lengths = jnp.full((x.shape[0],), start + 1, jnp.int32)
                out = reference.attend(q, k_cache, v_cache, is_causal=False, kv_lengths=lengths)
            cache = (k_cache, v_cache)
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        return project(out, self.wo, dt, contract=2), cache


class SlotPositions(NamedTuple):
    """How the serving engine addresses the KV cache: batch row b writes into cache row rows[b] (a decode slot;
    row b itself without `rows`) from position starts[b], and queries read the first `visible` positions only (a
    static bound on every row's length, from a few sizes), so a step reads the part of the cache in use rather
    than all of it. With `rows`, a program runs only the slots it names, and writes them in place: the cache is
    never sliced out and written back whole."""

    starts: jax.Array  # [batch] int32
    visible: int
    rows: jax.Array | None = None  # [batch] int32, distinct


def _write_rows(cache, new, at: SlotPositions):
    """cache [slots, length, ...] with new [batch, n, ...] written at cache row rows[b] from position starts[b]."""
    new = new.astype(cache.dtype)
    if at.rows is None:
        write = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice_in_dim(c, x, s, axis=0))
        return write(cache, new, at.starts)
    for b in range(new.shape[0]):  # a few small in-place updates (the batch is 1 to the slot count)
        zeros = (0,) * (cache.ndim - 2)
        cache = jax.lax.dynamic_update_slice(cache, new[b: b + 1], (at.rows[b], at.starts[b], *zeros))
    return cache


def _read_rows(cache, at: SlotPositions):
    """The first `visible` positions of the cache rows the batch uses: [batch, visible, ...]."""
    if at.rows is None:
        return cache[:, : at.visible]
    size = (1, at.visible, *cache.shape[2:])
    zeros = (0,) * (cache.ndim - 1)
    if len(at.rows) == 1:  # a prefill, or a lone request's decode: one slice; a gather of one row ran 20% slower
        return jax.lax.dynamic_slice(cache, (at.rows[0], *zeros), size)
    return jax.vmap(lambda r: jax.lax.dynamic_slice(cache, (r, *zeros), size)[0])(at.rows)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.gated = cfg.ffn == "swiglu"
        if self.gated:
            self.w_gate = param(rngs, (d, f), ("embed", "mlp"))
        self.w_up = param(rngs, (d, f), ("embed", "mlp"))
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), scale=(2 * cfg.num_layers) ** -0.5)

    def __call__(self, x):
        dt = x.dtype
        up = project(x, self.w_up, dt)
        h = jax.nn.silu(project(x, self.w_gate, dt)) * up if self.gated else jax.nn.gelu(up)
        h = constrain(h, ("batch", "seq", "mlp"))
        return project(h, self.w_down, dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, attend, cache=None):
        h, cache = self.attn(self.attn_norm(x), positions, attend, cache)
        x = constrain(x + h, ("batch", "seq", "embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "seq", "embed"))
        return x, cache


def remat_policy(remat: str):
    return None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Embedding rows have unit-scale entries divided by sqrt(d): a tied LM head then starts near uniform.
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), fan_in=cfg.d_model)
        if cfg.scanned:
            @nnx.vmap(in_axes=0, out_axes=0)
            def stacked(key):  # one Block whose parameters carry a leading `layers` axis
                return Block(cfg, nnx.Rngs(params=key))

            self.blocks = stacked(jax.random.split(rngs.params(), cfg.num_layers))
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def init_cache(self, batch: int, length: int, dtype=jnp.float32):
        """An empty KV cache for `length` positions, in this model's layer layout."""
        c = self.cfg
        shape = (batch, length, c.num_kv_heads, c.head_dim)
        if c.scanned:
            return (jnp.zeros((c.num_layers, *shape), dtype), jnp.zeros((c.num_layers, *shape), dtype))
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers)]

    def hidden(self, tokens, *, dtype=jnp.float32, attend: Callable = reference.attend, remat: str = "none",
               positions=None, caches=None, cache_start=0, run_blocks: Callable | None = None, segment_ids=None):
        """tokens [batch, seq] -> final hidden states [batch, seq, d_model] after the final norm (and the updated
        KV caches, if given: written from position `cache_start`, a scalar, or a SlotPositions, where each row
        writes from its own position and each query sees the cached keys up to its own one in `positions`).
        `run_blocks(blocks, x, positions, segment_ids) -> x`, where given, runs the stacked blocks instead of the
        scan (train/pipeline.py runs them as pipeline stages). `segment_ids` [batch, seq], where given, keep
        attention within each segment (packed documents)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = constrain(self.embed[...].astype(dtype)[tokens], ("batch", "seq", "embed"))
        if segment_ids is not None:
            attend = functools.partial(attend, segment_ids=segment_ids)
        if run_blocks is not None:
            x = run_blocks(self.blocks, x, positions, segment_ids)
        elif self.cfg.scanned:
            x, caches = self._scan_blocks(x, positions, attend, remat, caches, cache_start)
        else:
            x, caches = self._unrolled_blocks(x, positions, attend, remat, caches, cache_start)
        x = self.final_norm(x)
        return x if caches is None else (x, caches)

    def _scan_blocks(self, x, positions, attend, remat, caches, cache_start):
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, xs):
            params, cache = xs
            block = nnx.merge(graphdef, params)
            x, cache = block(x, positions, attend, None if cache is None else (*cache, cache_start))
            return x, cache

        if remat != "none":  # per layer: the backward pass recomputes one layer at a time
            layer = jax.checkpoint(layer, policy=remat_policy(remat), prevent_cse=False)
        return jax.lax.scan(layer, x, (stacked, caches))

    def _unrolled_blocks(self, x, positions, attend, remat, caches, cache_start):
        def run_block(block, x, cache):
            return block(x, positions, attend, cache)

        if remat != "none":
            run_block = nnx.remat(run_block, policy=remat_policy(remat))
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = run_block(block, x, None if caches is None else (*caches[i], cache_start))
            new_caches.append(cache)
        return x, None if caches is None else new_caches

    def head(self):
        """The LM head weight [d_model, vocab] (fp32): the embedding's transpose when tied."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def __call__(self, tokens, *, dtype=jnp.float32, attend: Callable = reference.attend, remat: str = "none",
                 positions=None, caches=None, cache_start=0):
        """tokens [batch, seq] -> logits [batch, seq, vocab] in fp32 (and the updated KV caches, if given)."""
        out = self.hidden(tokens, dtype=dtype, attend=attend, remat=remat, positions=positions, caches=caches,
                          cache_start=cache_start)
        x, caches = (out, None) if caches is None else out
        rows = matmul(x.reshape(-1, x.shape[-1]), self.head(), dtype, out_dtype=jnp.float32)
        logits = constrain(rows.reshape(*x.shape[:-1], -1), ("batch", "seq", "vocab"))
        return logits if caches is None else (logits, caches)


def param_axes(model: nnx.Module):
    """The pytree of logical axis names, matching `nnx.state(model, nnx.Param)`; stacked block parameters get a
    leading `layers` axis."""
    def axes(v):
        names = tuple(v.get_metadata()["axes"])
        return ("layers", *names) if len(v.get_value().shape) == len(names) + 1 else names

    return jax.tree.map(axes, nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))


def layer_params(params: dict, i: int, cfg: ModelConfig) -> dict:
    """Layer i's parameters as a per-layer dict, from either layout of the model's pure param dict."""
    if cfg.scanned:
        return jax.tree.map(lambda a: a[i], params["blocks"])
    return params["blocks"][i]


def stack_layers(blocks: list[dict]) -> dict:
    """Per-layer parameter dicts -> the scanned layout's `blocks` (a leading layers axis)."""
    import numpy as np

    return jax.tree.map(lambda *layers: np.stack(layers), *blocks)
