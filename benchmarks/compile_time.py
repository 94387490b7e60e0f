"""Train-step compile time against depth, layers scanned and unrolled (the trainer's own step, compiled ahead of
time for abstract inputs: nothing is allocated or run).

    python benchmarks/compile_time.py [--depths 2,4,8,16,32] [--d-model 64] [--markdown]

Each compile runs in its own fresh process, so no compilation cache or warm JIT state carries over between
measurements; the time is `lower().compile()` as the trainer reports it (train/compiled_step.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
from chipwise import process
process.setup()
import jax
from chipwise.config import from_dict
from chipwise.sharding import make_mesh
from chipwise.config import MeshConfig
from chipwise.train.compiled_step import build_train_step
depth, width, scan = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "scan"
cfg = from_dict({"model": {"num_layers": depth, "d_model": width, "num_heads": 4, "num_kv_heads": 2,
                           "d_ff": 4 * width, "vocab_size": 512, "max_seq_len": 128, "scan_layers": scan},
                 "train": {"batch_size": 8, "seq_len": 128}})
step = build_train_step(cfg, make_mesh(MeshConfig(), jax.devices()[:1]), "cpu").compile()
print(json.dumps({"compile_s": step.compile_s}))
"""


def measure(depth: int, width: int, layout: str) -> float:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(depth), str(width), layout], env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"compile of {depth} layers ({layout}) failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["compile_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="2,4,8,16,32")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    for depth in depths:  # scanned and unrolled alternate, so a busy spell of the machine hits both alike
        rows.append((depth, measure(depth, args.d_model, "scan"), measure(depth, args.d_model, "unrolled")))
        print(f"{depth:>3} layers: scanned {rows[-1][1]:6.2f} s, unrolled {rows[-1][2]:6.2f} s", flush=True)
    if args.markdown:
        from chipwise.plan.calibration import cpu_model

        print("\n| layers | scanned compile s | unrolled compile s |\n|---:|---:|---:|")
        for depth, scan, unrolled in rows:
            print(f"| {depth} | {scan:.2f} | {unrolled:.2f} |")
        print(f"\nScanned at {depths[-1]} layers / at {depths[0]}: {rows[-1][1] / rows[0][1]:.2f}x. Machine: "
              f"{cpu_model()}, {os.cpu_count()} cores; d_model {args.d_model}, batch 8 x seq 128, fp32, one CPU "
              f"device; each compile in a fresh process.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
