"""Bad input is one line and harms nothing: reports of diverged runs, damaged caches, optimizer settings out of
range, non-finite numbers on the plan command line, and data folders reached through symlinks."""

import json
import os

import numpy as np
import pytest

from chipwise.cli import main
from chipwise.config import DataConfig, load_config
from chipwise.data import prepare_data
from chipwise.data.corpus import load_corpus
from chipwise.errors import ChipwiseError, ConfigError
from chipwise.report import charts
from conftest import one_line_error
from test_train_e2e import train_args  # its tiny run






def tree(path) -> dict:
    """{relative path: bytes} of every file under `path` (nothing if it does not exist)."""
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- report of a diverged run


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, corpus):
    """A run whose second batch is NaN: metrics.jsonl holds a skipped_update event record carrying "loss"."""
    root = tmp_path_factory.mktemp("nan_run")
    run = root / "run"
    # The cache folder is given: module fixtures start before conftest's per-test CHIPWISE_CACHE.
    args = train_args(run, corpus, 4, "train.inject_nan_batches=[1]", f"data.cache_dir={root / 'cache'}",
                      "hardware.peak_tflops=1")
    assert main(["train", *args]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "skipped_update" and "loss" in r for r in records)
    return run


def test_report_of_a_run_whose_nan_guard_fired(nan_run, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(nan_run), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert capsys.readouterr().err == ""
    for png in charts.FILES[:3]:  # loss, throughput, step time; a CPU has no memory figures, no price
        assert f"src='{png}'" in page and (out / png).is_file()
    assert "<td>skipped updates, rollbacks</td><td>1, 0</td>" in page


def test_a_failed_report_leaves_its_directory_as_it_was(nan_run, tmp_path, monkeypatch, capsys):
    def broken(runs, out):
        raise ChipwiseError("the throughput chart could not be drawn")

    healthy = charts.CHARTS
    monkeypatch.setattr(charts, "CHARTS", (healthy[0], ("Throughput and MFU", broken), *healthy[2:]))
    # A new directory: nothing is created, not even its parent, and nothing is left beside it.
    out = tmp_path / "reports" / "new"
    assert main(["report", str(nan_run), "--out", str(out)]) == 2
    one_line_error(capsys)
    assert not (tmp_path / "reports").exists() and os.listdir(tmp_path) == []
    # An empty directory stays empty, so the retry is not refused as "not empty".
    out.mkdir(parents=True)
    assert main(["report", str(nan_run), "--out", str(out)]) == 2
    one_line_error(capsys)
    assert os.listdir(out) == [] and os.listdir(out.parent) == ["new"]
    # An earlier report being overwritten stays whole: every figure and its page.
    monkeypatch.setattr(charts, "CHARTS", healthy)
    assert main(["report", str(nan_run), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    monkeypatch.setattr(charts, "CHARTS", (healthy[0], ("Throughput and MFU", broken), *healthy[2:]))
    assert main(["report", str(nan_run), "--out", str(out), "--overwrite"]) == 2
    one_line_error(capsys)
    assert tree(out) == before and os.listdir(out.parent) == ["new"]
    # The retry once the fault is gone replaces the report and keeps the user's own file.
    monkeypatch.setattr(charts, "CHARTS", healthy)
    assert main(["report", str(nan_run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.html").is_file()
    assert os.listdir(out.parent) == ["new"]


# ------------------------------------------------------------------------------- damaged token store


def test_a_damaged_token_store_is_rebuilt(corpus, tmp_path):
    """A shard cut short, emptied, not .npy at all, or of another dtype: found at start-up from the headers, said in
    one line naming the file, and only that shard is tokenized again."""
    cfg = DataConfig(sources=[str(corpus)], cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, 320, log=lambda _: None)
    train, val = np.array(first.train_tokens), np.array(first.val_tokens)  # copies: the memmaps are replaced below
    train_file = next((tmp_path / "cache" / "stores").glob("*/train-00000.npy"))
    val_file = train_file.with_name("val-00000.npy")
    whole = train_file.read_bytes()

    def damage(path, content: bytes):
        path.unlink()  # a new file, not one truncated under a live memmap (reading that would be SIGBUS)
        path.write_bytes(content)

    for content in (whole[: len(whole) // 2], whole[:40], b"", b"not a numpy file at all"):
        damage(train_file, content)
        lines = []
        again = prepare_data(cfg, 320, log=lines.append)
        notes = [line for line in lines if "is damaged" in line]
        assert len(notes) == 1 and "\n" not in notes[0] and str(train_file) in notes[0], lines
        assert "1 shard(s) kept" in " ".join(lines)  # the val shard: only the damaged one is tokenized again
        np.testing.assert_array_equal(again.train_tokens, train)
        np.testing.assert_array_equal(again.val_tokens, val)
        assert train_file.read_bytes() == whole
    # A shard of another dtype (a header that does not match the manifest) is rebuilt as well.
    damage(val_file, b"")
    np.save(val_file, val.astype(np.float32))
    lines = []
    again = prepare_data(cfg, 320, log=lines.append)
    assert any("is damaged" in line and "val-00000.npy" in line for line in lines), lines
    assert again.val_tokens.dtype == val.dtype
    np.testing.assert_array_equal(again.val_tokens, val)


# ------------------------------------------------------------------------------- optimizer settings


@pytest.mark.parametrize("setting, message", [
    ("train.min_lr_ratio=-3", "train.min_lr_ratio must be in [0, 1]"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1]"),
    ("train.grad_clip=-1", "train.grad_clip must be a positive finite number"),
    ("train.grad_clip=0", "train.grad_clip must be a positive finite number"),
    ("train.grad_clip=.inf", "train.grad_clip must be a positive finite number"),
    ("train.beta1=1.5", "train.beta1 must be in [0, 1)"),
    ("train.beta1=1", "train.beta1 must be in [0, 1)"),
    ("train.beta2=-1", "train.beta2 must be in [0, 1)"),
    ("train.decay_fraction=2", "train.decay_fraction must be in (0, 1]"),
    ("train.decay_fraction=0", "train.decay_fraction must be in (0, 1]"),
    ("train.adam_eps=0", "train.adam_eps must be a positive finite number"),
    ("train.weight_decay=-5", "train.weight_decay must be zero or a positive finite number"),
    ("train.lr=.nan", "train.lr must be a positive finite number"),
    ("train.lr=.inf", "train.lr must be a positive finite number"),
    ("train.beta2=.nan", "train.beta2 must be in [0, 1)"),
    ("hardware.price_per_hour=.nan", "hardware.price_per_hour must be positive and finite"),
    ("train.param_dtype=float16", "train.param_dtype must be one of float32, bfloat16, got 'float16'"),
    ("train.moments_dtype=fp8", "train.moments_dtype must be one of float32, bfloat16, got 'fp8'"),
    ("train.shard_optimizer=sometimes", "train.shard_optimizer must be bool"),
])
def test_optimizer_and_precision_settings_out_of_range(setting, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [setting])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_optimizer_settings_at_their_edges_are_accepted():
    t = load_config(None, ["train.min_lr_ratio=0", "train.beta1=0", "train.beta2=0.999", "train.weight_decay=0",
                           "train.decay_fraction=1", "train.schedule=wsd", "train.grad_clip=1e9"]).train
    assert (t.min_lr_ratio, t.beta1, t.weight_decay, t.decay_fraction) == (0, 0, 0, 1)
    assert load_config(None, ["train.min_lr_ratio=1"]).train.min_lr_ratio == 1


def test_a_negative_min_lr_ratio_is_refused_before_anything_is_created(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *train_args(run, corpus, 2, "train.min_lr_ratio=-3")]) == 2
    assert "train.min_lr_ratio must be in [0, 1]" in one_line_error(capsys)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- non-finite plan numbers

PLAN = ["plan", "--model", "1b", "--accelerator", "h100-sxm", "--chips", "16", "--seq-len", "2048",
        "--global-batch", "32"]


@pytest.mark.parametrize("extra, message", [
    (["--tokens", "inf"], "--tokens: 'inf' is not a finite number"),
    (["--tokens=-inf"], "--tokens: '-inf' is not a finite number"),
    (["--tokens", "nan"], "--tokens: 'nan' is not a finite number"),
    (["--tokens", "1e400"], "--tokens: '1e400' is not a finite number"),
    (["--tokens", "lots"], "--tokens: 'lots' is not a number"),
    (["--tokens", "2e12", "--catalog-set", "h100-sxm.price_per_chip_hour=.inf"], ".inf is not a finite number"),
    (["--catalog-set", "h100-sxm.power_watts=.nan"], ".nan is not a finite number"),
])
def test_plan_refuses_non_finite_numbers(extra, message, tmp_path, capsys):
    chart = tmp_path / "chart.png"
    assert main([*PLAN, *extra, "--json", "--chart", str(chart)]) == 2
    assert message in one_line_error(capsys)
    assert capsys.readouterr().out == "" and not chart.exists()


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_plan_json_is_strict_even_when_a_figure_is_infinite(tmp_path, capsys):
    # A catalog file is YAML, where .inf is a number: the catalog refuses it as a figure, in one line...
    overrides = tmp_path / "prices.yaml"
    overrides.write_text("h100-sxm: {price_per_chip_hour: .inf}\n")
    assert main([*PLAN, "--tokens", "2e12", "--catalog", str(overrides), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "positive and finite" in captured.err and captured.err.count("\n") == 1
    # ...and whatever non-finite number might still reach the output, the output stays JSON.
    from chipwise.plan.render import _finite

    assert json.loads(json.dumps(_finite({"a": [float("inf"), 1.5], "b": float("nan")}), allow_nan=False)) == \
        {"a": [None, 1.5], "b": None}


# ------------------------------------------------------------------------------- symlinked data folders


def test_symlinked_folders_are_followed_once(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "real").mkdir(parents=True)
    outside.mkdir()
    (data / "a.txt").write_text("alpha " * 20)
    (data / "real" / "b.txt").write_text("beta " * 20)
    (outside / "c.txt").write_text("gamma " * 20)
    (data / "linked").symlink_to(outside, target_is_directory=True)  # data assembled from elsewhere: read
    (data / "loop").symlink_to(data, target_is_directory=True)  # back up the tree: skipped, said
    (data / "0again").symlink_to(data / "real", target_is_directory=True)  # sorts first, yet real/ keeps its name
    (outside / "back").symlink_to(outside, target_is_directory=True)  # a loop inside a followed folder
    corpus = load_corpus(DataConfig(sources=[str(data)], val_fraction=0.3))
    names = sorted(d.name for d in corpus.train + corpus.val)
    assert names == ["data/a.txt", "data/linked/c.txt", "data/real/b.txt"]
    skipped = " | ".join(corpus.notes)
    for link in ("data/loop", "data/0again", "data/linked/back"):
        assert f"skipped {link}: it leads to" in skipped, corpus.notes
    assert all("\n" not in note for note in corpus.notes)


def test_a_long_run_without_whitespace_is_cut_for_tokenizer_training_only():
    from chipwise.data.corpus import Document
    from chipwise.data.tokenizer import MAX_TRAINING_WORD, train_tokenizer, training_text

    blob = "x" * (3 * MAX_TRAINING_WORD + 5)
    text = f"def f():\n    return '{blob}'\n"
    cut = training_text(text)
    assert max(len(run) for run in cut.split()) <= MAX_TRAINING_WORD and cut.replace("\n", "") == \
        text.replace("\n", "")
    assert training_text("short text") == "short text"
    tok = train_tokenizer([Document(name="a", text=text * 3)], 300)
    assert tok.decode(tok.encode(text).ids) == text  # encoding the whole run still round-trips
