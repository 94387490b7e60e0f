"""Layout search: the fastest data x FSDP x tensor x pipeline layout, remat policy, micro-batching and ZeRO-1 (moments
split over data, where data > 1) that fits.

Every candidate is estimated with perf.estimate; the ones that lose say why (does not fit, communication-bound,
slower). Tensor parallelism stays inside the chip's fabric domain (it may exceed the trainer's platform rule, which the
table then notes),
and never exceeds the heads; pipelines need as many micro-batches as stages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from chipwise.config import ModelConfig
from chipwise.config_checks import pipeline_schedule_problem
from chipwise.errors import ConfigError
from chipwise.plan.perf import ChipModel, Layout, StepEstimate, check_layout, estimate
from chipwise.sharding import platform_rules

REMATS = ("none", "dots", "full")
ZERO1 = (False, True)  # train.shard_optimizer off / on


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class SearchResult:
    best: StepEstimate | None
    considered: int
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    runners_up: list[tuple[StepEstimate, str]] = field(default_factory=list)  # (estimate, why it lost)
    least_memory: StepEstimate | None = None  # the smallest-memory candidate, to say by how much nothing fits


def max_tensor_chips(chip: ChipModel) -> int:
    """Tensor parallelism stays inside the fast fabric (an all-reduce per layer cannot cross the network)."""
    return chip.accelerator.fabric.domain_chips or 1


def trainer_tensor_cap(chip: ChipModel) -> int | None:
    """chipwise's trainer rule (sharding.PLATFORM_RULES) in chips; the planner may go past it and says so."""
    acc = chip.accelerator
    device_cap = platform_rules(acc.platform)["max_tensor"]
    return None if device_cap is None else max(1, device_cap // acc.devices_per_chip)


def _zero1_choices(data: int, zero1s) -> tuple:
    return tuple(zero1s) if data > 1 else (False,)  # with one data rank there is nothing to split the moments over


LONG_CONTEXT_TOKENS = 32768


def _context_choices(chips: int, seq_len: int | None) -> list[int]:
    """Context-parallel degrees worth weighing: at sequences of 32k tokens and more (where Llama 3 used it), up to 16
    (its degree at 128k) where the sequence splits into 2 x context chunks of at least 1,024 tokens. Shorter
    sequences are not split unless a pinned --mesh says so: chipwise's context-parallel attention also computes the
    masked half of the scores (train/context.py), which the search's flash-style attention model would flatter."""
    if seq_len is None or seq_len < LONG_CONTEXT_TOKENS:
        return [1]
    return [c for c in _divisors(chips) if c == 1 or (c <= 16 and seq_len % (2 * c) == 0
                                                        and seq_len // (2 * c) >= 1024)]


def _repeat_choices(cfg: ModelConfig, pipeline: int, microbatches: int) -> list[int]:
    """Passes through the pipeline worth weighing (train.pipeline_repeats): GPipe, and circular schedules of 2, 4
    or 8 passes where the model and the micro-batches allow them (the trainer's own check)."""
    if pipeline == 1:
        return [1]
    return [r for r in (1, 2, 4, 8) if not pipeline_schedule_problem(cfg.num_layers, pipeline, r, microbatches)]


def candidate_layouts(cfg: ModelConfig, global_batch: int, chips: int, chip: ChipModel, remats=REMATS,
                      microbatches: int | None = None, zero1s=ZERO1, seq_len: int | None = None):
    """Every layout worth estimating under chipwise's tensor cap; pipelines need as many micro-batches as stages.
    With `seq_len`, context parallelism is weighed too."""
    max_tp = max_tensor_chips(chip)
    for pipeline in _divisors(chips):
        if pipeline > cfg.num_layers or pipeline > 64:  # uneven stages allowed (sharding.pipeline_stage_layers)
            continue
        for tensor in _divisors(chips // pipeline):
            if tensor > max_tp or cfg.num_heads % tensor:
                continue
            for context in _context_choices(chips // (pipeline * tensor), seq_len):
                for fsdp in _divisors(chips // (pipeline * tensor * context)):
                    data = chips // (pipeline * tensor * context * fsdp)
                    ranks = data * fsdp
                    if global_batch % ranks:
                        continue
                    per_rank = global_batch // ranks
                    for mb in _divisors(per_rank) if microbatches is None else [microbatches]:
                        if pipeline > 1 and mb < pipeline:
                            continue
                        for remat in remats:
                            for zero1 in _zero1_choices(data, zero1s):
                                for passes in _repeat_choices(cfg, pipeline, mb):
                                    yield Layout(data, fsdp, tensor, pipeline, mb, remat, zero1, context, passes)


def search(cfg: ModelConfig, seq_len: int, global_batch: int, chips: int, chip: ChipModel, keep: int = 5,
           fixed: Layout | None = None, remats=REMATS, microbatches: int | None = None, zero1s=ZERO1,
           **precision) -> SearchResult:
    """The fastest fitting layout. With `fixed`, only that mesh (tensor and pipeline caps not applied).

    `zero1s` are the ZeRO-1 settings to weigh ((True,) or (False,) pins it); `precision` is passed to
    perf.estimate (param_dtype, moments_dtype, loss_chunk_tokens).
    """
    result = SearchResult(best=None, considered=0)
    fitting: list[StepEstimate] = []
    layouts = candidate_layouts(cfg, global_batch, chips, chip, remats, microbatches, zero1s, seq_len)
    if fixed is not None:
        layouts = (Layout(fixed.data, fixed.fsdp, fixed.tensor, fixed.pipeline, mb, r, zero1, fixed.context, passes)
                   for mb in ([microbatches] if microbatches else
                              _divisors(max(1, global_batch // (fixed.data * fixed.fsdp))))
                   for r in remats for zero1 in _zero1_choices(fixed.data, zero1s)
                   for passes in _repeat_choices(cfg, fixed.pipeline, mb))
    for layout in layouts:
        if check_layout(cfg, global_batch, layout, seq_len):
            continue
        est = estimate(cfg, seq_len, global_batch, chip, layout, **precision)
        result.considered += 1
        if result.least_memory is None or est.memory.total < result.least_memory.memory.total:
            result.least_memory = est
        if not est.fits:
            result.rejected["does not fit in memory"] += 1
            continue
        fitting.append(est)
    if not result.considered:
        if fixed is not None:
            why = check_layout(cfg, global_batch, fixed, seq_len) or "no valid micro-batching"
            raise ConfigError(f"mesh {fixed.mesh_text()}: {why}; pick another mesh")
        raise ConfigError(f"no layout of {chips} chips can split a global batch of {global_batch} sequences and "
                          f"{cfg.num_heads} heads; use a global batch divisible by the chip count")
    fitting.sort(key=lambda e: e.step_time_s)
    if fitting:
        result.best = fitting[0]
        for est in fitting[1:]:
            why = "communication-bound" if est.comm_bound else "slower"
            result.rejected[why] += 1
        seen = {result.best.layout.mesh_text()}
        for est in fitting[1:]:  # the best other mesh shapes, to show what was weighed
            if est.layout.mesh_text() in seen:
                continue
            seen.add(est.layout.mesh_text())
            why = "communication-bound" if est.comm_bound else "slower"
            result.runners_up.append((est, f"{why}: {est.step_time_s / result.best.step_time_s:.2f}x the step time"))
            if len(result.runners_up) >= keep:
                break
    return result
