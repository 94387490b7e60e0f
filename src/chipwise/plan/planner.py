"""`chipwise plan`: for each accelerator, the best layout and what the run will take, cost and burn.

Everything here is modelled, not measured; each row carries the FLOPs convention and the peak it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chipwise import catalog
from chipwise.config import ModelConfig
from chipwise.errors import ConfigError
from chipwise.flops import CONVENTION
from chipwise.plan import achieved
from chipwise.plan import assumptions as A
from chipwise.plan.calibration import find_profile
from chipwise.plan.perf import ChipModel, Layout, StepEstimate, chip_model, estimate
from chipwise.plan.search import REMATS, ZERO1, SearchResult, search


@dataclass
class PlanRequest:
    model: ModelConfig
    accelerators: list[str]
    chips: int
    seq_len: int
    global_batch: int
    tokens: float | None = None
    mesh: Layout | None = None  # pins the mesh; micro-batches and remat are still searched unless given
    remat: str | None = None
    microbatches: int | None = None
    baseline: str | None = None
    catalog_overrides: dict | None = None
    calibration_dir: str | None = None
    shard_optimizer: bool | None = None  # ZeRO-1 pinned on or off; None: searched (where data > 1)
    param_dtype: str = "float32"  # train.param_dtype the run will use
    moments_dtype: str = "float32"  # train.moments_dtype
    loss_chunk_tokens: int = 0  # train.loss_chunk_tokens (0: the trainer's default for the vocabulary)
    stacks: dict[str, str] | None = None  # platform -> software stack to plan with (default: chipwise's trainer's)


@dataclass
class PlanRow:
    accelerator: catalog.Accelerator
    chip: ChipModel
    search: SearchResult
    estimate: StepEstimate  # the best fitting layout, or the smallest-memory one when nothing fits
    fits: bool
    tokens: float | None
    peak: StepEstimate | None = None  # the same layout with the chip at the share of peak common to all runs
    peak_chip: ChipModel | None = None

    def band(self, value: float) -> tuple[float, float]:
        """(low, high) of a figure proportional to throughput: its range from the chip's range half-width."""
        w = self.chip.range_half_width
        return value * math.exp(-w), value * math.exp(w)

    def as_dict(self, baseline: "PlanRow | None" = None) -> dict:
        e, acc, watts = self.estimate, self.accelerator, self.accelerator.power_range()
        tok_low, tok_high = self.band(e.tokens_per_s_per_chip)
        row = {
            "accelerator": acc.id,
            "chips": e.layout.chips,
            "mesh": e.layout.mesh_text(),
            "context_parallel": e.layout.context,
            "microbatches": e.layout.microbatches,
            "pipeline_repeats": e.layout.repeats,
            "remat": e.layout.remat,
            "shard_optimizer": e.layout.shard_optimizer,
            "step_time_s": e.step_time_s,
            "step_time_s_low": e.step_time_s * e.tokens_per_s_per_chip / tok_high,
            "step_time_s_high": e.step_time_s * e.tokens_per_s_per_chip / tok_low,
            "tokens_per_s_per_chip": e.tokens_per_s_per_chip,
            "tokens_per_s_per_chip_low": tok_low,
            "tokens_per_s_per_chip_high": tok_high,
            "model_tflops_per_chip": e.model_tflops_per_chip,
            "mfu": e.mfu,
            "memory_per_chip_gib": e.memory_gib,
            "usable_memory_per_chip_gib": e.usable_gib,
            "fits": self.fits,
        }
        if self.tokens is not None:
            row.update(self.training_cost())
        if baseline is not None:
            row["baseline"] = baseline.accelerator.id
            row.update(self.relative_to(baseline))
        row.update(self.efficiency_dict())
        row.update({
            "modelled": True,
            "flops_convention": CONVENTION,
            "peak_tflops_per_chip": self.chip.peak_tflops,
            "peak_source": f"{self.chip.source}: dense bf16",
            "price_per_chip_hour": acc.price_per_chip_hour,
            "power_watts_per_chip": acc.power_watts,  # a point figure only: a range is in power_watts_range
            "power_watts_range": [watts.low, watts.high] if watts else None,
            "power_basis": watts.basis if watts else None,
            "step_time_parts_s": e.parts,
            "memory_parts_gib": e.memory.as_gib(),
            "layouts_considered": self.search.considered,
            "rejected": dict(self.search.rejected),
            "alternatives": [{"layout": alt.layout.describe(), "step_time_s": alt.step_time_s, "why_not": why}
                             for alt, why in self.search.runners_up],
        })
        return row

    def efficiency_dict(self) -> dict:
        """What the chip is planned at, where that comes from, and the same layout at the common share of peak."""
        c, peak = self.chip, self.peak
        out = {"stack": c.stack, "calibrated": c.source.startswith("calibrated"),
               "achieved_efficiency": {"matmul_share_of_peak": c.matmul_efficiency,
                                       "attention_share_of_peak": c.attention_efficiency,
                                       "collective_time_scale": c.collective_scale, "basis": c.efficiency_basis},
               "range_coverage": A.RANGE_COVERAGE, "range_half_width_log": c.range_half_width}
        if peak is not None:
            out["at_vendor_peak"] = {"matmul_share_of_peak": self.peak_chip.matmul_efficiency,
                                     "tokens_per_s_per_chip": peak.tokens_per_s_per_chip,
                                     "step_time_s": peak.step_time_s, "mfu": peak.mfu}
            out["achieved_vs_vendor_peak_view"] = self.estimate.tokens_per_s_per_chip / peak.tokens_per_s_per_chip
        return out

    def training_cost(self) -> dict:
        e, acc = self.estimate, self.accelerator
        hours = self.tokens / (e.tokens_per_s_per_chip * e.layout.chips) / 3600
        chip_hours = hours * e.layout.chips
        cost = chip_hours * acc.price_per_chip_hour if acc.price_per_chip_hour else None
        out = {
            "time_to_train_h": hours,
            "chip_hours": chip_hours,
            "cost_usd": cost,
            "tokens_per_usd": self.tokens / cost if cost else None,
            **_energy(acc, chip_hours, self.tokens),
        }
        # The range: time, chip-hours and cost scale inversely with throughput; energy also spans the power's range.
        slow, fast = (1 / x for x in self.band(1.0))
        out.update({"time_to_train_h_low": hours * fast, "time_to_train_h_high": hours * slow,
                    "cost_usd_low": cost * fast if cost else None, "cost_usd_high": cost * slow if cost else None})
        kwh = out["energy_kwh_range"]
        out.update({"energy_kwh_low": kwh[0] * fast if kwh else None,
                    "energy_kwh_high": kwh[1] * slow if kwh else None})
        return out

    def relative_to(self, base: "PlanRow") -> dict:
        """Efficiency against the baseline chip: tokens per dollar and per kWh, as ratios (1.5 = 50% better); a
        chip whose power is a range gets the ratio's range (low: its high power against the baseline's low)."""
        mine = self.training_cost() if self.tokens else self._per_hour_cost()
        theirs = base.training_cost() if base.tokens else base._per_hour_cost()
        out = {}
        for key in ("tokens_per_usd", "tokens_per_kwh"):
            a, b = mine.get(key), theirs.get(key)
            out[f"{key}_vs_baseline"] = a / b if a and b else None
        a, b = mine["tokens_per_kwh_range"], theirs["tokens_per_kwh_range"]
        out["tokens_per_kwh_vs_baseline_range"] = [a[0] / b[1], a[1] / b[0]] if a and b else None
        return out

    def _per_hour_cost(self) -> dict:  # the same ratios without a token budget: per chip-hour of training
        e, acc = self.estimate, self.accelerator
        tokens = e.tokens_per_s_per_chip * 3600
        return {"tokens_per_usd": tokens / acc.price_per_chip_hour if acc.price_per_chip_hour else None,
                **_energy(acc, 1.0, tokens)}


