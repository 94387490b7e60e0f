"""The serving planner against published serving measurements (published_serving_runs.yaml): one model, the same
per-platform assumptions for every case, no per-case constant. `python -m chipwise.plan.serving_validation` prints
the table docs/planner.md carries (a test checks the two agree)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from importlib import resources

import yaml

from chipwise import catalog
from chipwise.plan.serving import ServeEstimate, ServeRequest, estimate
from chipwise.plan.spec import load_model

METRICS = ("ttft_s", "tpot_s", "output_tokens_per_s")


@dataclass
class ServingCase:
    id: str
    name: str
    published: dict[str, float]
    estimate: ServeEstimate
    loose: bool
    source: str

    def predicted(self, metric: str) -> float:
        return {"ttft_s": self.estimate.ttft_s, "tpot_s": self.estimate.tpot_s,
                "output_tokens_per_s": self.estimate.output_tokens_per_s}[metric]

    def error(self, metric: str) -> float | None:
        """Signed relative error (+0.10: predicted 10% above what was published); None where nothing was."""
        published = self.published.get(metric)
        return None if published is None else self.predicted(metric) / published - 1


def published_serving_runs() -> list[dict]:
    text = resources.files("chipwise.plan").joinpath("published_serving_runs.yaml").read_text()
    return yaml.safe_load(text)["runs"]


def _overrides(run: dict) -> dict | None:
    """A CPU instance smaller than its socket gets the cores' share of the socket's peaks and memory bandwidth."""
    if "cores_used" not in run:
        return None
    acc = catalog.get(run["accelerator"])
    share = run["cores_used"] / acc.cores
    fields = ("bf16_tflops", "fp32_tflops", "hbm_tbps")
    return {acc.id: {"cores": run["cores_used"], **{f: getattr(acc, f) * share for f in fields if getattr(acc, f)}}}


def predict(run: dict) -> ServingCase:
    cat = catalog.load_catalog(_overrides(run))
    req = ServeRequest(load_model(run["model"]), [run["accelerator"]], run["chips"], run["input_len"],
                       run["output_len"], batch=run.get("batch"), concurrency=run.get("concurrency"),
                       weights_dtype=run.get("weights_dtype", "bf16"), tensor=run.get("tensor", 1))
    est = estimate(req, catalog.get(run["accelerator"], cat), req.tensor)
    return ServingCase(run["id"], run["name"], run["published"], est, bool(run.get("loose")), run["source"])


def validate() -> tuple[list[ServingCase], dict[str, float]]:
    """Every case, and the median absolute error of TTFT and of TPOT over the cases that publish them."""
    cases = [predict(run) for run in published_serving_runs()]
    medians = {m: statistics.median(abs(c.error(m)) for c in cases if c.error(m) is not None and not c.loose)
               for m in ("ttft_s", "tpot_s")}
    return cases, medians


def _cell(case: ServingCase, metric: str, scale: float, spec: str) -> str:
    published = case.published.get(metric)
    predicted = format(case.predicted(metric) * scale, spec)
    if published is None:
        return f"- / {predicted}"
    return f"{format(published * scale, spec)} / {predicted} ({case.error(metric):+.0%})"


def markdown_table(cases: list[ServingCase], medians: dict[str, float]) -> str:
    rows = ["| case | run | chips (TP) | TTFT ms published / predicted | TPOT ms published / predicted | "
            "output tok/s published / predicted |", "|---|---|---|---|---|---|"]
    for c in cases:
        e = c.estimate
        rows.append(f"| {c.id}{' (loose)' if c.loose else ''} | {c.name} | {e.chips} {e.accelerator.id} "
                    f"({e.tensor}) | {_cell(c, 'ttft_s', 1e3, ',.1f')} | {_cell(c, 'tpot_s', 1e3, '.2f')} | "
                    f"{_cell(c, 'output_tokens_per_s', 1, ',.0f')} |")
    counted = [c for c in cases if not c.loose]
    rows.append(f"\nMedian absolute error: TTFT {medians['ttft_s']:.1%}, TPOT {medians['tpot_s']:.1%} over "
                f"{len(counted)} cases (loose cases are shown, not counted).")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m chipwise.plan.serving_validation: the table for docs/planner.md
    print(markdown_table(*validate()))
