"""The report's arithmetic and page on hand-made run directories (no training): resumed runs, memory, escaping."""

import json

import matplotlib.pyplot
import pytest
import yaml

from chipwise.config import Config, to_dict
from chipwise.errors import ChipwiseError
from chipwise.report.charts import throughput_figure
from chipwise.report.html import write_report
from chipwise.report.runs import load_run, load_runs

# A run logged every 2 steps, resumed at step 4 after a checkpoint, on a device that reports memory.
RECORDS = [
    {"step": 0, "compile_time_s": 9.0, "time": 100.0},
    {"step": 0, "val_loss": 6.0, "eval_s": 1.0, "time": 101.0},
    {"step": 2, "loss": 5.5, "mfu": 0.3, "tokens_per_s": 1000.0, "step_time_s": 0.5, "data_wait_s": 0.1,
     "peak_memory_bytes": 2 * 2**30, "time": 102.0},
    {"step": 4, "loss": 5.0, "mfu": 0.3, "tokens_per_s": 1000.0, "step_time_s": 0.5, "data_wait_s": 0.1,
     "peak_memory_bytes": 3 * 2**30, "time": 103.0},
    {"step": 4, "checkpoint_s": 2.0, "time": 104.0},
    {"step": 4, "compile_time_s": 9.0, "time": 500.0},  # resumed here
    {"step": 6, "loss": 4.8, "mfu": 0.2, "tokens_per_s": 500.0, "step_time_s": 1.0, "data_wait_s": 0.2,
     "peak_memory_bytes": 3 * 2**30, "time": 502.0},
]


def make_run(path, records=RECORDS, price=3.6):
    path.mkdir(parents=True)
    config = to_dict(Config())
    config["train"]["seq_len"] = 128
    config["data"]["sources"] = ["<script>alert(1)</script>"]  # text from a run dir is escaped on the page
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "lo')
    (path / "run_info.json").write_text(json.dumps({"chips": 2, "price_per_chip_hour": price,
                                                    "power_watts_per_chip": 500, "devices": "2 x TPU v9"}))
    return path


def test_step_accounting_across_a_resume(tmp_path):
    run = load_run(make_run(tmp_path / "a"))
    assert len(run.records) == len(RECORDS)  # the torn last line of a killed run is skipped
    b = run.step_breakdown()
    # 6 steps: 2 x 0.5 + 2 x 0.5 + 2 x 1.0 = 4 s of steps, 0.8 s of it waiting for data; 2 s checkpoint, 1 s eval
    assert b == pytest.approx({"compute": 3.2 / 6, "data wait": 0.8 / 6, "checkpoint": 2 / 6, "evaluation": 1 / 6})
    busy = run.busy_seconds()
    assert busy[-1] == (6, pytest.approx(7.0))  # compile time and the idle gap before the resume are not billed
    assert run.elapsed_minutes(run.train()) == pytest.approx([2 / 60, 3 / 60, 402 / 60])


def test_report_draws_memory_and_cost_and_escapes(tmp_path):
    a, b = make_run(tmp_path / "x" / "run"), make_run(tmp_path / "y" / "run", price=None)
    page = write_report([a, b], tmp_path / "out").read_text()
    for png in ("loss.png", "throughput.png", "step_time.png", "memory.png", "cost.png"):
        assert f"src='{png}'" in page and (tmp_path / "out" / png).stat().st_size > 5000
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert str(tmp_path / "x" / "run") in page  # runs with the same name are told apart by path
    assert "2 x TPU v9" in page and "not recorded" in page  # provenance missing from hand-made runs is said


def throughput_lines(fig) -> dict[str, tuple[object, list[float]]]:
    """{run name: (its tokens/s axes, its points' heights as fractions of that axes)}."""
    fig.canvas.draw()  # settles the autoscaled limits
    lines = {}
    for ax in fig.axes:
        if ax.get_ylabel().startswith("tokens/s"):
            for line in ax.get_lines():
                heights = ax.transAxes.inverted().transform(ax.transData.transform(line.get_xydata()))[:, 1]
                lines[line.get_label()] = (ax, list(heights))
    matplotlib.pyplot.close(fig)
    return lines


def scaled(factor: float) -> list[dict]:
    return [r | {"tokens_per_s": r["tokens_per_s"] * factor} if "tokens_per_s" in r else r for r in RECORDS]


def test_throughput_of_runs_far_apart_stays_readable(tmp_path):
    """A 65 tokens/s run beside an 8,000 tokens/s one is not a flat line at the bottom of a shared axis."""
    slow, fast = (load_run(make_run(tmp_path / name, scaled(f))) for name, f in (("slow", 0.065), ("fast", 8.0)))
    lines = throughput_lines(throughput_figure([slow, fast]))
    for name in ("slow", "fast"):
        heights = lines[name][1]
        assert max(heights) > 0.5 and max(heights) - min(heights) > 0.2, name  # its rise and fall can be seen
    assert lines["slow"][0] is not lines["fast"][0]
    # Runs within 10x of each other still share one axis, where they compare directly.
    near = load_run(make_run(tmp_path / "near", scaled(2.0)))
    lines = throughput_lines(throughput_figure([slow, fast, near]))
    assert lines["fast"][0] is lines["near"][0] is not lines["slow"][0]


def test_report_refusals(tmp_path):
    with pytest.raises(ChipwiseError, match="not a chipwise run directory"):
        load_runs([tmp_path])
    run = make_run(tmp_path / "run")
    with pytest.raises(ChipwiseError, match="given twice"):
        load_runs([run, tmp_path / "." / "run"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"x")
    with pytest.raises(ChipwiseError, match="not empty"):
        write_report([run], mine)
    with pytest.raises(ChipwiseError, match="not a chipwise report"):
        write_report([run], mine, overwrite=True)
    assert (mine / "photo.png").read_bytes() == b"x"
