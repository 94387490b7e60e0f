"""The planner against published pre-training runs (published_runs.yaml): one model, no per-case constants."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from importlib import resources

import yaml

from chipwise import catalog
from chipwise.plan.perf import Layout, StepEstimate, chip_model, estimate
from chipwise.plan.search import search
from chipwise.plan.spec import load_model


@dataclass
class Case:
    id: str
    name: str
    published: float
    predicted: float
    estimate: StepEstimate
    searched: bool
    source: str

    @property
    def error(self) -> float:
        """Signed relative error of the prediction (+0.10: predicted 10% above the published figure)."""
        return self.predicted / self.published - 1


def published_runs() -> list[dict]:
    return yaml.safe_load(resources.files("chipwise.plan").joinpath("published_runs.yaml").read_text())["runs"]


def predict(run: dict) -> Case:
    cfg = load_model(run["model"])
    cat = catalog.load_catalog(run.get("hardware_overrides"))
    chip = chip_model(catalog.get(run["accelerator"], cat))
    if "mesh" in run:
        layout = Layout(**run["mesh"], microbatches=run.get("microbatches", 1), remat=run.get("remat", "none"),
                        repeats=run.get("pipeline_repeats", 1))
        # A published pipeline ran its own stack's schedule (1F1B for Megatron and Meta), not chipwise's.
        est = estimate(cfg, run["seq_len"], run["global_batch"], chip, layout,
                       schedule=run.get("pipeline_schedule", "chipwise"))
        searched = False
    else:
        est, searched = search(cfg, run["seq_len"], run["global_batch"], run["chips"], chip).best, True
    return Case(run["id"], run["name"], run["published_tokens_per_s_per_chip"], est.tokens_per_s_per_chip, est,
                searched, run["source"])


def validate() -> tuple[list[Case], float]:
    cases = [predict(run) for run in published_runs()]
    return cases, statistics.median(abs(c.error) for c in cases)


def markdown_table(cases: list[Case], median: float) -> str:
    rows = ["| case | run | layout (chips) | published tok/s/chip | predicted | error | predicted MFU |",
            "|---|---|---|---|---|---|---|"]
    for c in cases:
        layout = c.estimate.layout.describe() + (" (searched)" if c.searched else "")
        rows.append(f"| {c.id} | {c.name} | {layout} | {c.published:,.0f} | {c.predicted:,.0f} | "
                    f"{c.error:+.0%} | {c.estimate.mfu:.1%} |")
    rows.append(f"\nMedian absolute error: {median:.1%} over {len(cases)} cases.")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m chipwise.plan.validation: the table for docs/planner.md
    print(markdown_table(*validate()))
