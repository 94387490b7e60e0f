"""XLA's memory for chipwise's real train step on TPU slices, compiled ahead of time on this CPU, beside the planner's.

    python benchmarks/aot_memory.py [--only NAME,...] [--write] [--table]

Each case compiles the trainer's own step (train/compiled_step.py) for a TPU topology with libtpu (the `tpu`
extra), in a fresh process, and records XLA's peak of live buffers per device (arguments included), its arguments
and the compile time. Some cases shrink the depth of a published model (the same layer, fewer of them) so that
differences between depths isolate what one layer costs; the `planner` cases take the layout `chipwise plan` picks
for the full model. `--write` stores the records in src/chipwise/plan/aot_memory_runs.yaml, which
tests/test_planner.py holds the planner's memory model to (within 15%), and prints a markdown table for
docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RUNS_FILE = Path(__file__).resolve().parents[1] / "src/chipwise/plan/aot_memory_runs.yaml"

# name: model preset, layers (0: the preset's), accelerator, chips, seq, global batch, and the layout (None: the
# planner's pick for the full model).
CASES = [
    ("8b-2L-full", "llama3-8b", 2, "tpu-v5p", 8, 8192, 16, dict(fsdp=8, remat="full")),
    ("8b-32L-full", "llama3-8b", 0, "tpu-v5p", 8, 8192, 16, dict(fsdp=8, remat="full")),
    ("8b-2L-none", "llama3-8b", 2, "tpu-v5p", 8, 8192, 16,
     dict(data=2, fsdp=4, remat="none", microbatches=2, shard_optimizer=True)),
    ("8b-4L-none", "llama3-8b", 4, "tpu-v5p", 8, 8192, 16,
     dict(data=2, fsdp=4, remat="none", microbatches=2, shard_optimizer=True)),
    ("8b-2L-dots", "llama3-8b", 2, "tpu-v5p", 8, 8192, 16,
     dict(data=2, fsdp=4, remat="dots", microbatches=2, shard_optimizer=True)),
    ("8b-4L-dots", "llama3-8b", 4, "tpu-v5p", 8, 8192, 16,
     dict(data=2, fsdp=4, remat="dots", microbatches=2, shard_optimizer=True)),
    ("8b-planner", "llama3-8b", 0, "tpu-v5p", 8, 8192, 16, None),
    ("70b-planner", "llama3-70b", 0, "tpu-v5p", 64, 8192, 64, None),
    # Pipelined (train/pipeline.py, GPipe): a stage's residuals for every tick of micro-batches + stages - 1.
    ("8b-4L-pp2", "llama3-8b", 4, "tpu-v5p", 8, 8192, 16,
     dict(pipeline=2, fsdp=4, remat="full", microbatches=4)),
    ("70b-pp4", "llama3-70b", 0, "tpu-v5p", 64, 8192, 64,
     dict(pipeline=4, fsdp=8, tensor=2, remat="full", microbatches=4)),
]

CHILD = """
import json, sys, time
from dataclasses import replace
from chipwise import process
process.setup()
from chipwise.config import from_dict
from chipwise.plan.aot import compile_for_topology, topology_name, xla_peak_bytes
from chipwise.plan.emit import layout_config
from chipwise.plan.perf import Layout
from chipwise.plan.spec import load_model
case = json.loads(sys.argv[1])
m = load_model(case["model"])
m = replace(m, num_layers=case["layers"] or m.num_layers, scan_layers=True)
values = layout_config(m, case["seq"], case["batch"], Layout(**case["layout"]))  # what `plan --aot` compiles
compiled, attention, compile_s = compile_for_topology(
    from_dict(values), topology_name(case["accelerator"], case["chips"]), values["mesh"])
mem = compiled.memory_analysis()
print(json.dumps({"attention": attention, "compile_s": round(compile_s, 1), "xla_peak_gib": xla_peak_bytes(mem) / 2**30,
                  "xla_argument_gib": mem.argument_size_in_bytes / 2**30}))
