"""Where training metrics go: the run directory's metrics.jsonl and TensorBoard event files, and the console.

A full disk (or a quota, or an I/O error) must not end a run over its logs: an output whose write fails is paused
with one console warning, the records it misses are counted, every later record retries it, and one line says
when it works again and how many records were lost meanwhile (docs/reliability.md, "Full disk")."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import struct
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

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


def tfrecord(event: Event) -> bytes:
    """One TFRecord as TensorBoard reads it: length, its masked CRC32C, the serialized Event, the Event's CRC."""
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _error(e: OSError) -> str:
    return f"{type(e).__name__}: {e}"


class Output:
    """One append-only file, written with plain os.write calls in the caller's thread. So a failure surfaces at
    the write that met it, not in a later flush or close (a buffered file keeps the failed bytes and raises again
    at close) and not in a background thread (tensorboardX's SummaryWriter writes in one: when that thread dies on
    a full disk its bounded queue fills and the next add_scalar blocks the training loop for ever). A record is
    whole in the file or absent: a partial write is cut back, which needs no free space, so the file stays valid.

    The file is opened at its first record, and reopened there after a failed open (a directory on a full disk)."""

    def __init__(self, label: str, path: Path, header: bytes = b""):
        self.label, self.path, self.header = label, path, header
        self.fd: int | None = None
        self.error: str | None = None  # why the output is paused; None while it writes
        self.dropped = 0  # records lost in the current pause
        self.lost = 0  # records lost over the whole run
        self.first_dropped = self.last_dropped = 0  # the lowest and highest step of the current pause's records

    def append(self, data: bytes) -> None:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        view = memoryview(self.header + data if size == 0 else data)  # a new file starts with its header
        try:
            while view:
                written = os.write(self.fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device (nothing written)")
                view = view[written:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)
            raise

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def drop(self, step: int) -> None:
        """Count a record lost; its step widens the range reported (an event may carry an earlier step)."""
        self.dropped, self.lost = self.dropped + 1, self.lost + 1
        if self.dropped == 1:
            self.first_dropped = self.last_dropped = step
        else:
            self.first_dropped, self.last_dropped = min(self.first_dropped, step), max(self.last_dropped, step)

    def lost_text(self) -> str:
        steps = (f"step {self.first_dropped}" if self.first_dropped == self.last_dropped
                 else f"steps {self.first_dropped}-{self.last_dropped}")
        return f"{self.label}: {self.dropped} record{'s' if self.dropped != 1 else ''} ({steps})"


def _names(outputs: list[Output]) -> str:
    return " and ".join(o.label for o in outputs)


SYNC_S = 30.0  # a run directory in a bucket: how often the records written locally are uploaded (run_dir.py)


class MetricsWriter:
    def __init__(self, run_dir: RunDir, console: Console, total_steps: int, start_step: int):
        # Named as tensorboardX names its files (a resumed run adds a file; TensorBoard reads them all); the pid
        # keeps two writers started within one second apart.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.jsonl = Output("metrics.jsonl", Path(run_dir.metrics_file))
        self.tb = Output("TensorBoard events", Path(run_dir.tensorboard_dir) / name,
                         header=tfrecord(Event(wall_time=time.time(), file_version="brain.Event:2")))
        self._recovered: list[str] = []  # what each output lost, once it wrote again, until the outage ends
        self.run_dir, self._synced = run_dir, time.monotonic()
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("", total=total_steps, completed=start_step)
        self.progress.start()

    @property
    def lost(self) -> int:
        """Records lost to failed writes so far (the most any one output lost)."""
        return max(self.jsonl.lost, self.tb.lost)

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()} | {"time": time.time()}  # wall clock, for reports
        step = record.get("step")
        outputs = [(self.jsonl, (json.dumps(record) + "\n").encode())]
        scalars = tensorboard_scalars(record)
        if scalars:  # a record with no number (a failure's text) is not a TensorBoard record: nothing to lose
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars])
            outputs.append((self.tb, tfrecord(Event(wall_time=record["time"], step=int(step or 0),
                                                    summary=summary))))
        in_outage = any(o.error is not None for o in (self.jsonl, self.tb))
        paused = []
        for output, data in outputs:
            try:
                output.append(data)
            except OSError as e:  # ENOSPC, EDQUOT, EIO...: lose this record, not the run
                if output.error is None:
                    output.error = _error(e)
                    paused.append(output)
                output.drop(step)
                continue
            if output.error is not None:
                self._recovered.append(output.lost_text())
                output.error, output.dropped = None, 0
        # One warning per outage (the outputs usually fail together, but a record without numbers reaches
        # metrics.jsonl alone) and one line when every output writes again.
        if paused and not in_outage:
            self.log(f"[yellow]warning:[/yellow] cannot write {_names(paused)} ({escape(paused[0].error)}); "
                     f"metrics from step {step} on are not saved (counted, and retried at every record) until a "
                     f"write succeeds; training continues")
        if self._recovered and not any(o.error is not None for o in (self.jsonl, self.tb)):
            self.log(f"metrics logging resumed at step {step}; lost while paused: "
                     f"{escape('; '.join(self._recovered))}")
            self._recovered = []
        if self.run_dir.remote and ("event" in record or time.monotonic() - self._synced > SYNC_S):
            self.sync()

    def sync(self) -> None:
        """Upload a remote run's records; a failed upload is said and retried at the next one."""
        self._synced = time.monotonic()
        try:
            self.run_dir.sync_records()
        except Exception as e:  # noqa: BLE001 - a flaky bucket must not end the run over its logs
            self.log(f"[yellow]warning:[/yellow] could not upload the run's metrics to {self.run_dir} "
                     f"({escape(_error(e) if isinstance(e, OSError) else str(e)[:200])}); retrying later")

    def advance(self, step: int, loss: float | None = None, skipped: int = 0) -> None:
        desc = f"loss {loss:.3f}" if loss is not None else ""
        if skipped:  # the divergence guard's count stays in sight once it is non-zero
            desc += f"  skipped {skipped}"
        self.progress.update(self.task, completed=step, description=desc)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def close(self) -> None:
        self.progress.stop()
        still = [o.lost_text() + f", {o.error}" for o in (self.jsonl, self.tb) if o.error is not None]
        if still:
            self.log(f"[yellow]warning:[/yellow] metrics were still not being written when the run ended; lost: "
                     f"{escape('; '.join(self._recovered + still))}")
        self.jsonl.close()
        self.tb.close()
        if self.run_dir.remote:
            self.sync()


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

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_writer(run_dir: RunDir, console: Console, total_steps: int, start_step: int) -> MetricsWriter | NullWriter:
    import jax

    if jax.process_index() != 0:
        return NullWriter(console)
    return MetricsWriter(run_dir, console, total_steps, start_step)
