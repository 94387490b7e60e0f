"""The train step's matrix multiplies, one by one, in XLA (through JAX) and in PyTorch: the same shapes, the same
operand layouts, the same threads, timed in turns in one process.

For a width of the sweep (benchmarks/width_sweep.py: heads of 64, d_ff 8/3 x width, vocab 8192, batch x seq
tokens), every GEMM of one layer's forward and backward pass and of the tied LM head, as XLA sees them after
chipwise's 2-D projections (model.project): the forward [tokens, k] x [k, n], the input gradient
[tokens, n] x [k, n]^T and the weight gradient [tokens, k]^T x [tokens, n]. The table gives each GEMM's GFLOP/s in
both libraries and the time of all of them in one train step (each shape times its count in the step), which is
the part of the step each library's GEMMs take.

    python benchmarks/gemm_compare.py --widths 128,384,768 [--dtype float32|bfloat16] [--repeats 7]

With bfloat16, XLA's dot takes bf16 operands and accumulates into an fp32 result (`preferred_element_type`), the
form that reaches AMX on Intel CPUs (docs/benchmarks.md); PyTorch's takes bf16 and returns bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from width_sweep import WIDTH_DEPTHS  # noqa: E402

# (name, how the operands are laid out, count per layer) -- "nn": a[m,k] b[k,n]; "nt": a[m,k] b[n,k];
# "tn": a[k,m] b[k,n] (the weight gradient: both operands have the tokens as their leading dimension).
LAYOUTS = {"nn": (((1,), (0,)), ((), ())), "nt": (((1,), (1,)), ((), ())), "tn": (((0,), (0,)), ((), ()))}


def step_gemms(width: int, tokens: int, vocab: int = 8192) -> list[tuple[str, str, int, int, int, int]]:
    """(name, layout, m, k, n, count per step) for the step at `width`: forward, input and weight gradients."""
    d_ff = max(64, round(8 * width / 3 / 64) * 64)
    layers = WIDTH_DEPTHS.get(width, 4)
    rows = []
    # A projection [tokens, k] -> [tokens, n], `per_layer` times in a layer (q, k, v and o are width x width).
    for name, k, n, per_layer in (("attention q/k/v/o", width, width, 4), ("mlp gate/up", width, d_ff, 2),
                                  ("mlp down", d_ff, width, 1)):
        count = per_layer * layers
        rows += [(f"{name} forward", "nn", tokens, k, n, count),
                 (f"{name} input grad", "nt", tokens, n, k, count),
                 (f"{name} weight grad", "tn", k, tokens, n, count)]
    # The tied LM head: logits = x @ embed^T; d_x = d_logits @ embed; d_embed^T = x^T @ d_logits.
    rows += [("lm head forward", "nt", tokens, width, vocab, 1), ("lm head input grad", "nn", tokens, vocab, width, 1),
             ("lm head weight grad", "tn", width, tokens, vocab, 1)]
    return rows


def operand_shapes(layout: str, m: int, k: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return {"nn": ((m, k), (k, n)), "nt": ((m, k), (n, k)), "tn": ((k, m), (k, n))}[layout]


def jax_gemm(layout: str, dtype: str):
    dims = LAYOUTS[layout]
    if dtype == "bfloat16":
        return jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32))
    return jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))


def torch_gemm(layout: str):
    import torch

    return {"nn": lambda a, b: torch.mm(a, b), "nt": lambda a, b: torch.mm(a, b.t()),
            "tn": lambda a, b: torch.mm(a.t(), b)}[layout]


def time_pair(layout: str, m: int, k: int, n: int, dtype: str, repeats: int) -> tuple[float, float]:
    """Median seconds of one GEMM in JAX and in PyTorch, timed in turns (the machine's noise hits both alike)."""
    import torch

    rng = np.random.default_rng(0)
    a_shape, b_shape = operand_shapes(layout, m, k, n)
    a32, b32 = rng.standard_normal(a_shape, np.float32), rng.standard_normal(b_shape, np.float32)
    jdt, tdt = (jnp.bfloat16, torch.bfloat16) if dtype == "bfloat16" else (jnp.float32, torch.float32)
    ja, jb = jnp.asarray(a32, jdt), jnp.asarray(b32, jdt)
    ta, tb = torch.from_numpy(a32).to(tdt), torch.from_numpy(b32).to(tdt)
    jf, tf = jax_gemm(layout, dtype), torch_gemm(layout)
    jf(ja, jb).block_until_ready()
    tf(ta, tb)
    jax_s, torch_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        jf(ja, jb).block_until_ready()
        jax_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        tf(ta, tb)
        torch_s.append(time.perf_counter() - start)
    return statistics.median(jax_s), statistics.median(torch_s)


def compare(width: int, tokens: int, dtype: str, repeats: int) -> tuple[float, float]:
    """Prints one width's table; returns the step's GEMM seconds in JAX and in PyTorch."""
    print(f"\n| width {width}, {dtype} | m x k x n | per step | XLA GFLOP/s | PyTorch GFLOP/s | XLA / PyTorch time |")
    print("|---|---|---:|---:|---:|---:|")
    jax_total = torch_total = 0.0
    for name, layout, m, k, n, count in step_gemms(width, tokens):
        jax_s, torch_s = time_pair(layout, m, k, n, dtype, repeats)
        flops = 2 * m * k * n
        jax_total, torch_total = jax_total + count * jax_s, torch_total + count * torch_s
        print(f"| {name} | {m} x {k} x {n} | {count} | {flops / jax_s / 1e9:,.0f} | {flops / torch_s / 1e9:,.0f} "
              f"| {jax_s / torch_s:.2f}x |")
    print(f"| **all GEMMs of a step** | | | | | **{jax_total * 1e3:,.0f} ms against {torch_total * 1e3:,.0f} ms, "
          f"{jax_total / torch_total:.2f}x** |")
    return jax_total, torch_total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="128,384,768")
    p.add_argument("--tokens", type=int, default=2048, help="tokens a step (batch x seq; the sweep's 8 x 256)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    import torch

    from chipwise.plan.calibration import cpu_model

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"{cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}; "
          f"median of {args.repeats} in turns")
    for width in (int(w) for w in args.widths.split(",")):
        compare(width, args.tokens, args.dtype, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
