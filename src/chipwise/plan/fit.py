"""Fitting what each platform's software stack achieves, across the published runs (published_runs.yaml), with
leave-one-out validation. `python -m chipwise.plan.fit --write` writes achieved_efficiency.yaml, which the planner
reads (plan/achieved.py); a test checks that file is what this fit gives now.

Fitted, by least squares on log(predicted / published tokens per second per chip):
  - each stack's share of its chips' dense peak on a step's large GEMMs (attention runs at its platform's a-priori
    fraction of that share, assumptions.PLATFORMS), pulled toward its platform's share, and a platform's toward all
    runs', by PRIOR_CASES (so a stack or platform with few runs borrows from the rest);
  - per platform, the achieved/modelled time of collectives, pulled toward 1 (the a-priori model) by PRIOR_CASES: one
    factor pooled over all platforms went to its bound (collectives free), trading off against the Neuron share,
    which would make tensor parallelism free in the layout search (docs/planner.md);
  - the share common to all runs: the "at vendor peak" view, every chip at the same share of its peak.
No run has a constant of its own. Each run is then predicted by the same fit redone without it (leave-one-out); the
spread of those errors per platform gives every prediction its range (achieved.half_width).

The step-time model is evaluated on a coarse grid of (collective scale, share of peak) per run, interpolated in log
space onto a fine grid where the fits are exact minimisations; reported predictions are direct model outputs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from chipwise import catalog
from chipwise.config import ModelConfig
from chipwise.plan import achieved
from chipwise.plan import assumptions as A
from chipwise.plan.perf import Layout, StepEstimate, catalog_chip, estimate
from chipwise.plan.spec import load_model

COARSE = (9, 16)  # grid points of (collective scale, share of peak) the model is evaluated at, per run
FINE = (65, 241)  # ... and the interpolated grid the fits minimise over


@dataclass(frozen=True)
class Run:
    """One published run, ready to predict at any efficiency."""
    id: str
    name: str
    platform: str
    stack: str
    published: float  # tokens per second per chip
    source: str
    spec: dict
    model: ModelConfig
    accelerator: catalog.Accelerator  # with the run's hardware_overrides
    layout: Layout

    @property
    def group(self) -> str:
        return f"{self.platform}/{self.stack}"

    def predict(self, efficiency: float, collective_scale: float) -> StepEstimate:
        s = self.spec
        # A published pipeline ran its own stack's schedule (1F1B for Megatron, Meta and NxD), not chipwise's.
        return estimate(self.model, s["seq_len"], s["global_batch"],
                        catalog_chip(self.accelerator, efficiency, collective_scale), self.layout,
                        schedule=s.get("pipeline_schedule", "chipwise"))


def published_runs() -> list[dict]:
    return yaml.safe_load(resources.files("chipwise.plan").joinpath("published_runs.yaml").read_text())["runs"]


def load_runs() -> list[Run]:
    runs = []
    for s in published_runs():
        acc = catalog.get(s["accelerator"], catalog.load_catalog(s.get("hardware_overrides")))
        if s["stack"] not in A.PLATFORM_STACKS[acc.platform]:
            raise ValueError(f"{s['id']}: stack {s['stack']!r} is not one of {A.PLATFORM_STACKS[acc.platform]}")
        layout = Layout(**s["mesh"], microbatches=s.get("microbatches", 1), remat=s.get("remat", "none"),
                        shard_optimizer=s.get("zero1", False), repeats=s.get("pipeline_repeats", 1))
        runs.append(Run(s["id"], s["name"], acc.platform, s["stack"], s["published_tokens_per_s_per_chip"],
                        s["source"], s, load_model(s["model"]), acc, layout))
    return runs


def _axes(points: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Log collective scales and log shares of peak of a grid."""
    return (np.linspace(*np.log(A.COLLECTIVE_SCALE_RANGE), points[0]),
            np.linspace(*np.log(A.EFFICIENCY_RANGE), points[1]))


def _interpolate(coarse: np.ndarray) -> np.ndarray:
    """[run, coarse γ, coarse η] -> [run, fine γ, fine η], linear in log space along each axis."""
    (cg, ce), (fg, fe) = _axes(COARSE), _axes(FINE)
    along_e = np.apply_along_axis(lambda row: np.interp(fe, ce, row), 2, coarse)
    return np.apply_along_axis(lambda col: np.interp(fg, cg, col), 1, along_e)


@lru_cache(maxsize=1)
def residual_table() -> tuple[tuple[Run, ...], np.ndarray]:
    """Every run's log(predicted / published) on the fine grid: [run, γ, η]."""
    runs = tuple(load_runs())
    gammas, effs = (np.exp(a) for a in _axes(COARSE))
    coarse = np.array([[[math.log(run.predict(e, g).tokens_per_s_per_chip) for e in effs] for g in gammas]
                       for run in runs])
    return runs, _interpolate(coarse) - np.log([r.published for r in runs])[:, None, None]


@dataclass(frozen=True)
class Fit:
    common: float  # the share of peak fitted over all runs (each at its platform's collective scale)
    collective: dict[str, float]  # platform -> achieved / modelled time of collectives
    platforms: dict[str, float]  # platform -> share of peak
    stacks: dict[str, float]  # "platform/stack" -> share of peak

    def efficiency(self, run: Run) -> float:
        return self.stacks[run.group]

    def collective_scale(self, run: Run) -> float:
        return self.collective[run.platform]


