"""What each platform's software stack achieves, as fitted across the published runs (plan/fit.py writes
achieved_efficiency.yaml; `python -m chipwise.plan.fit --write` regenerates it and a test checks it is current).

Two views of a chip: "achieved", at the share of peak its platform's stack reached in the published runs, and "peak",
at the one share fitted across all runs (every chip at the same share of its vendor peak: what the peaks alone say).
A prediction's range comes from the leave-one-out errors of its platform's runs (fit.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from chipwise.plan import assumptions as A

VIEWS = ("achieved", "peak")


@dataclass(frozen=True)
class Achieved:
    """The fitted figures one chip is planned with, and where they come from."""
    matmul_efficiency: float  # share of the dense peak on a training step's large GEMMs
    collective_scale: float  # achieved / modelled time of collectives
    range_half_width: float  # the 80% range is prediction x exp(-w) .. x exp(+w)
    stack: str
    basis: str  # which runs the share was fitted on, in words


@lru_cache(maxsize=1)
def fitted() -> dict:
    return yaml.safe_load(resources.files("chipwise.plan").joinpath("achieved_efficiency.yaml").read_text())


def t_quantile(p: float, dof: float) -> float:
    """Student's t quantile by the Cornish-Fisher expansion in 1/dof (Abramowitz and Stegun 26.7.5): within 2% of
    the exact figure from 2 degrees of freedom on, the fewest a range here has."""
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def half_width(log_errors: list[float], pooled_mean_square: float) -> float:
    """Half-width, in log space, of the RANGE_COVERAGE range a platform's leave-one-out errors give: their mean
    square pooled with all runs' (as RANGE_PRIOR_CASES more cases), times Student's t at that many cases less one."""
    cases = len(log_errors) + A.RANGE_PRIOR_CASES
    mean_square = (sum(e * e for e in log_errors) + A.RANGE_PRIOR_CASES * pooled_mean_square) / cases
    return t_quantile(0.5 + A.RANGE_COVERAGE / 2, cases - 1) * math.sqrt(mean_square)


def stack_for(platform: str, stacks: dict[str, str] | None = None) -> str:
    """The stack a plan uses on this platform: the one asked for (--stack), else chipwise's trainer's."""
    return (stacks or {}).get(platform, A.TRAINER_STACK[platform])


def for_platform(platform: str, view: str = "achieved", stack: str | None = None) -> Achieved:
    """The figures a catalog chip of `platform` is planned with under `view`."""
    f = fitted()
    stack = stack or A.TRAINER_STACK[platform]
    group, plat = f["stacks"].get(f"{platform}/{stack}"), f["platforms"].get(platform)
    rng = f["ranges"].get(platform, f["ranges"]["all"])
    # Collectives at the platform's fitted achieved/modelled time in both views (the views differ in compute only);
    # a platform with no published run keeps the a-priori collective model.
    collectives = plat["collective_scale"] if plat else 1.0
    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not one of {VIEWS}")
    if view == "peak":
        eff, basis = f["common_efficiency"], f"the share common to all {f['cases']} published runs"
    elif group:
        eff, basis = group["efficiency"], f"{platform}/{stack}, fitted on {group['cases']} published runs"
    elif plat:
        eff, basis = plat["efficiency"], f"{platform} (no {stack} run published), fitted on {plat['cases']} runs"
    else:
        eff, basis = f["common_efficiency"], f"no {platform} run published: the share common to all runs"
    return Achieved(eff, collectives, rng["half_width"], stack, basis)


def from_calibration(profile: dict) -> float | None:
    """A calibrated chip's range half-width: from its held-out step times (`chipwise bench` stores their errors)."""
    errors = [math.log1p(r["error"]) for r in profile.get("validation", []) if r.get("error") is not None]
    if len(errors) < 2:
        return None
    mean_square = sum(e * e for e in errors) / len(errors)
    return t_quantile(0.5 + A.RANGE_COVERAGE / 2, len(errors) - 1) * math.sqrt(mean_square)
