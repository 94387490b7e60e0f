"""How a serving plan is shown: a ranked table (rich) and JSON, one object per accelerator."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from chipwise.catalog.power import format_range
from chipwise.plan import assumptions as A
from chipwise.plan.render import _finite
from chipwise.plan.serving import ServeEstimate, ServeRequest


def serving_json(rows: list[ServeEstimate]) -> str:
    """One object per accelerator; strict JSON (a non-finite figure becomes null)."""
    return json.dumps(_finite([r.as_dict() for r in rows]), indent=1, allow_nan=False)


def _money(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.2f}"


def print_serving_table(rows: list[ServeEstimate], req: ServeRequest, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = 160  # piped or captured: do not fold the table
    m = req.model
    how = (f"batch {req.batch}" if req.batch else f"concurrency {req.concurrency}" if req.concurrency
           else "the most concurrency meeting the target")
    target = f", TPOT target {req.max_tpot_s * 1e3:g} ms" if req.max_tpot_s else ""
    title = (f"chipwise plan --serve (modelled): {m.num_layers} layers x d_model {m.d_model}, {req.weights_dtype} "
             f"weights, {req.chips} chips, {req.input_len} in / {req.output_len} out, {how}{target}; "
             "most output tokens/s per chip first")
    table = Table(title=title, title_justify="left")
    for c in ("#", "accelerator", "TP", "seqs", "TTFT ms", "TPOT ms", "out tok/s", "tok/s/chip", "max batch",
              "GiB/chip", "fits", "$/M out tok", "kWh/M out tok"):
        table.add_column(c, justify="left" if c == "accelerator" else "right", no_wrap=True)
    for i, r in enumerate(rows, 1):
        kwh = r.kwh_per_million_output_tokens()
        fits = "yes" if r.fits else f"NO (> {r.usable_gib:.0f})"
        if r.meets_target is False:
            fits += ", misses target"
        table.add_row(str(i), r.accelerator.id, str(r.tensor), str(r.sequences), f"{r.ttft_s * 1e3:,.1f}",
                      f"{r.tpot_s * 1e3:.2f}", f"{r.output_tokens_per_s:,.0f}",
                      f"{r.output_tokens_per_s / r.chips:,.0f}", f"{r.max_batch:,}", f"{r.memory_per_chip_gib:.1f}",
                      fits, _money(r.usd_per_million_output_tokens()),
                      format_range(*(kwh or (None, None)), ".3g"))
    console.print(table)
    console.print("All figures are MODELLED, not measured: decode bound by memory bandwidth and per-layer all-reduce "
                  "latency, prefill by compute (plan/assumptions.py SERVING). Cost at the catalog's price per "
                  "chip-hour; energy at the chip's power only (not the host), a range where the catalog's power is.")
    for r in rows:
        watts = r.accelerator.power_range()
        notes = [f"power {watts.describe()}" if watts else f"power unknown: {r.accelerator.power_unknown}"]
        if r.considered:
            notes.append("other TP: " + ", ".join(f"{t} ({why})" for t, why in r.considered))
        ms = {k: v * 1e3 for k, v in r.parts.items()}
        c = r.assumptions or A.SERVING[r.accelerator.platform]
        if c is not A.SERVING.get(r.accelerator.platform):
            notes.append("constants measured on this machine by `chipwise bench --serve`")
        memory = f"weights {ms['decode_weights_s']:.2f} + KV {ms['decode_kv_s']:.2f}"
        compute = f"compute {ms['decode_compute_s']:.2f}"
        step = f"max({memory}, {compute})" if c.overlap else f"{memory} + {compute}"
        extra = f" + overhead {c.decode_step_overhead_s * 1e3:.2f}" if c.decode_step_overhead_s else ""
        notes.append(f"decode step {ms['decode_step_s']:.2f} ms = {step} + all-reduces "
                     f"{ms['decode_comm_s']:.2f}{extra}")
        console.print(f"  {r.accelerator.id}: " + "; ".join(notes))
