"""Step time of one training layout on one chip type, from its parts.

    step = compute + tensor-parallel collectives + exposed FSDP/data collectives + pipeline bubble + overhead
    compute = GEMMs (roofline per shape, padded to the matrix unit's tile) + attention + element-wise + optimizer

Compute is per chip for one optimizer step (all micro-batches). FLOPs come from flops.py (the trainer's count),
memory from memory.py; the constants and why each is what it is are in assumptions.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from chipwise.catalog import Accelerator
from chipwise.config import ModelConfig
from chipwise.config_checks import context_splits, pipeline_schedule_problem
from chipwise.errors import ConfigError
from chipwise.flops import forward_flops_per_token, training_flops_per_token
from chipwise.plan import achieved
from chipwise.plan import assumptions as A
from chipwise.plan.memory import (DTYPE_BYTES, GIB, USABLE_HBM_FRACTION, MemoryEstimate, kv_elements_per_token,
                                  stage_param_count, training_memory)
from chipwise.sharding import MESH_AXES, pipeline_stage_layers

COMPUTE_PARTS = ("matmul", "attention", "elementwise", "loss", "dispatch")


@dataclass(frozen=True)
class Layout:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    pipeline: int = 1
    microbatches: int = 1  # micro-batches per optimizer step (gradient accumulation, or the pipeline's)
    remat: str = "none"
    shard_optimizer: bool = False  # ZeRO-1: AdamW's moments split over data too (train.shard_optimizer)
    context: int = 1  # context parallelism: each sequence split over this many chips (train/context.py)
    repeats: int = 1  # passes through the pipeline (train.pipeline_repeats: 1 is GPipe, more circular)

    @property
    def chips(self) -> int:
        return self.data * self.fsdp * self.context * self.tensor * self.pipeline

    def mesh_text(self) -> str:
        context = f",context={self.context}" if self.context > 1 else ""
        return f"data={self.data},fsdp={self.fsdp}{context},tensor={self.tensor},pipeline={self.pipeline}"

    def describe(self) -> str:
        zero1 = " zero1" if self.shard_optimizer else ""
        passes = f" passes={self.repeats}" if self.repeats > 1 else ""
        return f"{self.mesh_text()} mb={self.microbatches}{passes} remat={self.remat}{zero1}"


@dataclass(frozen=True)
class ChipModel:
    """The figures the model uses for one chip: catalog facts, platform assumptions, or a calibration."""
    accelerator: Accelerator
    peak_tflops: float  # dense bf16 per chip (catalog) or measured (calibration)
    matmul_efficiency: float
    matmul_half_dim: float  # GEMM dims of this size run at half speed (calibrated CPUs; 0 elsewhere)
    attention_efficiency: float
    tile: int
    hbm_tbps: float
    memory_efficiency: float
    flash_attention: bool
    step_overhead_s: float
    compute_bytes: int = 2  # bytes per activation element (bf16; a CPU calibrated in fp32 has 4)
    # Calibration: measured / modelled time of each compute part, fitted on real train steps (calibration.py).
    matmul_scale: float = 1.0
    attention_scale: float = 1.0
    elementwise_scale: float = 1.0
    loss_scale: float = 1.0
    collective_scale: float = 1.0  # achieved / modelled time of collectives (fitted across the published runs)
    layer_overhead_s: float = 0.0  # fixed time per layer and micro-batch (kernel dispatch), forward + backward
    source: str = "catalog + platform assumptions"
    stack: str = ""  # the software stack whose achieved efficiency this is (plan/achieved.py)
    efficiency_basis: str = ""  # which published runs (or measurement) the efficiency comes from
    range_half_width: float = 0.0  # the prediction's range: x exp(-w) .. x exp(+w) (0: none known)

    @property
    def hbm_gib(self) -> float | None:
        return self.accelerator.hbm_gib


def catalog_chip(acc: Accelerator, efficiency: float, collective_scale: float = 1.0, **fields) -> ChipModel:
    """A catalog chip whose large GEMMs reach `efficiency` of its dense peak (attention the platform's fraction of
    that) and whose collectives take `collective_scale` times the modelled time."""
    base = A.PLATFORMS[acc.platform]
    return ChipModel(acc, acc.bf16_tflops or 0.0, efficiency, 0.0, efficiency * base.attention_to_matmul,
                     A.TILE_OVERRIDES.get(acc.id, base.tile), acc.hbm_tbps or 0.0, base.memory_efficiency,
                     base.flash_attention, base.step_overhead_s, collective_scale=collective_scale, **fields)


def chip_model(acc: Accelerator, calibration: dict | None = None, view: str = "achieved",
               stack: str | None = None) -> ChipModel:
    """The chip's model: the catalog's figures at what its platform's software `stack` achieved in the published runs
    (view "achieved"), or at the share of peak common to all runs (view "peak"); a calibration profile
    (plan/calibration.py) replaces what it measured, in both views."""
    got = achieved.for_platform(acc.platform, view, stack)
    cm = catalog_chip(acc, got.matmul_efficiency, got.collective_scale, source="catalog",
                      stack=got.stack, efficiency_basis=got.basis, range_half_width=got.range_half_width)
    if calibration is not None:
        cm = replace(cm, **{k: v for k, v in calibration["chip_model"].items()},
                     source=f"calibrated ({calibration.get('path', 'profile')}, {calibration.get('measured_on', '?')})",
                     efficiency_basis="measured by chipwise bench",
                     range_half_width=achieved.from_calibration(calibration) or 0.0)
    if not cm.peak_tflops:
        raise ConfigError(f"accelerator {acc.id} has no published bf16 peak; run `chipwise bench` on it to "
                          f"calibrate, or set one with --catalog-set {acc.id}.bf16_tflops=TFLOPS")
    if not cm.hbm_tbps:
        raise ConfigError(f"accelerator {acc.id} has no published HBM bandwidth; "
                          f"set it with --catalog-set {acc.id}.hbm_tbps=TB_PER_S")
    return cm


@dataclass
class StepEstimate:
    layout: Layout
    step_time_s: float
    parts: dict[str, float]  # seconds, per step
    memory: MemoryEstimate
    fits: bool
    usable_gib: float | None
    model_tflops_per_chip: float
    mfu: float
    tokens_per_s_per_chip: float
    notes: list[str] = field(default_factory=list)

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GIB

    @property
    def comm_bound(self) -> bool:
        compute = sum(self.parts[p] for p in COMPUTE_PARTS)
        return self.parts["comm_exposed"] > compute


def _pad(x: float, tile: int) -> float:
    return math.ceil(x / tile) * tile if x >= 1 else x


def gemm_time(chip: ChipModel, m: float, k: float, n: float) -> float:
    """One [m,k] x [k,n] bf16 GEMM: the slower of compute (padded shapes) and moving its operands."""
    dims = [_pad(x, chip.tile) for x in (m, k, n)]
    eff = chip.matmul_efficiency
    if chip.matmul_half_dim:
        for x in (m, k, n):
            eff *= x / (x + chip.matmul_half_dim)
    flops = 2 * dims[0] * dims[1] * dims[2]
    compute = flops / (chip.peak_tflops * 1e12 * eff)
    traffic = chip.compute_bytes * (m * k + k * n + m * n) / (chip.hbm_tbps * 1e12 * chip.memory_efficiency)
    return max(compute, traffic)


def _layer_gemms(cfg: ModelConfig, tokens: float, t: int) -> list[tuple[float, float, float]]:
    """Forward GEMMs of one layer on one chip: (m, k, n)."""
    d, hd = cfg.d_model, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd / t
    ffn_in = (2 if cfg.ffn == "swiglu" else 1) * cfg.d_ff / t
    return [(tokens, d, qkv), (tokens, cfg.num_heads * hd / t, d), (tokens, d, ffn_in), (tokens, cfg.d_ff / t, d)]


def _train_gemm_time(chip: ChipModel, gemms) -> float:
    """Forward plus backward: dX = dY W^T ([m,n]x[n,k]) and dW = X^T dY ([k,m]x[m,n])."""
    return sum(gemm_time(chip, m, k, n) + gemm_time(chip, m, n, k) + gemm_time(chip, k, m, n) for m, k, n in gemms)


def _collective_time(chip: ChipModel, group: int, stride: int, bytes_per_chip: float, kind: str) -> float:
    """All-gather / reduce-scatter (kind 'ag') or all-reduce ('ar') of `bytes_per_chip` (the full, unsharded
    size) over a group of `group` chips whose members sit `stride` chips apart.

    Inside the fabric domain a ring over the fabric; across domains hierarchical: reduce-scatter inside the
    domain, the network for the 1/k left, all-gather inside (NCCL's and XLA's two-level algorithms).
    """
    if group <= 1 or bytes_per_chip <= 0:
        return 0.0
    acc = chip.accelerator
    factor = 2.0 if kind == "ar" else 1.0
    domain = acc.fabric.domain_chips or 1
    fabric_bw = (acc.fabric.gbps_per_chip or 0) * 1e9 * _fabric_efficiency(acc.fabric.kind)
    net_bw = (acc.scaleout_gbps_per_chip or 0) * 1e9 * A.NETWORK_EFFICIENCY
    local = max(1, min(group, domain // stride)) if stride <= domain else 1
    remote = group // local
    t = 0.0
    if local > 1:
        if not fabric_bw:
            raise ConfigError(f"{acc.id} has no fabric bandwidth in the catalog; set fabric.gbps_per_chip")
        t += factor * (local - 1) / local * bytes_per_chip / fabric_bw + A.FABRIC_LATENCY_S * factor
    if remote > 1:
        if not net_bw:
            raise ConfigError(f"{acc.id} has no scale-out bandwidth in the catalog, so a group of {group} chips "
                              f"cannot leave its {domain}-chip fabric domain; set scaleout_gbps_per_chip")
        t += factor * (remote - 1) / remote * bytes_per_chip / local / net_bw + A.NETWORK_LATENCY_S * factor
    return t * chip.collective_scale


def _fabric_efficiency(kind: str | None) -> float:
    """The share of the fabric's bandwidth a collective gets, by how its chips are wired (catalog fabric.kind).

    No kind means no fabric: the catalog then has no bandwidth either, so nothing is lost by counting none.
    """
    return A.FABRIC_EFFICIENCY[kind] if kind else 0.0


def _strides(layout: Layout) -> dict[str, int]:
    strides, s = {}, 1
    for axis in reversed(MESH_AXES):
        strides[axis] = s
        s *= getattr(layout, axis)
    return strides


def check_layout(cfg: ModelConfig, global_batch: int, layout: Layout, seq_len: int | None = None) -> str | None:
    """Why this layout cannot run this model, batch (and sequence length, where given) at all (None if it can)."""
    if seq_len is not None and not context_splits(seq_len, layout.context):
        return f"sequence {seq_len} does not split into 2 x context = {2 * layout.context} chunks"
    if layout.remat not in A.REMAT_RECOMPUTE:
        return f"remat {layout.remat!r} is not one of none, dots, full"
    ranks = layout.data * layout.fsdp
    if global_batch % ranks:
        return f"global batch {global_batch} does not split over data x fsdp = {ranks}"
    if (global_batch // ranks) % layout.microbatches:
        return f"{global_batch // ranks} sequences per rank do not split into {layout.microbatches} micro-batches"
    if cfg.num_heads % layout.tensor:
        return f"{cfg.num_heads} heads do not split over tensor={layout.tensor}"
    return pipeline_schedule_problem(cfg.num_layers, layout.pipeline, layout.repeats, layout.microbatches)
    return None


def estimate(cfg: ModelConfig, seq_len: int, global_batch: int, chip: ChipModel, layout: Layout, *,
             param_dtype: str = "float32", moments_dtype: str = "float32", loss_chunk_tokens: int = 0,
             schedule: str = "chipwise") -> StepEstimate:
    """The step time and memory of `layout`; the dtypes and loss chunk are the train config's (train.param_dtype,
    train.moments_dtype, train.loss_chunk_tokens); `schedule` the pipeline's (assumptions.PIPELINE_SCHEDULES:
    chipwise's trainer, or the 1F1B of published runs)."""
    t, f, d, p, mb = layout.tensor, layout.fsdp, layout.data, layout.pipeline, layout.microbatches
    c = layout.context
    pb, zero1 = DTYPE_BYTES[param_dtype], layout.shard_optimizer and d > 1
    seqs_per_rank = global_batch / (d * f)
    tokens_mb = seqs_per_rank / mb * seq_len / c  # tokens one chip's micro-batch carries (its 1/c of each sequence)
    r, sched = layout.repeats, A.PIPELINE_SCHEDULES[schedule]
    layers = r * max(pipeline_stage_layers(cfg.num_layers, p * r))  # the most loaded stage sets the pace
    # Forward passes recomputed in the backward one: remat's, plus the pipeline's own (train/pipeline.py keeps only
    # each stage's input per tick and runs the stage forward again before its gradient, as GPipe does).
    stage_remat = sched["stage_recompute"] if p > 1 else 0.0
    recompute = A.REMAT_RECOMPUTE[layout.remat] + stage_remat

    # GEMMs: layers on this stage plus the LM head, which every stage's chips compute for their data shard where the
    # schedule runs it outside the pipeline (chipwise's), or the last stage does (spread evenly here).
    head_share = 1 if sched["head_on_every_stage"] else 1 / p
    gemms = _layer_gemms(cfg, tokens_mb, t)
    layer_gemm = _train_gemm_time(chip, gemms) + recompute * sum(gemm_time(chip, *g) for g in gemms)
    head_gemm = _train_gemm_time(chip, [(tokens_mb, cfg.d_model, cfg.vocab_size / t)]) * head_share
    layer_matmul = mb * layers * layer_gemm
    matmul = layer_matmul + mb * head_gemm

    # Attention (scores and weighted values).
    hd = cfg.head_dim
    attn_flops = forward_flops_per_token(cfg, seq_len).attention / cfg.num_layers * tokens_mb / t  # per layer fwd
    peak = chip.peak_tflops * 1e12
    bw = chip.hbm_tbps * 1e12 * chip.memory_efficiency
    if chip.flash_attention:
        attn_layer = (3 * A.FLASH_ATTENTION_EXECUTED + recompute) * attn_flops / (peak * chip.attention_efficiency)
    else:
        # Dense attention: per sequence and head, [S,hd]x[hd,S] scores and [S,S]x[S,hd] values, the full square.
        seqs_mb = tokens_mb / seq_len
        per_head = gemm_time(chip, seq_len, hd, seq_len) + gemm_time(chip, seq_len, seq_len, hd)
        dense = seqs_mb * cfg.num_heads / t * per_head
        scores = seqs_mb * cfg.num_heads / t * seq_len**2 * 4 * A.DENSE_SCORE_PASSES / bw
        attn_layer = (3 + recompute) * dense + scores
    attention = mb * layers * attn_layer

    # Element-wise work, the loss and the optimizer update: memory-bound.
    fwd_elems = (4 * cfg.d_model + 2 * (cfg.num_heads + cfg.num_kv_heads) * hd / t + 6 * cfg.d_model
                 + 3 * cfg.d_ff / t)
    ew_factor = 1 + A.BACKWARD_ELEMENTWISE_FACTOR + A.REMAT_ELEMENTWISE_RECOMPUTE[layout.remat] + stage_remat
    layer_elementwise = mb * layers * tokens_mb * fwd_elems * chip.compute_bytes * ew_factor / bw
    loss = mb * tokens_mb * cfg.vocab_size / t * 4 * A.LOSS_PASSES / bw * head_share
    # The AdamW update reads the parameter, gradient and moments and writes them back (the assumption's fp32
    # figure, less what narrower stored dtypes save); under ZeRO-1 each chip updates its 1/data of them.
    update_bytes = A.OPTIMIZER_BYTES_PER_PARAM - 3 * (4 - pb) - 4 * (4 - DTYPE_BYTES[moments_dtype])
    stage_params = stage_param_count(cfg, p, r, schedule) / t
    optimizer = stage_params / (f * (d if zero1 else 1)) * update_bytes / bw
    # Fixed cost of each layer's kernels (launch, dispatch), forward and backward, per micro-batch.
    dispatch = mb * layers * chip.layer_overhead_s
    matmul, attention = chip.matmul_scale * matmul, chip.attention_scale * attention
    elementwise = chip.elementwise_scale * (layer_elementwise + optimizer)
    # What the layers alone take (each pipeline tick repeats it for one micro-batch)
    layer_work = chip.matmul_scale * layer_matmul + attention + chip.elementwise_scale * layer_elementwise + dispatch
    loss = chip.loss_scale * loss
    compute = matmul + attention + elementwise + loss + dispatch

    # Collectives.
    st = _strides(layout)
    act_bytes = tokens_mb * cfg.d_model * chip.compute_bytes
    # Megatron tensor parallelism: 2 all-reduces of activations per layer forward, 2 backward (+2 recomputed).
    tp_per_layer = (4 + 2 * recompute) * _collective_time(chip, t, st["tensor"], act_bytes, "ar")
    tp_comm = mb * layers * tp_per_layer
    # Context parallelism: all-gather K and V over the context chips forward (again when remat recomputes) and
    # reduce-scatter their gradients backward; grouped-query K/V are small next to the layer's activations.
    kv_bytes = 2 * kv_elements_per_token(cfg, t) * tokens_mb * c * chip.compute_bytes
    cp_comm = mb * layers * (2 + recompute) * _collective_time(chip, c, st["context"], kv_bytes, "ag")
    # FSDP: gather bf16 weights forward and again backward, reduce-scatter gradients (in the parameters' dtype),
    # per micro-batch.
    fsdp_comm = mb * (2 * _collective_time(chip, f, st["fsdp"], stage_params * 2, "ag")
                      + _collective_time(chip, f, st["fsdp"], stage_params * pb, "ag"))
    # Data parallelism: all-reduce the (FSDP-sharded) gradients once per step, over the context chips too (they
    # hold the same parameters). ZeRO-1 then all-gathers the updated parameters from the chips that updated them
    # (as XLA compiles it: the all-reduce stays one, no reduce-scatter).
    dp_comm = _collective_time(chip, d * c, st["context"] if c > 1 else st["data"], stage_params / f * pb, "ar")
    if zero1:
        dp_comm += _collective_time(chip, d, st["data"], stage_params / f * pb, "ag")
    # Pipeline, at each of the r x mb + p - 1 ticks forward and again backward: activations (gradients) move one
    # stage on, and under chipwise's schedule the last stage's output reaches every stage (train/pipeline.py).
    ticks = r * mb + p - 1
    spread = _collective_time(chip, p, st["pipeline"], act_bytes, "ar") if sched["head_on_every_stage"] else 0.0
    pp_comm = 2 * ticks * (_collective_time(chip, 2, st["pipeline"], act_bytes, "ag") + spread) if p > 1 else 0.0
    hidden = fsdp_comm + dp_comm
    exposed = max(0.0, hidden - compute) + hidden / max(layers, 1) if hidden else 0.0
    # Each stage runs a group of its layers for r x mb + p - 1 ticks, r x mb of them useful (train/pipeline.py); the
    # head, the loss and the optimizer update run once.
    bubble = (p - 1) / (r * mb) * (layer_work + tp_comm + cp_comm) if p > 1 else 0.0
    step = compute + tp_comm + cp_comm + exposed + pp_comm + bubble + chip.step_overhead_s

    mem = training_memory(cfg, seq_len, seqs_per_rank / mb, fsdp=f, tensor=t, pipeline=p, microbatches=mb, repeats=r,
                          schedule=schedule,
                          remat=layout.remat, data=d, context=c, shard_optimizer=zero1, param_dtype=param_dtype,
                          moments_dtype=moments_dtype, loss_chunk_tokens=loss_chunk_tokens)
    usable = chip.hbm_gib * USABLE_HBM_FRACTION if chip.hbm_gib else None
    tokens = global_batch * seq_len
    chips = layout.chips
    model_flops = training_flops_per_token(cfg, seq_len).total * tokens
    tflops_per_chip = model_flops / chips / step / 1e12
    parts = {"matmul": matmul, "attention": attention, "elementwise": elementwise, "loss": loss, "dispatch": dispatch,
             "tensor_comm": tp_comm, "context_comm": cp_comm,
             "fsdp_dp_comm": hidden, "comm_exposed": tp_comm + cp_comm + exposed + pp_comm, "bubble": bubble,
             "overhead": chip.step_overhead_s}
    return StepEstimate(layout, step, parts, mem, usable is None or mem.total / GIB <= usable, usable,
                        tflops_per_chip, tflops_per_chip / chip.peak_tflops, tokens / step / chips)
