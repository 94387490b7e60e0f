"""Ahead-of-time check of a TPU plan: compile chipwise's real train step for the planned topology on this machine.

libtpu (the `tpu` extra) compiles for a TPU topology it is not running on (`jax.experimental.topologies`), so
XLA's own memory and cost analysis of the exact step the trainer would run can be set beside the planner's
estimate before any TPU is rented. The inputs are abstract (shapes and shardings only): nothing is allocated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from chipwise import catalog
from chipwise.errors import ChipwiseError
from chipwise.flops import training_flops_per_token
from chipwise.plan.memory import GIB

DISAGREEMENT = 0.25  # relative gap between model and XLA shown as a warning


def topology_name(acc: catalog.Accelerator | str, chips: int) -> str:
    """The slice name for `chips` chips: v5e:4x4 for 16, v5p:2x2x4 for 16, v5p:2x2x1 for 4 (as square as the chip
    count allows).

    acc: the chip, or its id in the shipped catalog; its catalog entry's libtpu_topology gives the name's parts.
    """
    acc = catalog.get(acc) if isinstance(acc, str) else acc
    if acc.libtpu_topology is None:
        known = [a.id for a in catalog.load_catalog().values() if a.libtpu_topology and a.id != acc.id]
        raise ChipwiseError(f"--aot knows the topologies of {', '.join(known)}, not {acc.id} (its catalog entry has "
                            "no libtpu_topology); plan one of those")
    prefix, dims = acc.libtpu_topology.prefix, acc.libtpu_topology.dims
    if chips & (chips - 1):
        raise ChipwiseError(f"--aot needs a power-of-two chip count for a {prefix} slice, got {chips}")
    exps = [0] * dims
    for i in range(int(math.log2(chips))):  # deal the factors of two out round-robin, last dimension first
        exps[dims - 1 - i % dims] += 1
    # Ascending, with the unused dimensions last: libtpu takes v5p:2x2x1 for 4 chips (a host's bounds), not 1x2x2.
    sizes = sorted(2**e for e in exps)
    return f"{prefix}:" + "x".join(str(s) for s in [s for s in sizes if s > 1] + [s for s in sizes if s == 1])


@dataclass
class AotResult:
    accelerator: str
    topology: str
    mesh: str
    attention: str
    xla_memory_gib: float  # per device: XLA's peak of live buffers, arguments included (its heap as allocated)
    model_memory_gib: float  # the planner's estimate per device
    xla_argument_gib: float  # per device: the step's inputs (sharded parameters, optimizer state, tokens)
    model_state_gib: float  # the planner's parameters + optimizer state per device
    xla_tflops: float  # per device per step, as XLA counts (executed FLOPs, recomputation included)
    model_tflops: float  # the planner's model FLOPs per device per step (flops.py), of what XLA counts: one loop
    # body (one scanned layer, one micro-batch)
    compile_s: float  # lowering + compilation on this machine
    warnings: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def _require_libtpu():
    from chipwise.process import quiet_libtpu_off_tpu

    quiet_libtpu_off_tpu()
    try:
        from jax.experimental import topologies

        return topologies
    except ImportError as e:  # pragma: no cover - jax always ships the module; libtpu is what may be missing
        raise ChipwiseError(f"--aot needs jax's TPU support: pip install 'chipwise[tpu]' ({e})") from None


def compile_for_topology(cfg, topology: str, mesh_sizes: dict[str, int]):
    """Compile chipwise's train step for `topology`; returns (compiled, attention name, compile seconds)."""
    from chipwise.config import MeshConfig
    from chipwise.sharding import make_mesh
    from chipwise.train.compiled_step import build_train_step

    topologies = _require_libtpu()
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu missing or the name unknown: both a user-fixable setup issue
        raise ChipwiseError(" ".join(f"--aot cannot describe TPU topology {topology}: {e}. Install the tpu "
                                     "extra (pip install 'chipwise[tpu]')".split())[:400]) from None
    mesh = make_mesh(MeshConfig(**mesh_sizes), topo.devices)  # the trainer's own device placement
    step = build_train_step(cfg, mesh, "tpu").compile()
    return step.train, step.attention.name, step.compile_s


def xla_peak_bytes(mem) -> float:
    """Bytes one device needs for the compiled step: XLA's simulated peak of live buffers, arguments included.

    Not arguments + temporaries: on TPU `temp_size_in_bytes` counts more than the heap XLA assigns (llama3-8b at seq
    8192 on v5p-8: 23.6 GiB of "temporaries" against a peak of 25.4 GiB with 11.2 GiB of arguments; the buffer
    assignment dump's preallocated heap plus the arguments is the peak). Backends that do not report a peak (0)
    fall back to that sum, an upper bound."""
    peak = getattr(mem, "peak_memory_in_bytes", 0)
    if peak:
        return float(peak)
    return float(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes)


