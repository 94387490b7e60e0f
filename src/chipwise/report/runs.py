"""A run directory read back for reporting: its config, metrics, run_info and summary, plus derived series."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from chipwise.errors import ChipwiseError
from chipwise.run_dir import RunDir


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    config_text: str
    records: list[dict]
    info: dict = field(default_factory=dict)  # run_info.json of the latest invocation
    summary: dict = field(default_factory=dict)  # summary.json: the whole run, as of its latest invocation

    @property
    def tokens_per_step(self) -> int:
        return self.config["train"]["batch_size"] * self.config["train"]["seq_len"]

    def train(self) -> list[dict]:
        """The training curve: log-line records. Event records (a skipped update, a rollback) carry a "loss" too,
        but one step's, not a window's, and no throughput, so they are not points of the curve."""
        return [r for r in self.records if "loss" in r and "event" not in r]

    def val(self) -> list[dict]:
        return [r for r in self.records if "val_loss" in r and "event" not in r]

    def events(self, kind: str) -> list[dict]:
        """Records of one event kind ("skipped_update", "rollback", ...), in file order."""
        return [r for r in self.records if r.get("event") == kind]

    def elapsed_minutes(self, records: list[dict]) -> list[float] | None:
        """Wall-clock minutes since the run's first record (None for runs written before records had a time)."""
        times = [r["time"] for r in self.records if "time" in r]
        if not times or any("time" not in r for r in records):
            return None
        return [(r["time"] - times[0]) / 60 for r in records]

    def _spans(self):
        """(record, steps it covers) in file order: a log line averages the steps since the one before it.

        Records without step times cover 0 steps; a resumed run's first record (its compile time, at the step
        it resumed from) marks where its steps start counting.
        """
        last_step = None
        for r in self.records:
            covered = 0
            if "step_time_s" in r:
                covered = max(r["step"] - (last_step if last_step is not None else 0), 0)
                last_step = r["step"]
            elif last_step is None:
                last_step = r["step"]
            yield r, covered

    def busy_seconds(self) -> list[tuple[int, float]]:
        """(step, seconds of steps, evaluation and checkpoints so far) after each record; compile excluded."""
        out, total = [], 0.0
        for r, covered in self._spans():
            total += (r.get("step_time_s") or 0.0) * covered + (r.get("eval_s") or 0.0) + (r.get("checkpoint_s") or 0.0)
            out.append((r["step"], total))
        return out

    def step_breakdown(self) -> dict[str, float] | None:
        """Mean seconds per step: compute, data wait, checkpoint and evaluation (the last two amortised)."""
        steps = step_s = wait_s = 0.0
        for r, covered in self._spans():
            steps += covered
            step_s += (r.get("step_time_s") or 0.0) * covered
            wait_s += (r.get("data_wait_s") or 0.0) * covered
        if steps <= 0:
            return None
        ckpt = sum(r.get("checkpoint_s") or 0.0 for r in self.records)
        evals = sum(r.get("eval_s") or 0.0 for r in self.records)
        # The measured step time spans one step's completion to the next, data wait included.
        return {"compute": (step_s - wait_s) / steps, "data wait": wait_s / steps, "checkpoint": ckpt / steps,
                "evaluation": evals / steps}


def load_run(run_dir: str | Path) -> Run:
    run = RunDir(run_dir)
    config = run.read_config_dict()  # a damaged config.yaml is a one-line error here
    text = run.read_config_text()
    records = run.read_metrics()
    return Run(name=run.name, path=run.location, config=config, config_text=text,
               records=records, info=run.read_run_info(), summary=run.read_summary())


def load_runs(run_dirs) -> list[Run]:
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs named alike (a/run, b/run) are told apart by their full paths
        if names.count(r.name) > 1:
            r.name = str(r.path)
    if len({str(r.path) if '://' in str(r.path) else str(r.path.resolve()) for r in runs}) < len(runs):
        raise ChipwiseError("the same run directory is given twice; list each run once")
    return runs
