"""The pipeline's bubble on simulated CPU devices, against the formula the planner uses.

    python benchmarks/pipeline_bubble.py [--stages 2] [--rounds 15] [--markdown]

train/pipeline.py runs R x M + S - 1 ticks for M micro-batches, S stages and R passes. At each tick every stage
runs L / (S x R) layers on one micro-batch, so a step should take

    step = ticks x (L / (S x R)) x t_layer  +  M x t_micro  +  t_fixed

(t_layer: one layer, forward, backward and the stage's recompute, on one micro-batch; t_micro: the embedding, head
and loss of one micro-batch; t_fixed: the optimizer update and the rest). The planner's bubble is the share of the
layers' ticks that do no useful work, (S - 1) / (R x M + S - 1). This benchmark times the trainer's own step for
several M and R at a fixed micro-batch size on S simulated devices, fits the three unknowns by least squares, and
prints how well the formula explains each measured step (the residual) and the bubble it implies. Steps of the
configurations are timed in turns (round robin), so a slow moment of a shared machine does not fall on one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

CONFIGS = [(2, 1), (4, 1), (8, 1), (16, 1), (4, 2), (8, 2), (8, 4)]  # (micro-batches, passes)
LAYERS, MICRO_SEQS, SEQ = 8, 2, 128


def build(stages: int, micro: int, repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from chipwise.config import from_dict
    from chipwise.sharding import make_mesh, use_mesh
    from chipwise.train.compiled_step import build_train_step

    cfg = from_dict({"model": {"num_layers": LAYERS, "d_model": 128, "num_heads": 4, "num_kv_heads": 2, "d_ff": 512,
                               "vocab_size": 256, "max_seq_len": SEQ, "scan_layers": True},
                     "train": {"batch_size": micro * MICRO_SEQS, "seq_len": SEQ, "dtype": "float32",
                               "pipeline_microbatches": micro, "pipeline_repeats": repeats},
                     "mesh": {"pipeline": stages, "data": 1}})
    mesh = make_mesh(cfg.mesh, jax.devices()[:stages])
    with use_mesh(mesh):
        step = build_train_step(cfg, mesh, "cpu").compile()
        state = step.steps.init()
        tokens = jax.device_put(np.random.default_rng(0).integers(0, 256, (micro * MICRO_SEQS, SEQ + 1), np.int32),
                                step.steps.batch_sharding)
    poison = jnp.zeros((), jnp.float32)
    holder = {"state": state}

    def run_once() -> float:
        t0 = time.perf_counter()
        holder["state"], metrics = step.train(holder["state"], tokens, poison)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0

    run_once()  # warm-up
    return run_once


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.stages}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from chipwise import process
    from chipwise.plan.calibration import cpu_model

    process.setup()
    s = args.stages
    runners = {(m, r): build(s, m, r) for m, r in CONFIGS}
    times = {key: [] for key in runners}
    for _ in range(args.rounds):
        for key, run in runners.items():
            times[key].append(run())
    measured = {key: statistics.median(v) for key, v in times.items()}
    rows = []
    for (m, r), t in measured.items():
        ticks = r * m + s - 1
        rows.append([ticks * LAYERS / (s * r), m, 1.0])  # layer-ticks, micro-batches, one
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(list(measured.values())), rcond=None)
    t_layer, t_micro, t_fixed = coef
    print(f"{cpu_model()}, {os.cpu_count()} cores; {s} simulated devices; {LAYERS} layers, d_model 128, "
          f"micro-batch {MICRO_SEQS} x {SEQ} tokens, fp32; median of {args.rounds} steps each")
    print(f"fit: t_layer {t_layer * 1e3:.2f} ms, t_micro {t_micro * 1e3:.2f} ms, t_fixed {t_fixed * 1e3:.1f} ms")
    print("| micro-batches M | passes R | ticks | step ms (measured) | step ms (formula) | residual | "
          "bubble (planner) | bubble time ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ((m, r), t), row in zip(measured.items(), rows):
        fitted = float(np.dot(row, coef))
        bubble_share = (s - 1) / (r * m + s - 1)
        bubble_ms = (s - 1) * LAYERS / (s * r) * t_layer * 1e3
        print(f"| {m} | {r} | {r * m + s - 1} | {t * 1e3:.1f} | {fitted * 1e3:.1f} | {t / fitted - 1:+.1%} | "
              f"{bubble_share:.0%} | {bubble_ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