def record_memory(record: dict):
    """The planner's memory estimate (plan/memory.py) for one record of benchmarks/aot_memory.py (model, layers,
    seq, global batch, layout): the figure set beside XLA's there and held to it in tests/test_planner.py."""
    from chipwise.plan.memory import training_memory
    from chipwise.plan.spec import load_model

    model = load_model(record["model"])
    model = replace(model, num_layers=record["layers"] or model.num_layers, scan_layers=True)
    lay = record["layout"]
    seqs = record["batch"] / (lay["data"] * lay["fsdp"]) / lay["microbatches"]  # one micro-batch of one rank
    return training_memory(model, record["seq"], seqs, data=lay["data"], fsdp=lay["fsdp"], tensor=lay["tensor"],
                           pipeline=lay["pipeline"], microbatches=lay["microbatches"], remat=lay["remat"],
                           repeats=lay.get("repeats", 1),
                           shard_optimizer=lay["shard_optimizer"])


def aot_check(req, row) -> AotResult:
    """Compile the planned layout of `row` (a PlanRow on a TPU) and compare XLA's analysis with the model's."""
    from chipwise.config import from_dict
    from chipwise.plan.emit import train_config

    acc, layout = row.accelerator, row.estimate.layout
    try:
        values = train_config(req, row)  # the config `plan --emit-config` writes for this row
    except ChipwiseError as e:
        raise ChipwiseError(f"--aot: {e}") from None
    cfg = from_dict(values)
    topology = topology_name(acc, layout.chips)  # the run's catalog, overrides included
    try:
        compiled, attn, compile_s = compile_for_topology(cfg, topology, values["mesh"])
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is a finding about the plan, said in one line
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        xla = " ".join(str(e).split()).split("RESOURCE_EXHAUSTED:")[-1].strip()[:200]
        raise ChipwiseError(f"--aot: XLA cannot fit the planned layout on {acc.id} ({layout.mesh_text()}, remat "
                            f"{layout.remat}, {layout.microbatches} micro-batches): {xla}; the planner estimated "
                            f"{row.estimate.memory.total / acc.devices_per_chip / GIB:.1f} GiB per device, so trust "
                            f"XLA and pin more remat or micro-batches (--remat full, --microbatches N)") from None
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_bytes = xla_peak_bytes(mem)
    devices = layout.chips * acc.devices_per_chip
    # XLA's cost analysis counts a loop body once: with scanned layers one layer of the forward and backward
    # scans, with micro-batches one micro-batch. Compare like with like: the model's FLOPs of what XLA counts.
    counted = replace(cfg.model, num_layers=1) if cfg.model.scanned else cfg.model
    tokens_counted = req.global_batch * req.seq_len / max(layout.microbatches, 1)
    model_flops = training_flops_per_token(counted, req.seq_len).total * tokens_counted / devices
    est = row.estimate.memory
    result = AotResult(acc.id, topology, layout.mesh_text(), attn, xla_bytes / GIB,
                       est.total / acc.devices_per_chip / GIB, mem.argument_size_in_bytes / GIB,
                       (est.params + est.optimizer) / acc.devices_per_chip / GIB,
                       float(cost.get("flops", 0.0)) / 1e12, model_flops / 1e12, compile_s, [])
    # A chunked loss is a third loop, nested in the others (and remat recomputes inside them): XLA's count is then
    # no longer a figure the model can be held to, so FLOPs are shown but not compared.
    from chipwise.train.loss import default_chunk_tokens

    chunked = (cfg.train.loss_chunk_tokens or default_chunk_tokens(cfg.model.vocab_size)) < tokens_counted
    compared = [("memory", result.xla_memory_gib, result.model_memory_gib)]
    if not chunked:
        compared.append(("FLOPs", result.xla_tflops, result.model_tflops))
    for what, xla, model in compared:
        if model and abs(xla / model - 1) > DISAGREEMENT:
            result.warnings.append(f"{what}: XLA says {xla:.4g}, the planner {model:.4g} "
                                   f"({xla / model - 1:+.0%}); trust XLA's figure for this layout")
    return result


def print_aot(r: AotResult) -> None:
    print(f"AOT check {r.accelerator} {r.topology} ({r.mesh}, attention {r.attention}), compiled in "
          f"{r.compile_s:.1f} s; per device per step:")
    print(f"  memory  XLA {r.xla_memory_gib:8.3f} GiB   planner {r.model_memory_gib:8.3f} GiB (XLA: its peak of live "
          "buffers, inputs included)")
    print(f"  inputs  XLA {r.xla_argument_gib:8.3f} GiB   planner {r.model_state_gib:8.3f} GiB (parameters and "
          "optimizer state)")
    print(f"  FLOPs   XLA {r.xla_tflops:8.4g} TFLOP  planner {r.model_tflops:8.4g} TFLOP (model FLOPs; XLA counts "
          "what it executes, recomputation and dense attention squares included, and a loop body once: one "
          "scanned layer, one micro-batch)")
    for w in r.warnings:
        print(f"  WARNING {w}")