def fit(runs: tuple[Run, ...], table: np.ndarray, keep: np.ndarray) -> Fit:
    """The fit on the runs where `keep` is true. Per platform, jointly: its collective scale (pulled toward 1, the
    a-priori collective model) and its stacks' shares of peak (pulled toward the platform's, and the platform's
    toward all runs'); each pull weighs PRIOR_CASES runs. A platform or stack none of whose runs is kept gets its
    prior."""
    gam, eff = _axes(FINE)
    sq = table**2
    k = A.PRIOR_CASES
    every = np.arange(len(gam))

    def share(idx, prior):  # per collective scale: the share minimising these runs' squared errors plus the pull
        objective = sq[idx].sum(0) + k * (eff[None, :] - prior[:, None]) ** 2
        return objective.argmin(1)

    kept = [i for i in range(len(runs)) if keep[i]]
    common_at = eff[sq[kept].sum(0).argmin(1)]  # per collective scale: the share of peak all kept runs want
    collective, platforms, stacks, chosen = {}, {}, {}, {}
    for platform in sorted({r.platform for r in runs}):
        mine = [i for i in kept if runs[i].platform == platform]
        plat = share(mine, common_at)
        groups = sorted({r.group for r in runs if r.platform == platform})
        picks = {g: share([i for i in mine if runs[i].group == g], eff[plat] if len(groups) > 1 else common_at)
                 for g in groups}
        objective = k * gam**2 + sum(sq[i, every, picks[runs[i].group]] for i in mine)
        g = chosen[platform] = int(np.argmin(objective))
        collective[platform] = float(np.exp(gam[g]))
        platforms[platform] = float(np.exp(eff[plat[g]]))
        stacks.update({group: float(np.exp(eff[p[g]])) for group, p in picks.items()})
    # The common share: every kept run at its own platform's collective scale, one share of peak for all.
    at_own = np.array([sq[i, chosen[runs[i].platform]] for i in kept])
    return Fit(float(np.exp(eff[at_own.sum(0).argmin()])), collective, platforms, stacks)


@dataclass
class Case:
    run: Run
    before: float  # predicted with the unfitted constants (every platform at UNFITTED_MATMUL_EFFICIENCY)
    fitted: float  # predicted by the fit on all runs
    loo: float  # predicted by the fit on all other runs
    half_width: float  # of its range, from the other runs' leave-one-out errors

    @property
    def loo_error(self) -> float:
        return self.loo / self.run.published - 1

    @property
    def before_error(self) -> float:
        return self.before / self.run.published - 1

    @property
    def in_range(self) -> bool:
        return abs(math.log(self.loo / self.run.published)) <= self.half_width


@dataclass
class Result:
    fit: Fit
    cases: list[Case]
    ranges: dict[str, dict]  # platform (and "all") -> half_width, cases

    def as_yaml(self) -> str:
        f = self.fit
        counts = {}
        for c in self.cases:
            for key in (c.run.platform, c.run.group):
                counts[key] = counts.get(key, 0) + 1
        data = {"cases": len(self.cases), "common_efficiency": round(f.common, 4),
                "platforms": {p: {"efficiency": round(v, 4), "collective_scale": round(f.collective[p], 4),
                                  "cases": counts[p]} for p, v in sorted(f.platforms.items())},
                "stacks": {g: {"efficiency": round(v, 4), "cases": counts[g]} for g, v in sorted(f.stacks.items())},
                "ranges": {k: {"half_width": round(v["half_width"], 4), "cases": v["cases"]}
                           for k, v in sorted(self.ranges.items())}}
        return ("# Generated by `python -m chipwise.plan.fit --write` from published_runs.yaml; do not edit (a test\n"
                "# checks this is the fit's current output). What each is: plan/fit.py and docs/planner.md.\n"
                + yaml.safe_dump(data, sort_keys=False))


def _ranges(cases: list[Case], errors: dict[str, float], without: str | None = None) -> dict[str, dict]:
    """Range half-width per platform (and for a platform with no run, "all") from the leave-one-out log errors."""
    kept = [c for c in cases if c.run.id != without]
    pooled = sum(errors[c.run.id] ** 2 for c in kept) / len(kept)
    out = {"all": {"half_width": achieved.half_width([], pooled), "cases": 0}}
    for platform in sorted({c.run.platform for c in kept}):
        mine = [errors[c.run.id] for c in kept if c.run.platform == platform]
        out[platform] = {"half_width": achieved.half_width(mine, pooled), "cases": len(mine)}
    return out


@lru_cache(maxsize=1)
def validate() -> Result:
    """The fit on all runs, every run's leave-one-out prediction, and the ranges those errors give."""
    runs, table = residual_table()
    everything = np.ones(len(runs), bool)
    full = fit(runs, table, everything)
    cases = []
    for i, run in enumerate(runs):
        alone = everything.copy()
        alone[i] = False
        held = fit(runs, table, alone)
        cases.append(Case(run, run.predict(A.UNFITTED_MATMUL_EFFICIENCY, 1.0).tokens_per_s_per_chip,
                          run.predict(full.efficiency(run), full.collective_scale(run)).tokens_per_s_per_chip,
                          run.predict(held.efficiency(run), held.collective_scale(run)).tokens_per_s_per_chip, 0.0))
    errors = {c.run.id: math.log(c.loo / c.run.published) for c in cases}
    for c in cases:  # each run's range from the other runs' errors: an honest check of the ranges
        c.half_width = _ranges(cases, errors, without=c.run.id)[c.run.platform]["half_width"]
    return Result(full, cases, _ranges(cases, errors))


def stored_path() -> Path:
    return Path(str(resources.files("chipwise.plan").joinpath("achieved_efficiency.yaml")))


if __name__ == "__main__":  # python -m chipwise.plan.fit [--write]
    result = validate()
    if "--write" in sys.argv[1:]:
        stored_path().write_text(result.as_yaml())
        print(f"written to {stored_path()}")
    else:
        print(result.as_yaml())
