"""A Llama-style decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU (or GELU), grouped-query attention.

Parameters are fp32 and carry logical axis names in their `axes` metadata; activations get sharding hints
through `constrain`. Nothing here knows about devices: `sharding.py` maps the names onto a mesh and
`attention/` picks the kernel.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from chipwise.attention import reference
from chipwise.config import ModelConfig
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


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), init="ones")
        self.eps = eps

    def __call__(self, x):
        # Normalise in fp32 whatever the compute dtype: bf16 variance loses too many bits.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def rotary(x, positions, theta: float):
    """Rotary position embedding on x [batch, seq, heads, head_dim] (pairs are the two halves)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [batch, seq, half]
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
        self.rope_theta = cfg.rope_theta

    def __call__(self, x, positions, attend: Callable, cache=None):
        dt = x.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))
        q = constrain(rotary(q, positions, self.rope_theta), ("batch", "seq", "heads", "head_dim"))
        k = constrain(rotary(k, positions, self.rope_theta), ("batch", "seq", "kv_heads", "head_dim"))
        if cache is None:
            out = attend(q, k, v, is_causal=True)
        else:
            # KV cache of fixed length: write this chunk at its position, attend to everything written so far.
            k_cache, v_cache, start = cache
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
            if x.shape[1] > 1:  # prefill from position 0: causal over the chunk
                out = reference.attend(q, k_cache[:, : x.shape[1]], v_cache[:, : x.shape[1]], is_causal=True)
            else:
                lengths = jnp.full((x.shape[0],), start + 1, jnp.int32)
                out = reference.attend(q, k_cache, v_cache, is_causal=False, kv_lengths=lengths)
            cache = (k_cache, v_cache)
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt)), cache


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
        up = x @ self.w_up[...].astype(dt)
        h = jax.nn.silu(x @ self.w_gate[...].astype(dt)) * up if self.gated else jax.nn.gelu(up)
        h = constrain(h, ("batch", "seq", "mlp"))
        return h @ self.w_down[...].astype(dt)


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


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Embedding rows have unit-scale entries divided by sqrt(d): a tied LM head then starts near uniform.
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), fan_in=cfg.d_model)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens, *, dtype=jnp.float32, attend: Callable = reference.attend, remat: str = "none",
                 positions=None, caches=None):
        """tokens [batch, seq] -> logits [batch, seq, vocab] in fp32 (and the updated KV caches, if given)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = constrain(self.embed[...].astype(dtype)[tokens], ("batch", "seq", "embed"))

        def run_block(block, x, cache):
            return block(x, positions, attend, cache)

        if remat != "none":
            policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            run_block = nnx.remat(run_block, policy=policy)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = run_block(block, x, None if caches is None else caches[i])
            new_caches.append(cache)
        x = self.final_norm(x)
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits = constrain((x @ head.astype(dtype)).astype(jnp.float32), ("batch", "seq", "vocab"))
        return logits if caches is None else (logits, new_caches)


def param_axes(model: nnx.Module):
    """The pytree of logical axis names, matching `nnx.state(model, nnx.Param)`."""
    return jax.tree.map(lambda v: v.get_metadata()["axes"], nnx.state(model, nnx.Param),
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
