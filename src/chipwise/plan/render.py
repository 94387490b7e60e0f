"""How a plan is shown: a ranked table (rich), JSON, and a time-against-cost chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chipwise.catalog.power import format_range
from chipwise.errors import ConfigError
from chipwise.flops import CONVENTION
from chipwise.plan import achieved
from chipwise.plan import assumptions as A
from chipwise.plan.planner import PlanRequest, PlanRow
from chipwise.plan.search import trainer_tensor_cap
from chipwise.sharding import pipeline_stage_layers


RANGE = f"{A.RANGE_COVERAGE:.0%}"


def _fmt(value, spec: str, unknown: str = "n/a") -> str:
    if value is None:
        return unknown
    return format(value, spec)


def _money(value) -> str:
    if value is None:
        return "n/a"
    return f"${value / 1e6:,.2f}M" if value >= 1e6 else f"${value:,.0f}"


def short_mesh(mesh: str) -> str:
    """data=1,fsdp=512,tensor=2,pipeline=1 -> fsdp512 tp2 (axes of size 1 left out)."""
    names = {"data": "dp", "fsdp": "fsdp", "context": "cp", "tensor": "tp", "pipeline": "pp"}
    parts = [f"{names[k]}{v}" for k, v in (p.split("=") for p in mesh.split(",")) if v != "1"]
    return " ".join(parts) or "1 chip"


def rows_as_dicts(rows: list[PlanRow], baseline: str | None) -> list[dict]:
    base = next((r for r in rows if r.accelerator.id == baseline), None)
    return [r.as_dict(base) for r in rows]


def _finite(value):
    """`value` with every non-finite float made null: JSON has no Infinity or NaN, and a consumer's strict parser
    (jq, JavaScript, Go) rejects the whole document over one. A figure that overflowed is unknown, as null says."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(rows: list[PlanRow], baseline: str | None, aot: dict | None = None) -> str:
    """One object per accelerator; `aot` adds each TPU's ahead-of-time check under "aot". Strict JSON."""
    data = rows_as_dicts(rows, baseline)
    for row in data:
        if aot and row["accelerator"] in aot:
            row["aot"] = aot[row["accelerator"]]
    return json.dumps(_finite(data), indent=1, allow_nan=False)


