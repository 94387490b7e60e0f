"""The report's figures, drawn with matplotlib's Agg backend (no display needed). Every run shares the axes,
except a throughput far below the others' (see SHARED_PANEL_RATIO).

Each function saves one PNG into `out` and returns its file name, or returns a sentence saying why there is
nothing to draw (e.g. a CPU backend reports no device memory).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from chipwise.report.runs import Run  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=100, bbox_inches="tight")  # legends placed outside the axes stay in
    plt.close(fig)
    return name


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def loss(runs: list[Run], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        train, val = run.train(), run.val()
        ax.plot([r["step"] * run.tokens_per_step for r in train], [r["loss"] for r in train], color=_color(i),
                label=f"{run.name} train")
        ax.plot([r["step"] * run.tokens_per_step for r in val], [r["val_loss"] for r in val], color=_color(i),
                linestyle="--", marker="o", label=f"{run.name} validation")
    ax.set(xlabel="tokens", ylabel="loss (nats per token)", title="Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "loss.png")


# Runs on different hardware can be 100x apart (65 tokens/s on a laptop CPU, 8,000 on an accelerator). On one
# linear axis the slow run is a flat line at zero; a log axis would lift it, but would also shrink every run's
# dips and stalls to a few pixels. So runs within 10x of each other share a panel, where their curves compare
# directly, and a run 10x slower than those gets a panel of its own, linear from zero like the rest (the summary
# table gives every run's tokens/s side by side).
SHARED_PANEL_RATIO = 10


def _panel_groups(levels: list[float | None]) -> list[list[int]]:
    """Run indices by panel, fastest panel first: in each, the fastest run is at most SHARED_PANEL_RATIO x the
    slowest. Runs with nothing to draw (level None) join the first panel rather than get an empty one."""
    groups: list[list[int]] = []
    for i in sorted((i for i, level in enumerate(levels) if level), key=lambda i: -levels[i]):
        if groups and levels[i] * SHARED_PANEL_RATIO >= levels[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    idle = [i for i, level in enumerate(levels) if not level]
    groups = groups or [[]]
    groups[0] += idle
    return [sorted(g) for g in groups]  # within a panel, the order the runs were given in


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v and v > 0)
    return values[len(values) // 2] if values else None


def throughput_figure(runs: list[Run]):
    """The throughput panels (see SHARED_PANEL_RATIO) above one MFU panel, all sharing the x-axis."""
    trains = [run.train() for run in runs]
    # .get: a log line of a run that diverged can lack a figure (None), and its point is simply not drawn
    groups = _panel_groups([_median([r.get("tokens_per_s") for r in train]) for train in trains])
    fig, axes = plt.subplots(len(groups) + 1, 1, figsize=(8, 3 * (len(groups) + 1)), sharex=True, squeeze=False)
    panels, bottom = list(axes[:-1, 0]), axes[-1, 0]
    by_time = all(run.elapsed_minutes(train) is not None for run, train in zip(runs, trains))
    xs = [run.elapsed_minutes(train) if by_time else [r["step"] for r in train] for run, train in zip(runs, trains)]
    for panel, group in zip(panels, groups):
        for i in group:
            panel.plot(xs[i], [r.get("tokens_per_s") for r in trains[i]], color=_color(i), marker=".",
                       label=runs[i].name)
        panel.set(ylabel="tokens/s (all devices)")
    # MFU is a fraction of each run's own hardware peak, so one axis compares every run fairly: a run near zero
    # here really is using little of its devices.
    for i, run in enumerate(runs):
        mfu = [(xi, r["mfu"] * 100) for xi, r in zip(xs[i], trains[i]) if r.get("mfu") is not None]
        bottom.plot([p[0] for p in mfu], [p[1] for p in mfu], color=_color(i), marker=".", label=run.name)
    panels[0].set(title="Throughput and model FLOPs utilisation")
    bottom.set(ylabel="MFU (%)", xlabel="wall-clock minutes since the run began" if by_time else "step")
    for ax in (*panels, bottom):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return fig


def throughput(runs: list[Run], out: Path) -> str:
    return _save(throughput_figure(runs), out, "throughput.png")


def step_time(runs: list[Run], out: Path) -> str:
    parts = ("compute", "data wait", "checkpoint", "evaluation")
    rows = [(run.name, run.step_breakdown()) for run in runs]
    rows = [(name, b) for name, b in rows if b is not None]
    if not rows:
        return "no step times recorded yet"
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(rows)))
    left = [0.0] * len(rows)
    for j, part in enumerate(parts):
        ms = [b[part] * 1e3 for _, b in rows]
        ax.barh([name for name, _ in rows], ms, left=left, color=_color(j), label=part)
        left = [a + b for a, b in zip(left, ms)]
    ax.set(xlabel="milliseconds per training step (checkpoint and evaluation spread over all steps)",
           title="Where each step's time goes")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return _save(fig, out, "step_time.png")


def memory(runs: list[Run], out: Path) -> str:
    series = [(i, run, [r for r in run.train() if r.get("peak_memory_bytes")]) for i, run in enumerate(runs)]
    series = [s for s in series if s[2]]
    if not series:
        return "no device memory figures: the backend of these runs does not report them (CPUs do not)"
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, run, recs in series:
        ax.plot([r["step"] for r in recs], [r["peak_memory_bytes"] / 2**30 for r in recs], color=_color(i),
                marker=".", label=run.name)
    ax.set(xlabel="step", ylabel="GiB (largest device)", title="Peak device memory")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _save(fig, out, "memory.png")


def cost(runs: list[Run], out: Path) -> str:
    """Dollars and kWh accumulated over busy time (steps, evaluation, checkpoints), against tokens."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for i, run in enumerate(runs):
        chips = run.info.get("chips")
        price, watts = run.info.get("price_per_chip_hour"), run.info.get("power_watts_per_chip")
        busy = run.busy_seconds()
        tokens = [step * run.tokens_per_step for step, _ in busy]
        hours = [seconds / 3600 for _, seconds in busy]
        if chips and price:
            left.plot(tokens, [h * price * chips for h in hours], color=_color(i), label=run.name)
            drawn = True
        if chips and watts:
            right.plot(tokens, [h * watts * chips / 1000 for h in hours], color=_color(i), label=run.name)
            drawn = True
        elif chips and run.info.get("power_watts_range"):  # the catalog gives this chip's power as a range
            low, high = run.info["power_watts_range"]
            kwh = [[h * w * chips / 1000 for h in hours] for w in (low, high)]
            right.fill_between(tokens, *kwh, color=_color(i), alpha=0.3, label=f"{run.name} ({low:g}-{high:g} W)")
            drawn = True
    if not drawn:
        plt.close(fig)
        return ("no price or power known for these devices: set hardware.price_per_hour and "
                "hardware.power_watts to see dollars and kWh")
    left.set(xlabel="tokens", ylabel="USD", title="Dollars accumulated")
    right.set(xlabel="tokens", ylabel="kWh (at rated power)", title="Energy accumulated")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, out, "cost.png")


FILES = ("loss.png", "throughput.png", "step_time.png", "memory.png", "cost.png")
CHARTS = (("Loss", loss), ("Throughput and MFU", throughput), ("Step-time breakdown", step_time),
          ("Memory", memory), ("Dollars and energy", cost))
