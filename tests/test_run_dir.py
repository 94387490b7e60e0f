"""The guarded run directory: one run at a time, --overwrite deletes only chipwise's own files, a resume never
silently restarts or rewrites a finished run, damaged files give one line. Each test injects the fault."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from chipwise.cli import main
from chipwise.errors import ChipwiseError
from chipwise.run_dir import LOCK_FILE, MARKER_FILE, RunDir
from chipwise.run_lock import STALE_S, RunLock
from conftest import TINY_MODEL, one_line_error, set_args

pytestmark = pytest.mark.slow



def args(run, corpus, *extra):
    return set_args(*TINY_MODEL, "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=3",
                    "hardware.peak_tflops=1", f"data.sources=[{corpus}]", f"run_dir={run}", *extra)


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A finished 6-step run (checkpoints at 3 and 6); tests work on copies of it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *args(run, corpus, "train.steps=6")]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def a_live_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def hold_lock(run: Path, proc) -> None:
    """Write the lock as `proc` (a live process on this host) would hold it."""
    owner = RunLock(run / LOCK_FILE, str(run)).owner | {"pid": proc.pid, "since": time.time()}
    from chipwise.run_lock import _process_start

    owner["start"] = _process_start(proc.pid)
    (run / LOCK_FILE).write_text(json.dumps(owner))


def test_a_second_run_is_refused_naming_the_owner_and_a_dead_owner_holds_nothing(run, corpus, capsys):
    proc = a_live_process()
    try:
        hold_lock(run, proc)
        before = snapshot(run)
        for command in (["train", "--resume", str(run), "--set", "train.steps=9", "--set", "train.lr=0.001"],
                        ["train", "--overwrite", *args(run, corpus, "train.steps=6")]):
            assert main(command) == 2
            err = one_line_error(capsys)
            assert f"in use by another chipwise run (pid {proc.pid}" in err
            assert snapshot(run) == before  # nothing written, nothing deleted
    finally:
        proc.kill()
        proc.wait()
    # The owner died (SIGKILL): its lock is stale at once on this host, and the resume goes ahead.
    assert main(["train", "--resume", str(run), "--set", "train.steps=9"]) == 0
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_a_lock_from_another_host_expires_after_its_heartbeat_stops(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": time.time()}))
    lock = RunLock(path, str(tmp_path))
    with pytest.raises(ChipwiseError, match="pid 1 on elsewhere"):
        lock.acquire()
    old = time.time() - STALE_S - 5
    os.utime(path, (old, old))
    lock.acquire()  # taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_concurrent_runs_one_owns_the_directory(tmp_path, corpus, capsys):
    """The reported case: a run in progress, and a --resume of it with another learning rate."""
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen([sys.executable, "-m", "chipwise", "train", *args(run, corpus, "train.steps=100000")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "3").exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline, "the first run never saved a checkpoint"
            time.sleep(0.2)
        assert main(["train", "--resume", str(run), "--set", "train.lr=0.001"]) == 2
        assert f"(pid {proc.pid} on" in one_line_error(capsys)
        assert main(["train", *args(run, corpus, "train.steps=6")]) == 2  # a fresh run over it, too
        one_line_error(capsys)
    finally:
        proc.kill()
        proc.wait()
    lrs = {r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert all(lr != 0.001 for lr in lrs)  # the second command wrote nothing into the run
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] != 0.001


def test_overwrite_deletes_only_what_chipwise_wrote(run, tmp_path, corpus, capsys):
    project = tmp_path / "project"  # a user's folder that happens to hold a config.yaml
    project.mkdir()
    shutil.copy(run / "config.yaml", project / "config.yaml")
    (project / "src").mkdir()
    (project / "thesis.tex").write_text("years of work")
    assert main(["train", "--overwrite", *args(project, corpus, "train.steps=3")]) == 2
    assert "thesis.tex" in one_line_error(capsys)
    assert (project / "thesis.tex").read_text() == "years of work" and (project / "src").is_dir()

    (run / "notes.md").write_text("mine")  # a run directory with a file of the user's in it: refused too
    assert main(["train", "--overwrite", *args(run, corpus, "train.steps=3")]) == 2
    assert "notes.md" in one_line_error(capsys)
    (run / "notes.md").unlink()
    assert (run / MARKER_FILE).is_file()
    assert main(["train", "--overwrite", *args(run, corpus, "train.steps=3")]) == 0
    assert max(int(p.name) for p in (run / "checkpoints").iterdir()) == 3  # replaced, not resumed


def test_every_checkpoint_damaged_never_restarts_from_step_zero(run, capsys):
    for step in (3, 6):
        for f in (run / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 64:
                f.write_bytes(b"\0" * f.stat().st_size)
    before = (run / "metrics.jsonl").read_text()
    for attempt in range(2):  # the first refusal sets them aside; the second must refuse as well
        assert main(["train", "--resume", str(run), "--set", "train.steps=9"]) == 2
        one_line_error(capsys)
    assert (run / "metrics.jsonl").read_text() == before


def test_a_finished_run_or_fewer_steps_is_refused_and_nothing_rewritten(run, capsys):
    before = snapshot(run)
    for steps in (6, 4):
        assert main(["train", "--resume", str(run), "--set", f"train.steps={steps}"]) == 2
        assert "already trained to step 6" in one_line_error(capsys)
    assert snapshot(run) == before


@pytest.mark.parametrize("content", [b"model: [unclosed", b"", b"just a string", b"\xff\xfe\x00binary"])
def test_a_damaged_config_is_one_line_for_resume_and_report(run, tmp_path, content, capsys):
    (run / "config.yaml").write_bytes(content)
    assert main(["train", "--resume", str(run)]) == 2
    assert "config.yaml" in one_line_error(capsys)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    assert "config.yaml" in one_line_error(capsys)
    assert not (tmp_path / "report").exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, corpus, capsys):
    target = tmp_path / "run"
    target.write_text("a file")
    assert main(["train", *args(target, corpus, "train.steps=3")]) == 2
    assert "is a file" in one_line_error(capsys)
    assert target.read_text() == "a file"


def test_a_half_written_metrics_line_is_cut_before_appending(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')  # a run killed mid-write
    assert main(["train", "--resume", str(run), "--set", "train.steps=7"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line is whole JSON again
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 7 * 8 * 32 and summary["invocations"] == 2


def test_divergence_writes_its_event_and_summary(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    code = main(["train", *args(run, corpus, "train.steps=6", "train.max_bad_steps=1", "train.max_rollbacks=0",
                                "train.inject_nan_batches=[0]")])
    assert code == 3
    err = capsys.readouterr().err
    assert "no checkpoint had been saved" in err and "up to step 0" not in err
    records = RunDir(run).read_metrics()
    assert [r["event"] for r in records if r.get("event") == "diverged"] == ["diverged"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"].startswith("training diverged") and summary["tokens"] == 1 * 8 * 32


def test_sample_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(run, capsys):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    tok.add_tokens(["<swapped>"])
    tok.save(str(run / "tokenizer.json"))
    assert main(["sample", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "4"]) == 2
    assert "not the tokenizer the checkpoint was trained with" in one_line_error(capsys)


def test_resume_names_the_data_setting_that_changed(run, corpus, tmp_path, capsys):
    assert main(["train", "--resume", str(run), "--set", "train.steps=9", "--set", "data.val_fraction=0.3"]) == 2
    assert "data.val_fraction was 0.05, is now 0.3" in one_line_error(capsys)
    # A fixed tokenizer, and a corpus that changed under it: refused instead of continuing on other tokens.
    fixed = tmp_path / "fixed"
    shutil.copytree(corpus, tmp_path / "corpus2")
    assert main(["train", *args(fixed, tmp_path / "corpus2", "train.steps=3",
                                f"data.tokenizer={run / 'tokenizer.json'}")]) == 0
    (tmp_path / "corpus2" / "extra.py").write_text("def more():\n    return 'text'\n" * 50)
    assert main(["train", "--resume", str(fixed), "--set", "train.steps=6"]) == 2
    assert "data.sources changed" in one_line_error(capsys)


def test_a_model_preset_on_resume_is_refused_not_ignored(run, capsys):
    assert main(["train", "--resume", str(run), "--set", "model.preset=125m", "--set", "train.steps=9"]) == 2
    assert "keeps the model" in one_line_error(capsys)


def test_sigterm_still_exits_with_the_signal_and_releases_the_lock(tmp_path, corpus):
    run = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen([sys.executable, "-m", "chipwise", "train", *args(run, corpus, "train.steps=100000")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "3").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert not (run / LOCK_FILE).exists()
    assert json.loads((run / "summary.json").read_text())["stopped"].startswith("SIGTERM")


def test_an_unusable_data_cache_is_one_line(tmp_path, corpus, capsys):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a directory")
    run = tmp_path / "run"
    assert main(["train", *args(run, corpus, "train.steps=3", f"data.cache_dir={blocker}")]) == 2
    assert "data cache" in one_line_error(capsys)
    assert main(["train", *args(run, corpus, "train.steps=3", f"data.cache_dir={blocker / 'sub'}")]) == 2
    assert "not writable" in one_line_error(capsys)
    assert not run.exists()


def test_a_batch_far_beyond_memory_is_refused_before_allocating(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *args(run, corpus, "train.steps=3", "train.batch_size=1000000000")]) == 2
    assert "GiB" in one_line_error(capsys)
    assert not run.exists()


def test_a_corrupt_tokenizer_is_one_line_for_sample_and_export(run, tmp_path, capsys):
    (run / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    assert main(["sample", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "4"]) == 2
    assert "tokenizer" in one_line_error(capsys)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "tokenizer" in one_line_error(capsys)
    assert not (tmp_path / "hf").exists()  # the refused export created nothing