def _energy(acc: catalog.Accelerator, chip_hours: float, tokens: float) -> dict:
    """kWh over `chip_hours` and tokens per kWh: one figure where the chip's power is one figure, else null, and
    always the (low, high) range (equal ends for a point) where the catalog has any power."""
    watts = acc.power_range()
    if watts is None:
        return {"energy_kwh": None, "tokens_per_kwh": None, "energy_kwh_range": None, "tokens_per_kwh_range": None}
    low, high = watts.scale(chip_hours / 1000)
    return {"energy_kwh": low if watts.is_point else None, "tokens_per_kwh": tokens / low if watts.is_point else None,
            "energy_kwh_range": [low, high], "tokens_per_kwh_range": [tokens / high, tokens / low]}


def catalog_overrides(path: str | None, settings: list[str]) -> dict | None:
    """Overrides from a YAML file ({id: {field: value}}) and `ID.FIELD=VALUE` settings (which win)."""
    import yaml

    merged: dict = {}
    if path:
        try:
            loaded = yaml.safe_load(open(path))
        except OSError as e:
            raise ConfigError(f"cannot read catalog overrides {path}: {e.strerror or e}; check the path") from None
        except yaml.YAMLError:
            raise ConfigError(f"catalog overrides {path} is not valid YAML; fix the syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"catalog overrides {path} must map ids to fields, "
                              "e.g. h100-sxm: {price_per_chip_hour: 2.1}")
        merged = {k: dict(v) if isinstance(v, dict) else v for k, v in (loaded or {}).items()}
    for text in settings:
        key, sep, value = text.partition("=")
        acc_id, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--catalog-set {text!r}: write ID.FIELD=VALUE, e.g. h100-sxm.price_per_chip_hour=2.1")
        parsed = yaml.safe_load(value) if value.strip() else None
        entry = merged.setdefault(acc_id, {})
        section, dot, sub = field.partition(".")
        if dot:  # a field of a section (fabric.gbps_per_chip, libtpu_topology.dims): only it changes
            current = entry.get(section)
            entry[section] = {**(current if isinstance(current, dict) else {}), sub: parsed}
        else:
            entry[field] = parsed
    return merged or None


