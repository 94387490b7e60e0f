"""data.mixture: exact, deterministic proportions; resume mid-mixture; the realised shares in metrics and report."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_MODEL, one_line_error, set_args

from chipwise.cli import main
from chipwise.data.loader import TrainIterator, mixture_counts, mixture_shares

WEIGHTS = [("code", 0.5), ("prose", 0.3), ("math", 0.2)]


def _parts():
    # Each part's tokens name the part (ids 100+, 200+, 300+), so every window says where it came from.
    return [(np.arange(4000 + 1000 * i) % 50 + 100 * (i + 1)).astype(np.uint16) for i in range(len(WEIGHTS))]


def _iterator(process_index=0, process_count=1):
    return TrainIterator(_parts(), 16, 8, seed=3, process_index=process_index, process_count=process_count,
                         worker_threads=0, mixture=WEIGHTS)


def test_proportions_hold_within_one_percent_over_any_thousand_sequences():
    it = _iterator()
    batches = [next(it) for _ in range(500)]  # 4,000 sequences
    parts = np.concatenate([b["part"] for b in batches])
    origin = np.concatenate([b["tokens"][:, 0] // 100 - 1 for b in batches])
    assert (parts == origin).all()  # each window comes from the part it is labelled with
    for i, (_, w) in enumerate(WEIGHTS):
        shares = np.convolve(parts == i, np.ones(1000), "valid") / 1000  # every run of 1,000 consecutive sequences
        assert np.abs(shares - w).max() <= 0.01, (i, np.abs(shares - w).max())
    realised = it.realised_mixture()
    assert realised == {n: float((parts == i).mean()) for i, (n, _) in enumerate(WEIGHTS)}
    assert abs(realised["code"] - 0.5) < 1e-3
    # The closed form agrees with the draw at every prefix.
    assert mixture_counts(len(parts), mixture_shares([w for _, w in WEIGHTS])) == \
        [int((parts == i).sum()) for i in range(3)]


def test_resume_mid_mixture_is_exact_and_process_count_free():
    straight = _iterator()
    expected = [next(straight)["tokens"] for _ in range(40)]
    first = _iterator()
    for _ in range(17):
        next(first)
    resumed = _iterator()
    resumed.set_state(first.get_state())
    assert all((next(resumed)["tokens"] == expected[k]).all() for k in range(17, 40))
    # Two processes' rows of each step are the one-process batch.
    halves = [_iterator(p, 2) for p in range(2)]
    for k in range(10):
        assert (np.concatenate([next(h)["tokens"] for h in halves]) == expected[k]).all()
    # A checkpoint taken under other weights is refused, not silently re-mixed.
    other = TrainIterator(_parts(), 16, 8, seed=3, worker_threads=0, mixture=[("code", 0.6), ("prose", 0.2),
                                                                                ("math", 0.2)])
    with pytest.raises(Exception, match="mixture"):
        other.set_state(first.get_state())


def _mixture_config(tmp_path, corpus, weights=(0.7, 0.3)) -> str:
    py, txt = tmp_path / "py", tmp_path / "txt"
    py.mkdir(exist_ok=True)
    txt.mkdir(exist_ok=True)
    for i, f in enumerate(sorted(corpus.iterdir())):
        shutil.copy(f, (py if i % 2 else txt) / f.name)
    path = tmp_path / "mix.yaml"
    path.write_text(f"data:\n  mixture:\n    - {{name: even, sources: ['{txt}'], weight: {weights[0]}}}\n"
                    f"    - {{name: odd, sources: ['{py}'], weight: {weights[1]}}}\n")
    return str(path)


def test_training_on_a_mixture_logs_and_reports_the_realised_shares(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    cfg = _mixture_config(tmp_path, corpus)
    assert main(["train", "--config", cfg, *set_args(*TINY_MODEL, "train.steps=4", "train.log_every=2",
                                                      "train.eval_every=4", f"run_dir={run}")]) == 0
    out = capsys.readouterr().out
    assert "mixture of 2 parts: even 70%" in out and "mix even" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["data_mixture"] for r in records if "data_mixture" in r]
    counts = mixture_counts(4 * 8, mixture_shares([0.7, 0.3]))  # 4 steps of 8 sequences
    assert logged[-1] == {"even": counts[0] / 32, "odd": counts[1] / 32} and len(logged) == 2
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"even {counts[0] / 32:.1%}, odd {counts[1] / 32:.1%}" in page


@pytest.mark.parametrize("weight, message", [(0, "has weight 0.0"), (-1, "has weight -1.0")])
def test_a_weight_of_zero_or_below_is_a_one_line_error(tmp_path, corpus, capsys, weight, message):
    cfg = _mixture_config(tmp_path, corpus, weights=(weight, 1))
    assert main(["train", "--config", cfg, *set_args(*TINY_MODEL, f"run_dir={tmp_path / 'run'}")]) == 2
    err = one_line_error(capsys)
    assert message in err and "data.mixture[0] (even)" in err and str(tmp_path / "txt") in err
    assert not (tmp_path / "run").exists()
