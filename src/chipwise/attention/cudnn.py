"""cuDNN fused attention (flash attention on NVIDIA GPUs) through jax's own GPU plugin."""

import jax
import jax.numpy as jnp


def unsupported_reason(*, platform, head_dim, dtype, **_) -> str | None:
    if platform != "gpu":
        return f"needs an NVIDIA GPU, this is {platform}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention runs in bf16/fp16, compute dtype is {jnp.dtype(dtype).name}"
    if head_dim > 128 or head_dim % 8:
        return f"head_dim {head_dim} must be a multiple of 8 and at most 128"
    return None


def attend(q, k, v, *, is_causal: bool, kv_lengths=None):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
                                        implementation="cudnn")
