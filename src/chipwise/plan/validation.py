"""The planner against published pre-training runs (published_runs.yaml): the tables docs/planner.md carries, from
the fit and its leave-one-out predictions (plan/fit.py). `python -m chipwise.plan.validation` prints them; a test
checks the docs hold exactly this output."""

from __future__ import annotations

import math
import statistics

from chipwise.plan import assumptions as A
from chipwise.plan.fit import Result, validate


def _pct(x: float) -> str:
    return f"{x:+.0%}"


def summary(result: Result) -> dict:
    cases = result.cases
    return {"cases": len(cases),
            "before": statistics.median(abs(c.before_error) for c in cases),
            "fitted": statistics.median(abs(c.fitted / c.run.published - 1) for c in cases),
            "loo": statistics.median(abs(c.loo_error) for c in cases),
            "in_range": sum(c.in_range for c in cases)}


def efficiency_table(result: Result) -> str:
    """What each stack reaches, the collectives per platform, and the ranges."""
    f, counts = result.fit, {}
    for c in result.cases:
        counts[c.run.group] = counts.get(c.run.group, 0) + 1
    rows = ["| platform / stack | runs | share of peak on GEMMs | attention | collectives: achieved / modelled time | "
            "80% range |", "|---|---:|---:|---:|---:|---|"]
    for group, eff in sorted(f.stacks.items()):
        platform = group.split("/")[0]
        w = result.ranges[platform]["half_width"]
        attention = eff * A.PLATFORMS[platform].attention_to_matmul
        rows.append(f"| {group} | {counts[group]} | {eff:.3f} | {attention:.3f} | "
                    f"{f.collective[platform]:.3f} | x{math.exp(-w):.2f} - x{math.exp(w):.2f} |")
    w = result.ranges["all"]["half_width"]
    rows.append(f"| all runs (the \"at vendor peak\" view; a platform with no run) | {len(result.cases)} | "
                f"{f.common:.3f} | | 1 (no run) | x{math.exp(-w):.2f} - x{math.exp(w):.2f} |")
    return "\n".join(rows)


def markdown_table(result: Result) -> str:
    """Every run: published, the unfitted model's prediction, the leave-one-out one, its range and error."""
    rows = ["| case | run | stack | layout (chips) | published tok/s/chip | before | leave-one-out predicted | "
            "80% range | error before | error (LOO) |", "|---|---|---|---|---:|---:|---:|---|---:|---:|"]
    for c in result.cases:
        lo, hi = c.loo * math.exp(-c.half_width), c.loo * math.exp(c.half_width)
        mark = "" if c.in_range else " (outside)"
        rows.append(f"| {c.run.id} | {c.run.name} | {c.run.group} | {c.run.layout.describe()} | "
                    f"{c.run.published:,.0f} | "
                    f"{c.before:,.0f} | {c.loo:,.0f} | {lo:,.0f}-{hi:,.0f}{mark} | {_pct(c.before_error)} | "
                    f"{_pct(c.loo_error)} |")
    s = summary(result)
    rows.append(f"\nMedian absolute error over {s['cases']} runs: {s['before']:.1%} before the fit (every platform at "
                f"{A.UNFITTED_MATMUL_EFFICIENCY} of peak), {s['loo']:.1%} leave-one-out ({s['fitted']:.1%} in "
                f"sample). {s['in_range']} of {s['cases']} published figures lie inside their "
                f"{A.RANGE_COVERAGE:.0%} range (each range from the other runs' leave-one-out errors).")
    return "\n".join(rows)


def platform_table(result: Result) -> str:
    """The errors per platform: where the fit helps, and how often each platform's ranges hold."""
    rows = [f"| platform | runs | median error before | median error (LOO) | "
            f"inside their {A.RANGE_COVERAGE:.0%} range |",
            "|---|---:|---:|---:|---:|"]
    for platform in sorted({c.run.platform for c in result.cases}):
        mine = [c for c in result.cases if c.run.platform == platform]
        rows.append(f"| {platform} | {len(mine)} | {statistics.median(abs(c.before_error) for c in mine):.0%} | "
                    f"{statistics.median(abs(c.loo_error) for c in mine):.0%} | {sum(c.in_range for c in mine)} |")
    return "\n".join(rows)


def tables() -> str:
    result = validate()
    return "\n\n".join((efficiency_table(result), markdown_table(result), platform_table(result)))


if __name__ == "__main__":  # python -m chipwise.plan.validation: the tables for docs/planner.md
    print(tables())
