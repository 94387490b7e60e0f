"""Human-readable views of a run: the end-of-run summary table here, the HTML report in html.py (`chipwise report`)."""

from __future__ import annotations

from rich.table import Table

from chipwise.catalog.power import format_range


def _fmt(value, fmt: str, unknown: str = "unknown") -> str:
    return unknown if value is None else format(value, fmt)


def summary_table(s: dict) -> Table:
    table = Table(title="chipwise run summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    if s.get("stopped"):
        table.add_row("stopped", s["stopped"])
    runs = s.get("invocations") or 1
    table.add_row("tokens", f"{s['tokens']:,}" + (f" (the whole run: {runs} invocations)" if runs > 1 else ""))
    table.add_row("wall time", f"{s['wall_time_s']:.1f} s (compile {s['compile_time_s']:.1f} s before it, "
                               f"data wait {s['data_wait_s']:.1f} s, eval {s['eval_time_s']:.1f} s, "
                               f"checkpoints {s['checkpoint_time_s']:.1f} s)")
    table.add_row("loss", f"train {_fmt(s['final_train_loss'], '.4f')}, validation "
                          f"{_fmt(s['first_val_loss'], '.4f')} -> {_fmt(s['final_val_loss'], '.4f')}")
    table.add_row("throughput (measured)", f"{_fmt(s['tokens_per_s'], ',.0f')} tokens/s, "
                                           f"{_fmt(s['tokens_per_s_per_device'], ',.0f')} per device")
    table.add_row("model FLOP/s (measured)", f"{_fmt(s['tflops_per_device'] and s['tflops_per_device'] * 1e3, ',.1f')}"
                                             " GFLOP/s per device")
    mfu = _fmt(s["mfu"] and s["mfu"] * 100, ".1f", "unknown")
    table.add_row("MFU", f"{mfu}{'%' if s['mfu'] is not None else ''}  ({s['mfu_basis']})")
    cost = s["usd_per_million_tokens"]
    table.add_row("cost", f"${cost:.4g} per million tokens (price from {s['price_source']})" if cost is not None
                  else "unknown: set hardware.price_per_hour (USD per chip-hour) to price this run")
    energy, span = s["kwh_per_million_tokens"], s.get("kwh_per_million_tokens_range")
    if energy is not None:
        energy_text = f"{energy:.4g} kWh per million tokens (power from {s['power_source']})"
    elif span:  # the catalog publishes the chip's power only as a range: so is the energy
        energy_text = f"{format_range(*span, '.4g')} kWh per million tokens (power from {s['power_source']})"
    else:
        energy_text = "unknown: set hardware.power_watts (per chip) to estimate energy"
    table.add_row("energy (modelled at rated power)", energy_text)
    if s.get("peak_memory_bytes"):
        table.add_row("peak memory", f"{s['peak_memory_bytes'] / 2**30:.2f} GiB per device")
    return table
