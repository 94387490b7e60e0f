"""A disk that fills up during training: failed saves are cleaned up and reported, metrics pause and resume, the
last good checkpoint is kept and named, and a checkpoint without checksums is restored with a warning.

The disk is a real 8 MB tmpfs where this process may mount one (root on Linux, as on CI), so the ENOSPC comes from
the kernel through tensorstore and os.write; elsewhere (or with CHIPWISE_EMULATE_FULL_DISK=1) an emulation raises
ENOSPC from Orbax's JSON writer and from os.write on the disk's files. Each test reports what it observed through
`fault()`; docs/reliability.md records those reports.
"""

import errno
import json
import os
import shutil
import struct
import subprocess
import sysconfig
from pathlib import Path

import jax
import pytest

from chipwise.cli import main
from conftest import fault, flat

TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.d_ff=64",
        "model.vocab_size=320", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1", "train.warmup_steps=1",
        "train.keep_every=0", "mesh.fsdp=2", "hardware.peak_tflops=1"]
TMP = ".orbax-checkpoint-tmp"


def settings(run_dir, corpus, *extra):
    return [x for s in [*TINY, f"data.sources=[{corpus}]", f"run_dir={run_dir}", *extra] for x in ("--set", s)]






def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Tmpfs:
    """A real small file system: `fill` leaves `leave` bytes free with a ballast file, `free` removes it."""

    real = True

    def __init__(self, root: Path):
        self.root, self.ballast = root, root / "ballast"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        todo = self.free_bytes() - leave
        with open(self.ballast, "ab") as f:
            while todo > 0:
                f.write(b"\0" * min(todo, 1 << 20))
                todo -= 1 << 20

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)


class EmulatedDisk:
    """Where no tmpfs can be mounted. Once filled: every checkpoint save fails with ENOSPC (raised by Orbax's JSON
    writer, so the array files of the failed save stay behind in its temporary directory, as on a real disk), and
    os.write to a file under the root writes at most `leave` bytes in all, and nothing while a failed save's
    temporary directory holds the space."""

    real = False

    def __init__(self, root: Path, monkeypatch):
        from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

        self.root, self.filled, self.budget = root, False, 0
        real_write, real_save = os.write, jh.JsonCheckpointHandler._save_fn

        def write(fd, data):
            if not self.filled or not os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                return real_write(fd, data)
            if self.budget <= 0 or any(root.rglob(f"*{TMP}*")):
                raise OSError(errno.ENOSPC, "No space left on device")
            n = real_write(fd, bytes(data)[:self.budget])
            self.budget -= n
            return n

        async def save(handler, x, directory):
            if self.filled:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await real_save(handler, x, directory)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", save)

    def fill(self, leave: int) -> None:
        self.filled, self.budget = True, leave

    def free(self) -> None:
        self.filled = False


@pytest.fixture
def disk(tmp_path, monkeypatch):
    root = tmp_path / "disk"
    root.mkdir()
    mounted = False
    if not os.environ.get("CHIPWISE_EMULATE_FULL_DISK") and os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)],
                                 capture_output=True).returncode == 0
    try:
        yield Tmpfs(root) if mounted else EmulatedDisk(root, monkeypatch)
    finally:
        if mounted and subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], check=True)  # busy: detach it now, freed when unused


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "string.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                 "colorsys.py", "keyword.py", "queue.py", "sched.py", "this.py", "token.py", "abc.py"):
        shutil.copy(stdlib / name, root / name)
    # The runs here share one persistent compilation cache (runs with the same shapes and steps compile once).
    previous = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                 "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", previous["jax_compilation_cache_dir"]  # conftest's, if set
                      or str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield root
    for key, value in previous.items():
        jax.config.update(key, value)


def tfrecords(path: Path) -> int:
    """The number of whole TFRecords in an event file; fails on a torn one."""
    data, at, n = path.read_bytes(), 0, 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        at, n = at + 12 + length + 4, n + 1
        assert at <= len(data), f"{path.name} ends in a torn record"
    return n


def test_metrics_pause_with_one_warning_and_resume(disk):
    """metrics.jsonl and TensorBoard: a full disk drops records (counted), warns once, says when writing resumed."""
    import io

    from rich.console import Console

    from chipwise.run_dir import RunDir
    from chipwise.train.metrics import MetricsWriter

    run_dir, out = RunDir(disk.root / "run"), io.StringIO()
    run_dir.location.mkdir()
    writer = MetricsWriter(run_dir, Console(file=out, width=400), total_steps=12, start_step=0)
    for step in (1, 2):
        writer.write({"step": step, "loss": 5.0})
    size = run_dir.metrics_file.stat().st_size
    disk.fill(leave=2048)  # room for part of the next record only: a partial write, cut back
    writer.write({"step": 3, "event": "checkpoint_failed", "reason": "x" * 12000})
    for step in range(4, 8):  # records larger than a page: a full tmpfs has no room for them in a file's last page
        writer.write({"step": step, "loss": 4.0, **{f"number_{i}": float(i) for i in range(300)}})
    assert run_dir.metrics_file.stat().st_size == size  # the half-written record was cut back
    disk.free()
    for step in range(8, 10):
        writer.write({"step": step, "loss": 3.0})
    writer.close()
    text = flat(out.getvalue())

    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning: cannot write")]
    # once for the outage: not per record, nor again when TensorBoard (no numbers at step 3) fails at step 4
    assert len(warnings) == 1 and "No space left on device" in warnings[0], text
    assert "cannot write metrics.jsonl (" in warnings[0] and "from step 3 on" in warnings[0]
    assert text.count("metrics logging resumed at step 8") == 1
    assert "metrics.jsonl: 5 records (steps 3-7)" in text and "TensorBoard events: 4 records (steps 4-7)" in text
    assert writer.jsonl.lost == 5 and writer.tb.lost == 4
    logged = [json.loads(line) for line in run_dir.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 8, 9]  # every line whole
    (events,) = run_dir.tensorboard_dir.glob("events.out.tfevents.*")
    assert tfrecords(events) == 1 + 4  # the file header and steps 1, 2, 8, 9
    fault(f"metrics writes on a full {'tmpfs' if disk.real else 'disk (emulated)'}: {warnings[0]} / "
          f"{text[text.index('metrics logging resumed'):]}")


