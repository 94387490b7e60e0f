"""Where the CPU train step's time goes: a per-op profile of the compiled step, from XLA's own thunk events.

    python benchmarks/profile_step.py [--width 384] [--dtype float32] [--steps 5] [--top 12]

Builds the trainer's own step (train/compiled_step.py) for a model of the given width (128: 4 layers, 4 heads,
d_ff 512; 384: 6 layers, 6 heads, d_ff 1024, the configuration of issue 17; 768: 4 layers, 12 heads, d_ff 2048;
vocab 8192, batch 8 x 256 tokens), runs it under `jax.profiler` with XLA:CPU's per-thunk trace events
(`--xla_cpu_enable_xprof_traceme`), and reads the trace with jaxlib's own reader (no TensorBoard needed). It prints
the time per step of each kind of operation (summed over XLA's worker threads, so the total is cores x wall time
at best) and the largest single operations with the JAX code they come from (the HLO's `op_name`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

SHAPES = {128: (4, 4, 512), 384: (6, 6, 1024), 768: (4, 12, 2048)}  # width: (layers, heads, d_ff)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=384, choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from chipwise import process
    from chipwise.config import MeshConfig, from_dict
    from chipwise.plan.calibration import cpu_model
    from chipwise.sharding import make_mesh
    from chipwise.train.compiled_step import build_train_step

    process.setup()
    layers, heads, d_ff = SHAPES[args.width]
    cfg = from_dict({"model": {"num_layers": layers, "d_model": args.width, "num_heads": heads, "num_kv_heads": heads,
                               "d_ff": d_ff, "vocab_size": 8192, "max_seq_len": 256},
                     "train": {"batch_size": 8, "seq_len": 256, "dtype": args.dtype}})
    step = build_train_step(cfg, make_mesh(MeshConfig(), jax.devices()[:1]), "cpu").compile()
    state = step.steps.init()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (8, 257)), jnp.int32)
    poison = jnp.zeros((), jnp.float32)

    def run(n):
        nonlocal state
        for _ in range(n):
            state, metrics = step.train(state, tokens, poison)
        jax.block_until_ready(metrics["loss"])

    run(3)
    t0 = time.perf_counter()
    run(args.steps)
    wall = (time.perf_counter() - t0) / args.steps
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        run(args.steps)
        jax.profiler.stop_trace()
        from jax._src.lib import _profile_data

        profile = _profile_data.ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    per_op, threads = collections.Counter(), set()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA:CPU's worker threads run the thunks
                continue
            threads.add(line.name)
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    per_op[event.name] += event.duration_ns / args.steps / 1e6
    origin = dict(re.findall(r"%([\w.-]+) = .*?op_name=\"([^\"]+)\"", step.train.as_text()))
    kinds = collections.Counter()
    for name, ms in per_op.items():
        kinds[name.split(".")[0]] += ms
    busy = sum(per_op.values())
    print(f"{cpu_model()}, {os.cpu_count()} cores; width {args.width} ({layers} layers, {heads} heads, d_ff {d_ff}), "
          f"vocab 8192, batch 8 x 256, {args.dtype}: {wall * 1e3:.0f} ms a step ({8 * 256 / wall:,.0f} tokens/s); "
          f"{busy:.0f} ms of operations a step over {len(threads)} worker threads")
    print("\n| kind of operation | ms a step (all threads) | share |\n|---|---:|---:|")
    for kind, ms in kinds.most_common(args.top):
        print(f"| {kind} | {ms:.1f} | {ms / busy:.0%} |")
    print("\n| operation | ms a step | from |\n|---|---:|---|")
    for name, ms in per_op.most_common(args.top):
        print(f"| {name} | {ms:.1f} | {origin.get(name, '?')[:90]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