def print_table(rows: list[PlanRow], req: PlanRequest, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = 150  # piped or captured: do not fold the table into 80 columns
    data = rows_as_dicts(rows, req.baseline)
    m = req.model
    title = (f"chipwise plan (modelled): {m.num_layers} layers x d_model {m.d_model}, {req.chips} chips, "
             f"seq {req.seq_len}, global batch {req.global_batch} sequences; fastest first")
    perf = Table(title=title, title_justify="left")
    for c in ("#", "accelerator", "chips", "mesh", "mb", "remat", "step s", "tok/s/chip", f"{RANGE} range",
              "TFLOP/s/chip", "MFU", "GiB/chip", "fits"):
        perf.add_column(c, justify="left" if c in ("accelerator", "mesh", "remat") else "right", no_wrap=True)
    for i, r in enumerate(data, 1):
        fits = "yes" if r["fits"] else f"NO (> {r['usable_memory_per_chip_gib']:.0f})"
        passes = f" x{r['pipeline_repeats']} passes" if r["pipeline_repeats"] > 1 else ""
        mesh = short_mesh(r["mesh"]) + passes + (" zero1" if r["shard_optimizer"] else "")
        perf.add_row(str(i), r["accelerator"], str(r["chips"]), mesh, str(r["microbatches"]),
                     r["remat"], f"{r['step_time_s']:.3g}", f"{r['tokens_per_s_per_chip']:,.0f}",
                     format_range(r["tokens_per_s_per_chip_low"], r["tokens_per_s_per_chip_high"], ",.0f"),
                     f"{r['model_tflops_per_chip']:.3g}", f"{r['mfu']:.1%}", f"{r['memory_per_chip_gib']:.1f}", fits)
    console.print(perf)
    print_views(data, console)
    if req.tokens or req.baseline:
        what = f"{req.tokens:.3g} tokens" if req.tokens else "per hour of training"
        cost = Table(title=f"Cost and energy, {what}" + (f"; efficiency relative to {req.baseline}"
                                                          if req.baseline else ""), title_justify="left")
        cols = ["#", "accelerator"]
        if req.tokens:
            cols += ["days", "chip-hours", "cost", "MWh", "Mtok/$", "Mtok/kWh"]
        if req.baseline:
            cols += ["tok/$ vs base", "tok/kWh vs base"]
        for c in cols:
            cost.add_column(c, justify="left" if c == "accelerator" else "right", no_wrap=True)
        for i, r in enumerate(data, 1):
            cells = [str(i), r["accelerator"]]
            if req.tokens:
                cells += [_ranged(r, "time_to_train_h", 1 / 24, ".1f"), _fmt(r["chip_hours"], ",.0f"),
                          _money(r["cost_usd"]) + (f" ({_money(r['cost_usd_low'])}-{_money(r['cost_usd_high'])})"
                                                   if r["cost_usd"] else ""),
                          _span(r["energy_kwh_range"], 1e-3, ",.0f") + (
                              f" ({_span((r['energy_kwh_low'], r['energy_kwh_high']), 1e-3, ',.0f')})"
                              if r["energy_kwh_low"] else ""),
                          _fmt(r["tokens_per_usd"] and r["tokens_per_usd"] / 1e6, ".2f"),
                          _span(r["tokens_per_kwh_range"], 1e-6, ".2f")]
            if req.baseline:
                cells += [_ratio(r["tokens_per_usd_vs_baseline"]),
                          _span(r["tokens_per_kwh_vs_baseline_range"], 1, ".2f", "x")]
            cost.add_row(*cells)
        console.print(cost)
    console.print(f"All figures are MODELLED, not measured. Each chip at the share of its peak its platform's "
                  f"software stack reached in published runs; in brackets the {RANGE} range, from how far the model "
                  "missed that platform's published runs when each was left out of the fit (docs/planner.md). "
                  f"MFU = model FLOPs ({CONVENTION}) / the chip's peak "
                  "(below: the catalog's dense bf16 peak, or one measured by `chipwise bench`). "
                  "Energy at the chip's rated power; cost at the catalog's on-demand price unless overridden; "
                  "n/a = not published (set it with --catalog-set ID.FIELD=VALUE).")
    if any(power_notes(r.accelerator) for r in rows):
        console.print("Energy from an estimated power is marked below; where the catalog's power is a range (no one "
                      "figure is published), energy is the range, low-high.")
    for r in rows:
        notes = [f"peak {r.chip.peak_tflops:g} TFLOP/s ({r.chip.source})", efficiency_note(r.chip),
                 f"{r.search.considered} layouts weighed"]
        notes += power_notes(r.accelerator)
        if r.search.rejected:
            notes.append("rejected: " + ", ".join(f"{n} {why}" for why, n in r.search.rejected.most_common()))
        if r.search.runners_up:
            alt, why = r.search.runners_up[0]
            notes.append(f"next best {alt.layout.describe()} ({why})")
        cap = trainer_tensor_cap(r.chip)
        if cap is not None and r.estimate.layout.tensor > cap:
            notes.append(f"tensor={r.estimate.layout.tensor} chips exceeds chipwise's trainer rule for "
                         f"{r.accelerator.platform} ({cap} chip): the trainer would refuse this mesh")
        if r.estimate.layout.shard_optimizer:
            notes.append("zero1: AdamW's moments split over data too (train.shard_optimizer=true)")
        lay = r.estimate.layout
        if lay.pipeline > 1:
            counts = pipeline_stage_layers(req.model.num_layers, lay.pipeline * lay.repeats)
            kind = f"circular, {lay.repeats} passes" if lay.repeats > 1 else "GPipe"
            ticks = lay.repeats * lay.microbatches + lay.pipeline - 1
            notes.append(f"pipeline={lay.pipeline}: {kind} over {lay.microbatches} micro-batches (bubble "
                         f"{(lay.pipeline - 1) / ticks:.0%} of the layers' ticks), layers per group "
                         f"{_runs(counts)}")
        if r.estimate.layout.context > 1:
            notes.append(f"context={r.estimate.layout.context}: modelled with a flash-style attention; chipwise's "
                         "trainer's context-parallel attention is blockwise XLA (a block of queries at a time, "
                         "recomputed backward) and also computes the masked half of the scores")
        console.print(f"  {r.accelerator.id}: " + "; ".join(notes))


def print_views(data: list[dict], console: Console) -> None:
    """The "at vendor peak" view beside the "as achieved" one: how much of each chip's advertised advantage survives
    what its software stack reaches (docs/planner.md, Achieved efficiency)."""
    if not data or all(r["calibrated"] for r in data):  # a measured chip has one view: what it measured
        return
    first = data[0]
    table = Table(title=f"At vendor peak (every chip at the share of peak common to all published runs, "
                        f"{achieved.fitted()['common_efficiency']:.2f}) and as achieved (its platform's stack's "
                        f"share; a calibrated chip's measured); ratios against {first['accelerator']}",
                  title_justify="left")
    for c in ("#", "accelerator", "peak TFLOP/s", "stack", "share of peak", "tok/s/chip at peak view",
              "as achieved", "survives", "vs #1 at peak", "vs #1 achieved"):
        table.add_column(c, justify="left" if c in ("accelerator", "stack") else "right", no_wrap=True)
    for i, r in enumerate(data, 1):
        peak, got = r["at_vendor_peak"]["tokens_per_s_per_chip"], r["tokens_per_s_per_chip"]
        share = r["achieved_efficiency"]["matmul_share_of_peak"]
        table.add_row(str(i), r["accelerator"], f"{r['peak_tflops_per_chip']:,.4g}", r["stack"],
                      f"{share:.2f}" + (" measured" if r["calibrated"] else ""), f"{peak:,.0f}", f"{got:,.0f}",
                      f"{got / peak:.0%}", f"{peak / first['at_vendor_peak']['tokens_per_s_per_chip']:.2f}x",
                      f"{got / first['tokens_per_s_per_chip']:.2f}x")
    console.print(table)


def efficiency_note(chip) -> str:
    w = chip.range_half_width
    spread = f", {RANGE} range x{math.exp(-w):.2f}-x{math.exp(w):.2f}" if w else ", no range known"
    return f"GEMMs at {chip.matmul_efficiency:.2f} of peak ({chip.efficiency_basis}{spread})"


def _ranged(row: dict, key: str, scale: float, spec: str) -> str:
    """A figure with its range in brackets, e.g. days 21.8 (18.9-25.1)."""
    value, low, high = row[key], row.get(f"{key}_low"), row.get(f"{key}_high")
    text = _fmt(value and value * scale, spec)
    return text if low is None else f"{text} ({format_range(low * scale, high * scale, spec)})"


def _runs(counts) -> str:
    """(7, 8, 8, 8, 7) -> "7, 8 x3, 7"."""
    import itertools

    runs = [(k, len(list(g))) for k, g in itertools.groupby(counts)]
    return ", ".join(f"{k}" if n == 1 else f"{k} x{n}" for k, n in runs)


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _span(pair, scale: float, spec: str, suffix: str = "") -> str:
    """A (low, high) figure as one number where the ends agree, else low-high; n/a where there is none."""
    return "n/a" if pair is None else format_range(pair[0] * scale, pair[1] * scale, spec) + suffix


def power_notes(acc) -> list[str]:
    """What a row's energy rests on, where that is not a vendor's or a measured point figure."""
    watts = acc.power_range()
    if watts is None:
        return [f"power unknown: {acc.power_unknown}"]
    return [] if watts.is_point and watts.basis in ("official", "measured") else [f"power {watts.describe()}"]


def write_chart(rows: list[PlanRow], path: str, tokens: float | None) -> Path:
    """Time to train against cost, one point per accelerator (needs --tokens and known prices)."""
    if not tokens:
        raise ConfigError("--chart needs --tokens (the chart is time to train against cost)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    plotted = 0
    for r in rows:
        cost = r.training_cost()
        if cost["cost_usd"] is None:
            continue
        x, y = cost["time_to_train_h"] / 24, cost["cost_usd"] / 1e6
        ax.scatter([x], [y], s=60, marker="o" if r.fits else "x")
        ax.annotate(f"{r.accelerator.id}" + ("" if r.fits else " (does not fit)"), (x, y),
                    textcoords="offset points", xytext=(6, 4))
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise ConfigError("--chart: none of the accelerators has a price; "
                          "set one with --catalog-set ID.price_per_chip_hour=USD")
    ax.set_xlabel("time to train (days)")
    ax.set_ylabel("cost (million USD)")
    ax.set_title(f"{tokens:.3g} tokens on {rows[0].estimate.layout.chips} chips (modelled)")
    ax.grid(alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
