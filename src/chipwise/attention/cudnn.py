"""cuDNN fused attention (flash attention on NVIDIA GPUs) through jax's own GPU plugin."""

import jax
import jax.numpy as jnp


def unsupported_reason(*, platform, head_dim, dtype, document_masking: bool = False, **_) -> str | None:
    if platform != "gpu":
        return f"needs an NVIDIA GPU, this is {platform}"
    if document_masking:  # jax's cuDNN path takes no segment ids, and a dense mask would undo the flash kernel
        return "it cannot keep attention within documents (data.document_masking)"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention runs in bf16/fp16, compute dtype is {jnp.dtype(dtype).name}"
    if head_dim > 128 or head_dim % 8:
        return f"head_dim {head_dim} must be a multiple of 8 and at most 128"
    return None


def attend(q, k, v, *, is_causal: bool, kv_lengths=None, segment_ids=None):
    if segment_ids is not None:
        raise ValueError("cuDNN attention cannot mask documents; the registry does not choose it for them")
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
                                        implementation="cudnn")
