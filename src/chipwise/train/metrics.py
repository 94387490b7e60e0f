"""Where training metrics go: RUN_DIR/metrics.jsonl, TensorBoard event files, and the console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    def __init__(self, run_dir: Path, console: Console, total_steps: int, start_step: int):
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
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
        step = record["step"]
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(key, value, step)

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


def open_writer(run_dir: Path, console: Console, total_steps: int, start_step: int) -> MetricsWriter | NullWriter:
    import jax

    if jax.process_index() != 0:
        return NullWriter(console)
    return MetricsWriter(run_dir, console, total_steps, start_step)
