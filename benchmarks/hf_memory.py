"""Peak host memory of importing (`train --init-from`) and exporting (`chipwise export`) a Hugging Face checkpoint,
tensor by tensor (src/chipwise/hf/checkpoint.py), against the eager code it replaced (copied below).

    python benchmarks/hf_memory.py [--preset 1b] [--ops import,export,export-gguf] [--dir DIR] [--keep] [--markdown]
                                   [--wait-quiet SECONDS]

With the preset's shape and random weights, two HF checkpoints are written (streamed, one tensor at a time), one in
bf16 and one in fp32, each one file. Every measurement then runs in a fresh process, set up as the `chipwise`
command sets itself up (process.setup(): one malloc arena that keeps what is freed, so the peak is the heap's
high-water mark), on the one CPU device:

- import: the run's parameter shardings are built (train/step.py build_steps), then the checkpoint is placed on
  the device: new = chipwise.hf.initial_params; old = the eager loader (every tensor read, converted and stacked
  as fp32 numpy, then placed with make_array_from_callback). For the bf16 checkpoint also "device": the new loader
  as it works for an accelerator (place_checkpoint(widen_on_host=False): windows kept in bf16 on the host, placed,
  then widened on the device), which on a CPU holds a tensor's bf16 copy and its fp32 one at once.
- export: the fp32 checkpoint's params are placed on the device first (the process's own share, as a restored run
  holds them), then written as an HF checkpoint with 5GB shards (export's default --max-shard-size): new =
  checkpoint.write_weights; old = the eager writer (device_get of every param, to_hf_tensors, save_file of each
  shard).
- export-gguf: the same params written as one GGUF file (`export --format gguf`, fp32): new =
  gguf_export.write_gguf (tensor infos first, then each tensor fetched, written and dropped); old = the writer it
  replaced (every tensor converted and handed to gguf.GGUFWriter, which holds them until it writes).

The peak is /proc/self/status's VmHWM, reset through /proc/self/clear_refs right before the operation (after
malloc_trim, so that heap memory freed earlier, which the process set-up keeps, does not hide a peak). Reported:
extra = peak - RSS just before - bytes the operation placed on the device (import: on a CPU the device's memory is
host memory, and the placed params are the process's share, not a cost of reading), against the largest tensor
(the embedding; fp32 as placed, and as stored). Target (issue): extra under 1.5x the largest tensor.
Before measuring, --wait-quiet waits (up to that many seconds) for the 1-minute load average to fall below 1.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quiet import wait_quiet

GB = 1e9


def status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def model(preset: str):
    from chipwise.config import ModelConfig
    from chipwise.presets import PRESETS

    return ModelConfig(**PRESETS[preset])


# The eager code this replaced (src/chipwise/hf/checkpoint.py and hf/__init__.py before), for comparison.

def old_read_checkpoint(hf_dir: Path, max_seq_len, scan_layers):
    from safetensors import safe_open

    from chipwise.hf import convert
    from chipwise.hf.checkpoint import read_config, weight_files

    m = dataclasses.replace(convert.model_config(read_config(hf_dir), max_seq_len), scan_layers=scan_layers)
    files = weight_files(hf_dir)
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    convert.check_tensors(shapes, m)
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return m, convert.from_hf_tensors(tensors, m)


def old_initial_params(cfg, shardings):
    import jax

    from chipwise.hf import check_model
    from chipwise.train.pipeline import map_stacked
    from chipwise.train.step import stage_layout

    check_model(cfg)
    _, params = old_read_checkpoint(Path(cfg.train.init_from), cfg.model.max_seq_len, cfg.model.scanned)
    params = map_stacked(params, stage_layout(cfg).to_slots)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, shardings)


def old_write_weights(out: Path, m, params, max_shard_bytes: int) -> list[str]:
    import jax
    from safetensors.numpy import save_file

    from chipwise.hf import convert
    from chipwise.hf.checkpoint import INDEX_FILE, SINGLE_FILE, shard

    params = jax.tree.map(lambda x: jax.device_get(x), params)
    tensors = convert.to_hf_tensors(params, m)
    groups = shard(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(groups) == 1:
        save_file(groups[0], str(out / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(files, groups):
        save_file(group, str(out / name), metadata=meta)
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": {k: name for name, g in zip(files, groups) for k in g}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def old_write_gguf(path: Path, m, params) -> None:
    """gguf_export.write_gguf before it streamed: every param fetched, converted, and handed to the writer, which
    holds them all until it writes the file."""
    import gguf
    import jax
    import numpy as np

    from chipwise.hf import convert
    from chipwise.hf.gguf_export import GGUF_GLOBAL, GGUF_LAYER, permute_rows

    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    w = gguf.GGUFWriter(str(path), "llama")
    for name, value in convert.to_hf_tensors(params, m).items():
        base, _, kind = name.rpartition(".")
        if base.startswith("model.layers."):
            i, _, part = base[len("model.layers."):].partition(".")
            key = f"blk.{i}.{GGUF_LAYER[part]}.{kind}"
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                value = permute_rows(value, m.num_heads if part == "self_attn.q_proj" else m.num_kv_heads)
        else:
            key = f"{GGUF_GLOBAL[base]}.{kind}"
        w.add_tensor(key, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# One measurement (a fresh process).

def child(args) -> None:
    from chipwise import process

    process.setup()
    import jax
    import jax.numpy as jnp

    jax.devices()
    rss_jax = status("VmRSS")
    from chipwise.attention import reference
    from chipwise.config import load_config
    from chipwise.hf import checkpoint, initial_params
    from chipwise.sharding import make_mesh, use_mesh
    from chipwise.train.step import build_steps

    m = dataclasses.replace(model(args.preset), scan_layers=args.layout == "scanned")
    ckpt = Path(args.dir) / ("fp32" if args.op.startswith("export") else args.dtype)
    cfg = load_config(None, [f"model={json.dumps(dataclasses.asdict(m))}", f"train.init_from={ckpt}",
                             "train.seq_len=128", "train.batch_size=1"])
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        shardings = build_steps(cfg, mesh, reference.attend, jnp.float32).state_shardings["params"]
    placed = 0
    if args.op.startswith("export"):
        params = initial_params(cfg, shardings)
        jax.block_until_ready(params)
        out = Path(args.dir) / f"out-{os.getpid()}"
        out.mkdir()
    # Freed heap memory (chipwise's process set-up keeps it, host_memory.py) goes back to the OS first, so that what
    # the operation needs must be faulted in again and shows in the peak.
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    if args.op == "import" and args.version == "device":  # what an accelerator does: bf16 widened on the device
        from chipwise.train.step import stage_layout

        slots = stage_layout(cfg).slot_layers() if cfg.model.scanned else None
        params = checkpoint.place_checkpoint(ckpt, cfg.model, shardings, slots, widen_on_host=False)
        jax.block_until_ready(params)
        placed = sum(x.nbytes for x in jax.tree.leaves(params))
    elif args.op == "import":
        params = (initial_params if args.version == "new" else old_initial_params)(cfg, shardings)
        jax.block_until_ready(params)
        placed = sum(x.nbytes for x in jax.tree.leaves(params))
    elif args.op == "export-gguf":  # no tokenizer metadata: the weights are what takes memory
        from chipwise.hf.gguf_export import write_gguf

        if args.version == "new":
            write_gguf(out / "model.gguf", m, params, {})
        else:
            old_write_gguf(out / "model.gguf", m, params)
    else:
        write = checkpoint.write_weights if args.version == "new" else old_write_weights
        write(out, m, params, 5 * 10**9)
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    if args.op.startswith("export"):
        shutil.rmtree(out)
    print(json.dumps(dict(rss_jax=rss_jax, before=before, peak=peak, placed=placed, seconds=seconds)))


# The checkpoints, and the measurements one process each.

def write_checkpoints(m, root: Path) -> None:
    import numpy as np

    from chipwise.hf import checkpoint, convert, safetensors_io

    for dtype, code in (("fp32", "F32"), ("bf16", "BF16")):
        path = root / dtype
        if (path / checkpoint.SINGLE_FILE).is_file():
            continue
        path.mkdir(parents=True, exist_ok=True)
        config = convert.hf_config(m, 0) | {"torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        rng = np.random.default_rng(0)

        def fetch(name, shapes=convert.expected_shapes(m)):
            if name.endswith("norm.weight"):
                return np.ones(shapes[name], np.float32)
            return rng.standard_normal(shapes[name], np.float32) * 0.02

        part = path / (checkpoint.SINGLE_FILE + ".part")
        safetensors_io.write_safetensors(part, convert.expected_shapes(m), code, fetch)
        part.rename(path / checkpoint.SINGLE_FILE)


def measure(args, op: str, version: str, layout: str, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", "--op", op, "--version", version, "--layout", layout,
               "--dtype", dtype, "--preset", args.preset, "--dir", str(args.dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    from chipwise.plan.calibration import cpu_model

    memory = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    import jax

    return (f"{cpu_model()}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB; Python {platform.python_version()}, "
            f"jax {jax.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/chipwise-hf-memory"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=0)
    parser.add_argument("--ops", default="import,export,export-gguf", help="which operations to measure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=("import", "export", "export-gguf"))
    parser.add_argument("--version", choices=("new", "device", "old"))
    parser.add_argument("--layout", choices=("unrolled", "scanned"))
    parser.add_argument("--dtype", choices=("fp32", "bf16"))
    args = parser.parse_args()
    if args.child:
        return child(args)

    m = model(args.preset)
    shapes = {}
    from chipwise.hf import convert

    shapes = convert.expected_shapes(m)
    largest = max(shapes, key=lambda k: math.prod(shapes[k]))
    largest_fp32 = 4 * math.prod(shapes[largest])
    total_fp32 = 4 * sum(math.prod(s) for s in shapes.values())
    started = time.time()
    write_checkpoints(m, args.dir)
    print(f"checkpoints written in {time.time() - started:.0f} s; load average now {wait_quiet(args.wait_quiet):.2f}",
          file=sys.stderr)
    rows = []
    cases = [("import", layout, dtype) for dtype in ("bf16", "fp32") for layout in ("unrolled", "scanned")]
    cases += [(op, layout, "fp32") for op in ("export", "export-gguf") for layout in ("unrolled", "scanned")]
    cases = [case for case in cases if case[0] in args.ops.split(",")]
    for op, layout, dtype in cases:
        for version in ("new", "device", "old") if (op, dtype) == ("import", "bf16") else ("new", "old"):
            r = measure(args, op, version, layout, dtype)
            stored = largest_fp32 // (2 if dtype == "bf16" and op == "import" else 1)
            extra = r["peak"] - r["before"] - r["placed"]
            rows.append((op, dtype if op == "import" else "fp32 (params)", layout, version, r, extra, stored))
            print(f"{op} {dtype} {layout} {version}: peak {r['peak'] / GB:.2f} GB, before {r['before'] / GB:.2f}, "
                  f"placed {r['placed'] / GB:.2f}, extra {extra / GB:.2f} GB = {extra / largest_fp32:.2f}x the "
                  f"largest tensor in fp32 ({extra / stored:.2f}x as stored), {r['seconds']:.1f} s", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(args.dir)

    header = (f"Model: the `{args.preset}` preset's shape ({total_fp32 / 4 / 1e9:.2f}B parameters, "
              f"{total_fp32 / GB:.2f} GB in fp32), random weights. Largest tensor: {largest} {shapes[largest]}, "
              f"{largest_fp32 / GB:.2f} GB in fp32 ({largest_fp32 / 2 / GB:.2f} GB in bf16).\nMachine: {machine()}. "
              f"RSS after importing jax: "
              f"{rows[0][4]['rss_jax'] / GB:.2f} GB.\n")
    lines = ["| operation | checkpoint | layout | code | peak RSS | RSS before | placed on device | extra | "
             "extra / largest tensor (fp32) | extra / largest tensor (as stored) | time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for op, dtype, layout, version, r, extra, stored in rows:
        lines.append(f"| {op} | {dtype} | {layout} | {version} | {r['peak'] / GB:.2f} GB | {r['before'] / GB:.2f} GB | "
                     f"{r['placed'] / GB:.2f} GB | {extra / GB:.2f} GB | {extra / largest_fp32:.2f}x | "
                     f"{extra / stored:.2f}x | {r['seconds']:.1f} s |")
    print(header + "\n" + "\n".join(lines) if args.markdown else header + "\n".join(lines))


if __name__ == "__main__":
    main()
