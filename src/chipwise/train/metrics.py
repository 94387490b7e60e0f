"""Where training metrics go: the run directory's metrics.jsonl and TensorBoard event files, and the console."""

from __future__ import annotations

import json
import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter

from chipwise.run_dir import RunDir


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# TensorBoard groups its charts by the text before a tag's first "/": four groups instead of one per key.
# val/ for validation; time/ for time spent outside the train steps (once per compile or checkpoint, not per
# step); events/ for the records of a skipped update, rollback or preemption (their counts, and a loss or step
# number that is not the training curve's, would otherwise land on train/'s charts); train/ for the rest.
_VAL_KEYS = frozenset({"val_loss", "val_ppl", "eval_s"})
_TIME_KEYS = frozenset({"compile_time_s", "checkpoint_s"})


def tensorboard_scalars(record: dict) -> list[tuple[str, float]]:
    """(tag, value) for each number in a metrics record, as TensorBoard shows it. metrics.jsonl keeps the bare
    keys and MFU as a fraction (reports and summaries read them); TensorBoard shows MFU in percent, as the
    console and the HTML report do, under a tag that says so."""
    scalars = []
    for key, value in record.items():
        if key in ("step", "time") or not isinstance(value, (int, float)):  # None (non-finite), text
            continue
        if key in _VAL_KEYS:
            tag = f"val/{key}"
        elif key in _TIME_KEYS:
            tag = f"time/{key}"
        elif "event" in record:
            tag = f"events/{record['event']}/{key}"
        elif key == "mfu":
            tag, value = "train/mfu_percent", value * 100
        else:
            tag = f"train/{key}"
        scalars.append((tag, value))
    return scalars


class MetricsWriter:
    def __init__(self, run_dir: RunDir, console: Console, total_steps: int, start_step: int):
        self.jsonl = open(run_dir.metrics_file, "a", buffering=1)
        self.tb = SummaryWriter(str(run_dir.tensorboard_dir))
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("", total=total_steps, completed=start_step)
        self.progress.start()

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()} | {"time": time.time()}  # wall clock, for reports
        self.jsonl.write(json.dumps(record) + "\n")
        for tag, value in tensorboard_scalars(record):
            self.tb.add_scalar(tag, value, record["step"])

    def advance(self, step: int, loss: float | None = None, skipped: int = 0) -> None:
        desc = f"loss {loss:.3f}" if loss is not None else ""
        if skipped:  # the divergence guard's count stays in sight once it is non-zero
            desc += f"  skipped {skipped}"
        self.progress.update(self.task, completed=step, description=desc)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def close(self) -> None:
        self.progress.stop()
        self.jsonl.close()
        self.tb.close()


class NullWriter:
    """What the processes other than 0 write: nothing (process 0 already records the whole run)."""

    def __init__(self, console: Console):
        self.console = console

    def write(self, record: dict) -> None:
        pass

    def advance(self, step: int, loss: float | None = None, skipped: int = 0) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def open_writer(run_dir: RunDir, console: Console, total_steps: int, start_step: int) -> MetricsWriter | NullWriter:
    import jax

    if jax.process_index() != 0:
        return NullWriter(console)
    return MetricsWriter(run_dir, console, total_steps, start_step)
