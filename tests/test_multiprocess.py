"""Training as several processes on JAX's distributed runtime, started by `chipwise launch` (gloo on 127.0.0.1).

Two processes of 4 CPU devices must train exactly like one process of 8, write one set of run files and one
checkpoint that a single process restores; and when one process dies the other must be stopped, not left
waiting in a collective.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from chipwise.cli import main
from chipwise.run_dir import RunDir
from chipwise.sharding import make_mesh, use_mesh
from chipwise.train.checkpoint import abstract_like
from chipwise.train.step import build_steps

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

SETTINGS = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.d_ff=64",
            "model.vocab_size=320", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=8",
            "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1", "train.warmup_steps=1",
            "train.dtype=float32"]


def train_args(run_dir, corpus, steps, checkpoint_every):
    items = [*SETTINGS, f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every}",
             f"data.sources=[{corpus}]", f"run_dir={run_dir}"]
    return ["train", *[x for s in items for x in ("--set", s)]]


def launch_cmd(processes, devices, *rest):
    return [sys.executable, "-m", "chipwise", "launch", "--processes", str(processes), "--devices-per-process",
            str(devices), *rest]


def train_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def restored_params(run_dir, step):
    """The checkpoint's parameters, restored by this single process onto its 8-device mesh."""
    cfg = RunDir(run_dir).read_config()
    mesh = make_mesh(cfg.mesh, jax.devices())
    with use_mesh(mesh):
        steps = build_steps(cfg, mesh, attend=None, compute_dtype=np.float32)  # nothing is run, only restored
        ckpt = RunDir(run_dir).checkpoints(2)
        found, state, meta = ckpt.restore_latest(abstract_like(jax.eval_shape(steps.init), steps.state_shardings),
                                                 move_damaged=False)
        ckpt.close()
    assert found == step
    return jax.tree.map(np.asarray, state["params"]), meta


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, corpus):
    """A run trained by two processes of 4 devices: 10 steps, checkpoints at 5 and 10; (its directory, the launch's
    result). Tests read it; one that changes it works on a copy."""
    root = tmp_path_factory.mktemp("two-processes")
    env = {**os.environ, "CHIPWISE_CACHE": str(root / "cache")}  # conftest's per-test cache is not set yet
    done = subprocess.run(launch_cmd(2, 4, "--", "chipwise", *train_args(root / "run", corpus, 10, 5)),
                          capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", done


def test_two_processes_train_like_one(tmp_path, corpus, two_processes, monkeypatch):
    one, (two, done) = tmp_path / "one", two_processes
    monkeypatch.setenv("CHIPWISE_CACHE", str(two.parent / "cache"))  # the same tokenizer and tokens
    assert main(train_args(one, corpus, 10, 10)) == 0  # this process: 8 devices (conftest)
    assert done.stdout.count("chipwise run summary") == 1  # process 1 prints nothing of its own

    a, b = train_records(one), train_records(two)
    assert [r["step"] for r in b] == list(range(1, 11))  # written once, by process 0 alone
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=0, atol=1e-5)

    # Throughput counts the tokens of the whole global batch and every chip of both processes.
    info = json.loads((two / "run_info.json").read_text())
    assert info["devices"].startswith("8 x ") and info["chips"] == 2
    assert {d["process"] for d in info["provenance"]["device_list"]} == {0, 1}
    for r in b:
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_time_s"])
    summary = json.loads((two / "summary.json").read_text())
    assert summary["tokens"] == 10 * 8 * 32 and summary["mfu"] > 0

    # The two processes' checkpoint restores in one process, with another device layout per process, and
    # holds what the one-process run trained.
    got, meta = restored_params(two, 10)
    want, _ = restored_params(one, 10)
    assert meta["data_iterator"]["step"] == 10
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-5), got, want)

    # Each process hashed the files it wrote (train/integrity.py), and this process's restore verified both parts.
    step_dir = two / "checkpoints" / "10"
    top = json.loads((step_dir / "chipwise_checksums.json").read_text())
    other = json.loads((step_dir / "chipwise_checksums.process_1.json").read_text())
    assert (top["processes"], other["process"], other["hashed_by"]) == (2, 1, 1)
    assert any("ocdbt.process_1/" in name for name in other["files"])
    assert all("process_1" in name for name in other["files"])
    assert not any("process_1" in name for name in top["files"]) and any("ocdbt.process_0/" in n for n in top["files"])


def test_a_damaged_part_found_by_one_process_sets_the_checkpoint_aside_on_all(tmp_path, two_processes):
    """Resumed by two processes, each checks the files its counterpart wrote; a bit flipped in process 1's part
    is found there, and both processes agree to set the checkpoint aside and resume from the one before it."""
    run = tmp_path / "run"
    shutil.copytree(two_processes[0], run)  # the shared run stays as it was
    victim = max((run / "checkpoints" / "10" / "state").glob("ocdbt.process_1/d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    done = subprocess.run(launch_cmd(2, 4, "--", "chipwise", "train", "--resume", str(run), "--set",
                                     "train.steps=11"), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    name = victim.relative_to(run / "checkpoints" / "10")
    assert f"checkpoint at step 10 is damaged ({name} does not match its checksum)" in done.stdout, done.stdout
    assert "resumed from step 5" in done.stdout
    assert (run / "checkpoints_set_aside" / "10-damaged").is_dir()
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [5, 10, 11]  # 10: saved again


class Launched:
    """`chipwise launch` in the background, its output read line by line (stdout and stderr together)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(launch_cmd(2, 4, "--grace", "3", "--", "chipwise", *args), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # lines as they are printed
        self.pids, self.lines = {}, []

    def wait_for(self, pattern: str) -> re.Match:
        while line := self.proc.stdout.readline():  # bounded by the test's timeout
            self.lines.append(line)
            if m := re.search(r"process (\d) of 2 is pid (\d+)", line):
                self.pids[int(m[1])] = int(m[2])
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"never saw {pattern!r}:\n{''.join(self.lines)[-3000:]}")

    def finish(self) -> str:
        try:
            rest = self.proc.communicate(timeout=90)[0]  # bounded: the launcher kills stragglers after 3 s
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return "".join(self.lines) + rest


@pytest.mark.timeout(400)
def test_sigterm_saves_everywhere_and_a_dead_process_stops_the_others(tmp_path, corpus):
    run = tmp_path / "run"
    # SIGTERM (a preemption) while training: both processes save at the same step and exit 143.
    first = Launched(*train_args(run, corpus, 100000, 100000))
    first.wait_for(r"step +3  loss")
    first.proc.send_signal(signal.SIGTERM)
    out = first.finish()
    assert first.proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    saved = re.findall(r"SIGTERM after step (\d+): checkpoint saved at step (\d+)", out)
    assert saved and all(a == b == saved[0][0] for a, b in saved), out[-3000:]  # every process: the same step
    step = int(saved[0][0])

    # Resumed on two processes, one of them dies mid-run: the launcher stops the other and reports it.
    second = Launched("train", "--resume", str(run))
    second.wait_for(f"resumed from step {step}")
    os.kill(second.pids[1], signal.SIGKILL)
    out = second.finish()
    assert second.proc.returncode == 128 + signal.SIGKILL, out[-3000:]
    assert "process 1 failed (killed by SIGKILL); stopping the other 1 process(es)" in out
    for pid in second.pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