"""


def planner_layout(model: str, accelerator: str, chips: int, seq: int, batch: int) -> dict:
    from chipwise import catalog
    from chipwise.plan.perf import chip_model
    from chipwise.plan.search import search
    from chipwise.plan.spec import load_model

    lay = search(load_model(model), seq, batch, chips, chip_model(catalog.get(accelerator))).best.layout
    return dict(data=lay.data, fsdp=lay.fsdp, tensor=lay.tensor, pipeline=lay.pipeline, remat=lay.remat,
                microbatches=lay.microbatches, shard_optimizer=lay.shard_optimizer, repeats=lay.repeats)


def measure(case: dict) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], env=env, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        raise SystemExit(f"compile of {case['name']} failed: {lines[-1][:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def store(record: dict) -> None:
    """Put `record` into RUNS_FILE in CASES order, replacing an older record of the same name."""
    import yaml

    runs = yaml.safe_load(RUNS_FILE.read_text())["runs"] if RUNS_FILE.exists() else []
    runs = [r for r in runs if r["name"] != record["name"]] + [record]
    order = [c[0] for c in CASES]
    runs.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    RUNS_FILE.write_text("# Written by benchmarks/aot_memory.py: XLA's peak memory per device for chipwise's train "
                         "step on TPU\n# slices, compiled ahead of time. Do not edit by hand; rerun it.\n"
                         + yaml.safe_dump({"runs": runs}, sort_keys=False))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--write", action="store_true", help="store the records for the tests and print a table")
    p.add_argument("--table", action="store_true", help="only print the stored records as a markdown table")
    args = p.parse_args()
    import jax

    from chipwise.plan.aot import record_memory
    from chipwise.plan.memory import GIB

    wanted = set(filter(None, args.only.split(",")))
    import libtpu

    from chipwise.plan.calibration import cpu_model

    meta = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
            "libtpu": getattr(libtpu, "__version__", "unknown"),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}"}
    records = []
    for name, model, layers, acc, chips, seq, batch, layout in CASES:
        if args.table or (wanted and name not in wanted):
            continue
        base = dict(data=1, fsdp=1, tensor=1, pipeline=1, microbatches=1, shard_optimizer=False, repeats=1)
        case = dict(name=name, model=model, layers=layers, accelerator=acc, chips=chips, seq=seq, batch=batch,
                    layout=base | (layout or planner_layout(model, acc, chips, seq, batch)),
                    picked_by_planner=layout is None)
        t = time.time()
        case |= measure(case)
        case["planner_gib"] = round(record_memory(case).total / GIB, 3)
        records.append(case)
        if args.write:  # after every case: a later failure keeps what was measured
            store(case | {"measured": meta})
        print(f"{name}: XLA {case['xla_peak_gib']:.2f} GiB, planner {case['planner_gib']:.2f} GiB "
              f"({case['planner_gib'] / case['xla_peak_gib'] - 1:+.1%}), compiled in {case['compile_s']} s "
              f"({time.time() - t:.0f} s in all)", flush=True)
    if args.write or args.table:
        import yaml

        records = yaml.safe_load(RUNS_FILE.read_text())["runs"]  # every stored case, in CASES order
        print("\n| case | layers | slice | layout | XLA peak GiB | planner GiB | compile s |")
        print("|---|---:|---|---|---:|---:|---:|")
        for r in records:
            lay = r["layout"]
            piped = f"pipeline={lay['pipeline']}," if lay["pipeline"] > 1 else ""
            text = (f"{piped}data={lay['data']},fsdp={lay['fsdp']},tensor={lay['tensor']} mb={lay['microbatches']} "
                    f"remat={lay['remat']}" + (" zero1" if lay["shard_optimizer"] else "")
                    + (" (planner's pick)" if r["picked_by_planner"] else ""))
            print(f"| {r['name']} | {r['layers'] or 'all'} | {r['accelerator']} x{r['chips']} | {text} | "
                  f"{r['xla_peak_gib']:.2f} | {r['planner_gib']:.2f} "
                  f"({r['planner_gib'] / r['xla_peak_gib'] - 1:+.0%}) | {r['compile_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
