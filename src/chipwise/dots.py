"""How a matrix multiply is computed in the compute dtype: one home for the model's projections and the LM head.

Every accelerator chipwise targets multiplies bf16 operands into an fp32 accumulator and rounds the result once;
XLA's bf16 dot means exactly that on GPUs, TPUs and Trainium. XLA:CPU, though, reaches a CPU's bf16 matrix units
(AMX on Intel Xeons) only for a dot whose result is fp32: a bf16-in, bf16-out dot runs slower than fp32
(docs/benchmarks.md). So where the active mesh's platform rule asks for it (sharding.PLATFORM_RULES' `dot_result`),
bf16 dots are written as bf16 x bf16 -> fp32, rounded to the compute dtype after, and the backward pass does the
same with its own two dots (a custom VJP: the automatic one would multiply the fp32 cotangent by a bf16 operand,
which XLA:CPU runs in fp32). The weight gradient stays in fp32, the master weight's dtype, with no round trip
through bf16. fp32 dots are plain dots everywhere.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from chipwise.sharding import platform_dot_result


def matmul(x, w, dtype, out_dtype=None):
    """x [m, k] @ w [k, n] computed in `dtype` (w, e.g. an fp32 master weight, is cast to it), returned in
    `out_dtype` (default `dtype`)."""
    out_dtype = jnp.dtype(out_dtype or dtype)
    x = x.astype(dtype)
    if jnp.dtype(dtype) == jnp.bfloat16 and platform_dot_result() == "float32":
        return _bf16_dot(x, w, out_dtype)
    return (x @ w.astype(dtype)).astype(out_dtype)


def _dot_f32(a, b, dims=(((1,), (0,)), ((), ()))):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_dot(x, w, out_dtype):
    return _dot_f32(x, w.astype(jnp.bfloat16)).astype(out_dtype)


def _bf16_dot_forward(x, w, out_dtype):
    w16 = w.astype(jnp.bfloat16)
    return _dot_f32(x, w16).astype(out_dtype), (x, w16, jnp.zeros((), w.dtype))


def _bf16_dot_backward(out_dtype, residuals, d_out):
    x, w16, w_dtype = residuals
    g = d_out.astype(jnp.bfloat16)
    d_x = _dot_f32(g, w16, (((1,), (1,)), ((), ()))).astype(x.dtype)  # g [m, n] . w [k, n] over n
    d_w = _dot_f32(x, g, (((0,), (0,)), ((), ()))).astype(w_dtype.dtype)  # x [m, k] . g [m, n] over m
    return d_x, d_w


_bf16_dot.defvjp(_bf16_dot_forward, _bf16_dot_backward)
