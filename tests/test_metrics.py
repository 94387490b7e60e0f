"""What a run's metrics look like in TensorBoard, read back from the event file the writer leaves."""

import io
import json
import struct

import pytest
from rich.console import Console
from tensorboardX.proto.event_pb2 import Event

from chipwise.run_dir import RunDir
from chipwise.train.metrics import MetricsWriter


def read_scalars(run_dir: RunDir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from the event files, parsed as TFRecords by hand (tensorboard itself is not a
    dependency): an 8-byte length, its 4-byte CRC, the serialized Event, the Event's 4-byte CRC."""
    scalars = {}
    for path in sorted(run_dir.tensorboard_dir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_tags_are_grouped_and_mfu_is_a_percent(tmp_path):
    records = [
        {"step": 0, "compile_time_s": 9.0},
        {"step": 0, "val_loss": 6.0, "val_ppl": 403.4, "eval_s": 1.0},
        {"step": 2, "loss": 5.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 1000.0, "mfu": 0.25,
         "step_time_s": 0.5, "data_wait_s": 0.1, "skipped_steps": 0, "rollbacks": 0},
        {"step": 3, "event": "skipped_update", "loss": float("nan"), "grad_norm": 2.5, "bad_streak": 1,
         "skipped_steps": 1},
        {"step": 4, "checkpoint_s": 2.0},
        {"step": 4, "event": "checkpoint_failed", "reason": "disk full"},
    ]
    run_dir = RunDir(tmp_path)
    writer = MetricsWriter(run_dir, Console(file=io.StringIO()), total_steps=4, start_step=0)
    for record in records:
        writer.write(record)
    writer.close()

    scalars = read_scalars(run_dir)
    assert set(scalars) == {
        "time/compile_time_s", "time/checkpoint_s",
        "val/val_loss", "val/val_ppl", "val/eval_s",
        "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu_percent",
        "train/step_time_s", "train/data_wait_s", "train/skipped_steps", "train/rollbacks",
        "events/skipped_update/grad_norm", "events/skipped_update/bad_streak", "events/skipped_update/skipped_steps",
    }  # no bare keys; the skipped step's NaN loss and the failure's text are not scalars
    assert scalars["train/mfu_percent"] == [(2, pytest.approx(25.0))]
    assert scalars["train/loss"] == [(2, 5.5)]  # the skipped update's loss stays off the training curve
    assert scalars["val/val_loss"] == [(0, 6.0)] and scalars["time/checkpoint_s"] == [(4, 2.0)]

    # metrics.jsonl keeps the bare keys and MFU as a fraction: reports and summaries read them.
    logged = [json.loads(line) for line in run_dir.metrics_file.read_text().splitlines()]
    assert logged[2]["mfu"] == 0.25 and logged[2]["loss"] == 5.5 and logged[1]["val_loss"] == 6.0
    assert logged[3]["loss"] is None
