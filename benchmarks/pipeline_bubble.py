"""The pipeline's bubble on simulated CPU devices, against the formula the planner uses.

    python benchmarks/pipeline_bubble.py [--stages 2] [--rounds 15]

train/pipeline.py runs R x M + S - 1 ticks for M micro-batches, S stages and R passes (R = 1: GPipe). Every tick
costs the same, useful or not: each stage runs L / (S x R) layers on one micro-batch. So for each R the step time
should be a straight line in the ticks, step = t_tick x ticks + c (c: the embedding, head, loss and optimizer,
outside the pipeline), and the bubble, the S - 1 ticks of warm-up and drain, takes (S - 1) x t_tick of it. The
planner's formula (plan/perf.py) puts the bubble at (S - 1) / (R x M) of the layers' work, that is
(S - 1) / (R x M + S - 1) of the layers' ticks. This benchmark times the trainer's own step for several M and R at
a fixed micro-batch size on S simulated devices, fits t_tick and c for each R by least squares, and prints the
measured bubble share beside the formula's. Steps of all configurations are timed in turns (round robin), so a
slow moment of a shared machine does not fall on one of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

CONFIGS = [(2, 1), (4, 1), (8, 1), (16, 1), (2, 2), (4, 2), (8, 2), (2, 4), (4, 4)]  # (micro-batches, passes)
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
    print(f"{cpu_model()}, {os.cpu_count()} cores; {s} simulated devices; {LAYERS} layers, d_model 128, "
          f"micro-batch {MICRO_SEQS} x {SEQ} tokens, fp32; median of {args.rounds} steps each")
    print("| passes R | micro-batches M | ticks | step ms | fit ms | tick ms | bubble, measured | bubble, formula |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for repeats in sorted({r for _, r in CONFIGS}):
        keys = [(m, r) for m, r in CONFIGS if r == repeats]
        ticks = np.array([r * m + s - 1 for m, r in keys], float)
        steps = np.array([measured[k] for k in keys])
        (t_tick, c), *_ = np.linalg.lstsq(np.stack([ticks, np.ones_like(ticks)], 1), steps, rcond=None)
        for (m, r), n, t in zip(keys, ticks, steps):
            print(f"| {r} | {m} | {n:.0f} | {t * 1e3:.1f} | {(t_tick * n + c) * 1e3:.1f} | {t_tick * 1e3:.1f} | "
                  f"{(s - 1) * t_tick / t:.0%} | {(s - 1) / n:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