def plan(req: PlanRequest) -> list[PlanRow]:
    cat = catalog.load_catalog(req.catalog_overrides)
    ids = list(dict.fromkeys(req.accelerators + ([req.baseline] if req.baseline else [])))
    remats = (req.remat,) if req.remat else REMATS
    if req.remat and req.remat not in REMATS:
        raise ConfigError(f"--remat {req.remat!r} is not one of {', '.join(REMATS)}")
    check_stacks(req.stacks)
    rows = []
    for acc_id in ids:
        acc = catalog.get(acc_id, cat)
        if not acc.trains:
            alternatives = [a.id for a in cat.values() if a.trains and a.platform == acc.platform] or ["another chip"]
            raise ConfigError(f"{acc.id} ({acc.name}) is an inference chip (the catalog says trains: false); "
                              f"use {', '.join(alternatives)} for a training plan")
        profile, stack = find_profile(acc, req.calibration_dir), achieved.stack_for(acc.platform, req.stacks)
        chip = chip_model(acc, profile, "achieved", stack)
        precision = dict(param_dtype=req.param_dtype, moments_dtype=req.moments_dtype,
                         loss_chunk_tokens=req.loss_chunk_tokens)
        result = search(req.model, req.seq_len, req.global_batch, req.chips, chip, fixed=req.mesh, remats=remats,
                        microbatches=req.microbatches,
                        zero1s=ZERO1 if req.shard_optimizer is None else (req.shard_optimizer,), **precision)
        best = result.best or result.least_memory
        # The "at vendor peak" view: the same layout, the chip at the share of peak common to all published runs.
        peak_chip = chip_model(acc, profile, "peak", stack)
        peak = estimate(req.model, req.seq_len, req.global_batch, peak_chip, best.layout, **precision)
        rows.append(PlanRow(acc, chip, result, best, result.best is not None, req.tokens, peak, peak_chip))
    if not any(r.fits for r in rows):
        least = min(rows, key=lambda r: r.estimate.memory.total)
        raise ConfigError(
            f"the model fits on none of {', '.join(ids)} with {req.chips} chips: the leanest layout needs "
            f"{least.estimate.memory_gib:.1f} GiB per {least.accelerator.id} chip "
            f"(usable {least.estimate.usable_gib:.1f} GiB); use more chips or a smaller global batch")
    return rows


def rank(rows: list[PlanRow]) -> list[PlanRow]:
    """Fitting chips first, fastest training first (the same chip count for all, so step time ranks them)."""
    return sorted(rows, key=lambda r: (not r.fits, r.estimate.step_time_s))


def check_stacks(stacks: dict[str, str] | None) -> None:
    for platform, stack in (stacks or {}).items():
        if stack not in A.PLATFORM_STACKS.get(platform, ()):
            known = ", ".join(f"{p}={s}" for p, ss in A.PLATFORM_STACKS.items() for s in ss)
            raise ConfigError(f"--stack {platform}={stack}: no published runs of that platform and stack; use one "
                              f"of {known}")