def test_full_disk_run_keeps_training_and_the_last_good_checkpoint(disk, corpus, monkeypatch, capsys):
    """keep_checkpoints=1, a checkpoint every 13 steps to step 52. Once checkpoint 13 is on disk the disk is filled
    to the last byte, so the saves at 26 and 39 fail and the metrics stop fitting; before the save at 52 the space
    is given back (as an operator would), so logging resumes and that save succeeds."""
    from chipwise.train.checkpoint import Checkpoints

    run = disk.root / "run"
    ckpts, real_save, seen = run / "checkpoints", Checkpoints.save, {}

    def save(self, step, *args, **kwargs):
        if step == 26:
            assert self.wait()  # checkpoint 13 is on disk
            disk.fill(leave=0)
        if step == 52:
            self.wait()  # a failure of the save at 39 in the background surfaces here (a tmpfs fails it at once)
            seen["before freeing"] = sorted(p.name for p in ckpts.iterdir())
            seen["verify 13"] = self.verify(13)
            disk.free()
        seen[step] = real_save(self, step, *args, **kwargs)
        return seen[step]

    monkeypatch.setattr(Checkpoints, "save", save)
    args = settings(run, corpus, "train.steps=52", "train.checkpoint_every=13", "train.keep_checkpoints=1")
    assert main(["train", *args]) == 0
    raw = capsys.readouterr().out
    out = flat(raw)
    monkeypatch.undo()

    assert "step 52 loss" in out  # trained to the end
    failed = [int(x.split()[0]) for x in out.split("checkpoint at step ")[1:] if x.split()[1] == "FAILED"]
    assert failed == [26, 39], out
    assert out.count("(latest good: 13)") == 2 and "latest good: none" not in out
    # Two failed saves with keep_checkpoints=1 later: the only good checkpoint intact, nothing of theirs left
    assert seen["before freeing"] == ["13"] and seen["verify 13"] is None, seen
    # Every save was started: none was refused by an error the failed one before it left in Orbax
    assert all(seen[s] for s in (13, 26, 39, 52)), seen
    assert sorted(p.name for p in ckpts.iterdir()) == ["52"]  # 13 went only once 52 was published
    ckpt = Checkpoints(ckpts, keep=1)
    assert ckpt.verify(52) is None and (ckpts / "52" / "chipwise_checksums.json").is_file()
    ckpt.close()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # all whole
    # Each outage: one warning, then one line when writing resumed (the space a failed save's removal frees can
    # end an outage until the next save fills the disk again), never a line per lost record.
    lines = raw.splitlines()
    pauses = [i for i, line in enumerate(lines) if line.startswith("warning: cannot write")]
    resumes = [i for i, line in enumerate(lines) if line.startswith("metrics logging resumed")]
    assert 1 <= len(pauses) <= len(failed) + 1 and "No space left on device" in lines[pauses[0]], out
    assert len(resumes) == len(pauses) and all(p < r for p, r in zip(pauses, resumes)), out  # all resumed
    assert "still not being written" not in out
    lost = [lines[r].split("lost while paused: ")[1] for r in resumes]
    # A failure reported while metrics.jsonl was writing is in it; one reported during an outage is among the
    # records lost (unless its own record is the write that ended the outage).
    events = [r["step"] for r in records if r.get("event") == "checkpoint_failed"]
    for s in failed:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"checkpoint at step {s} FAILED"))
        assert s in events or any(p < at < r for p, r in zip(pauses, resumes)), (s, events)
    assert set(events) <= set(failed) and len(events) == len(set(events))
    for events_file in (run / "tensorboard").glob("events.out.tfevents.*"):
        tfrecords(events_file)
    fault(f"{'8 MB tmpfs' if disk.real else 'emulated disk'} filled to the last byte after checkpoint 13 "
          f"(keep_checkpoints=1): saves {failed} failed, each reported with '(latest good: 13)'; checkpoint 13 "
          f"intact and verified, no temporary directory left; {len(pauses)} metrics outage(s), the first: "
          f"'{flat(lines[pauses[0]])}', lost while paused: {lost}; checkpoint_failed events {events}; save 52 "
          f"succeeded and only then replaced 13; exit 0 after step 52")


def test_a_checkpoint_without_checksums_is_restored_with_a_warning(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *settings(run, corpus, "train.steps=5", "train.checkpoint_every=5")]) == 0
    (run / "checkpoints" / "5" / "chipwise_checksums.json").unlink()  # as an older chipwise or a full disk left it
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.steps=6"]) == 0
    out = flat(capsys.readouterr().out)
    note = ("checkpoint at step 5 has no chipwise_checksums.json (written by an older chipwise, or its checksum "
            "write failed): restoring it unverified")
    assert out.count(note) == 1 and "resumed from step 5" in out
    fault(f"checkpoint 5 without its checksum file: '{note}', resumed from step 5")
