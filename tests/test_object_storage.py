"""Run directories in a bucket: a real S3 API (moto's server, on localhost) behind `run_dir=s3://...`.

Training, a SIGKILL, a preemption (SIGTERM) and resumes in the bucket give the losses of the same run made on a
local disk, bit for bit; a damaged checkpoint in the bucket is found from the store's own checksums and set aside;
export, sample and report read the run from the bucket; a missing bucket, missing credentials and a run
directory in use get one line each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from chipwise.cli import main
from chipwise.errors import ChipwiseError
from conftest import flat

pytestmark = pytest.mark.slow

STEPS = 100
TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.d_ff=64",
        "model.vocab_size=320", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1", "train.warmup_steps=1",
        "train.checkpoint_every=25", "train.keep_checkpoints=2", "mesh.fsdp=2", "hardware.peak_tflops=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server for this module, with bucket `bkt`; the AWS settings as a user would export them."""
    import boto3

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    root = tmp_path_factory.mktemp("object-storage")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "string.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py"):
        (corpus / name).write_bytes((stdlib / name).read_bytes())
    env = {**os.environ, "CHIPWISE_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="bkt")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        import s3fs

        yield {"root": root, "corpus": corpus, "env": env, "fs": s3fs.S3FileSystem(skip_instance_cache=True)}
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def settings(s3, run_dir, *extra):
    return [x for s in [*TINY, f"data.sources=[{s3['corpus']}]", f"run_dir={run_dir}", *extra] for x in ("--set", s)]


def train(s3, args, **kw):
    return subprocess.Popen([sys.executable, "-m", "chipwise", "train", *args], env=s3["env"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def losses(text: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in text.splitlines():
        r = json.loads(line)
        if "loss" in r and "event" not in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def wait_for(fs, key: str, proc, limit=120.0) -> None:
    deadline = time.monotonic() + limit
    while not fs.exists(key):
        fs.invalidate_cache()
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {key} appeared"
        assert time.monotonic() < deadline, f"{key} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(s3):
    """The same 100 steps on a local disk (uninterrupted) and in the bucket (SIGKILLed once its step-25
    checkpoint is published, preempted by SIGTERM after its step-50 one, then resumed to the end)."""
    fs, local = s3["fs"], s3["root"] / "local"
    proc = train(s3, settings(s3, local, f"train.steps={STEPS}"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    remote = "s3://bkt/runs/chain"
    proc = train(s3, settings(s3, remote, f"train.steps={STEPS}"))
    wait_for(fs, "bkt/runs/chain/checkpoints/25/commit_success.txt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert fs.exists("bkt/runs/chain/.chipwise-lock")  # a killed run leaves its lock; the resume takes it over

    proc = train(s3, ["--resume", remote])
    wait_for(fs, "bkt/runs/chain/checkpoints/50/commit_success.txt", proc)
    proc.send_signal(signal.SIGTERM)
    out, preempted = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, preempted[-3000:]
    assert "resumed from step 25" in out or "resumed from step 50" in out  # the kill may land after 50's save

    proc = train(s3, ["--resume", remote])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return {"local": local, "remote": remote, "preempted": preempted, "last_out": out}


def test_a_bucket_run_survives_kill_and_preemption_with_the_local_runs_losses(s3, runs):
    fs = s3["fs"]
    fs.invalidate_cache()  # listings are cached; the runs wrote from other processes
    line = [x for x in runs["preempted"].splitlines() if x.startswith("stopped:")][-1]
    saved = int(line.split("checkpoint saved at step ")[1].split(";")[0])
    assert 50 <= saved < STEPS and f"chipwise train --resume {runs['remote']}" in line
    assert f"resumed from step {saved}" in runs["last_out"]
    ref = losses((runs["local"] / "metrics.jsonl").read_text())
    got = losses(fs.cat("bkt/runs/chain/metrics.jsonl").decode())
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):  # steps redone after the kill included: the same bits as on a local disk
        assert set(got[s]) == {ref[s][0]}, (s, got[s], ref[s])
    listing = fs.find("bkt/runs/chain")
    steps = sorted({int(p.split("/")[4]) for p in listing if p.split("/")[3] == "checkpoints"})
    assert steps[-1] == STEPS and len(steps) == 2  # keep_checkpoints=2, old ones deleted from the bucket
    for step in steps:  # every published step carries its commit file and its manifest of object checksums
        manifest = json.loads(fs.cat(f"bkt/runs/chain/checkpoints/{step}/chipwise_checksums.json"))
        assert manifest["hash"] == "object" and manifest["files"]
    assert any("/tensorboard/events.out.tfevents" in p for p in listing)
    assert not fs.exists("bkt/runs/chain/.chipwise-lock")  # released at the end


def test_export_sample_and_report_read_the_run_from_the_bucket(s3, runs, tmp_path, capsys):
    for run, out in ((runs["remote"], tmp_path / "from-bucket"), (str(runs["local"]), tmp_path / "from-disk")):
        assert main(["export", "--run", run, "--out", str(out)]) == 0
    a, b = load_file(tmp_path / "from-bucket" / "model.safetensors"), load_file(tmp_path / "from-disk" /
                                                                                 "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # the same trained weights
    assert (tmp_path / "from-bucket" / "tokenizer.json").read_bytes() == (runs["local"] / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["sample", "--run", runs["remote"], "--prompt", "def ", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    remote_text = capsys.readouterr().out
    assert main(["sample", "--run", str(runs["local"]), "--prompt", "def ", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert remote_text == capsys.readouterr().out
    assert main(["report", runs["remote"], "--out", str(tmp_path / "report")]) == 0
    assert "chain" in (tmp_path / "report" / "index.html").read_text()


def test_a_damaged_checkpoint_in_the_bucket_is_set_aside(s3, runs, capsys):
    fs = s3["fs"]
    fs.invalidate_cache()
    fs.copy("bkt/runs/chain", "bkt/runs/damaged", recursive=True)
    objects = fs.find("bkt/runs/damaged/checkpoints/100/state", detail=True)
    victim = max((p for p in objects if "/ocdbt.process_0/d/" in p), key=lambda p: objects[p]["size"])
    fs.pipe_file(victim, fs.cat_file(victim)[: objects[victim]["size"] // 2])  # truncated in place
    assert main(["train", "--resume", "s3://bkt/runs/damaged"]) == 0
    out = flat(capsys.readouterr().out)
    assert "checkpoint at step 100 is damaged" in out and "does not match its checksum" in out
    assert "resumed from step 75" in out
    fs.invalidate_cache()
    assert fs.exists("bkt/runs/damaged/checkpoints_set_aside/100-damaged/state")  # kept, not deleted
    ref = losses((runs["local"] / "metrics.jsonl").read_text())
    got = losses(fs.cat("bkt/runs/damaged/metrics.jsonl").decode())
    assert [got[s][-1] for s in range(76, STEPS + 1)] == [ref[s][0] for s in range(76, STEPS + 1)]


def test_bucket_problems_are_one_line_and_create_nothing(s3, tmp_path, capsys):
    fs = s3["fs"]
    assert main(["train", *settings(s3, "s3://no-such-bucket/run", "train.steps=2")]) == 2
    assert flat(capsys.readouterr().err).strip() == ("error: bucket s3://no-such-bucket does not exist (while "
                                                     "listing the bucket); create it or fix the URI")
    env = {k: v for k, v in s3["env"].items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    proc = subprocess.run([sys.executable, "-m", "chipwise", "train", *settings(s3, "s3://bkt/nocreds",
                                                                                "train.steps=2")],
                          env={**env, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                               "AWS_EC2_METADATA_DISABLED": "true"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    fs.invalidate_cache()
    assert "error: no credentials for s3://bkt" in proc.stderr and "Traceback" not in proc.stderr
    assert not fs.exists("bkt/nocreds")
    assert main(["export", "--run", "s3://no-such-bucket/run", "--out", str(tmp_path / "out")]) == 2
    assert "bucket s3://no-such-bucket does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_run_lock_holds_in_a_bucket(s3, capsys):
    """A run on another host holds s3://bkt/locked (its lock object was just written): a second run is refused
    and changes nothing; once the lock is gone (or stale), the run takes it and releases it at the end."""
    from chipwise.run_dir import RunDir

    fs = s3["fs"]
    fs.pipe_file("bkt/locked/.chipwise-lock", json.dumps({"host": "other-host", "pid": 4242, "start": "1",
                                                          "since": time.time()}).encode())
    with pytest.raises(ChipwiseError, match=r"in use by another chipwise run \(pid 4242 on other-host"):
        RunDir("s3://bkt/locked").prepare(resume=False, overwrite=False)
    assert fs.find("bkt/locked") == ["bkt/locked/.chipwise-lock"]
    fs.rm("bkt/locked/.chipwise-lock")
    run = RunDir("s3://bkt/locked")
    run.prepare(resume=False, overwrite=False)
    held = json.loads(fs.cat("bkt/locked/.chipwise-lock"))
    assert held["pid"] == os.getpid()
    with pytest.raises(FileExistsError):  # the lock is an exclusive create: a conditional PUT refuses a second
        fs.pipe_file("bkt/locked/.chipwise-lock", b"{}", mode="create")
    run.release()
    fs.invalidate_cache()
    assert not fs.exists("bkt/locked/.chipwise-lock")


def test_bucket_errors_name_the_fix():
    from chipwise.storage import bucket_error

    denied = bucket_error(PermissionError("Access Denied"), "s3://b/run", "writing config.yaml")
    assert str(denied) == ("access to s3://b denied while writing config.yaml; grant these credentials read and "
                           "write access to the bucket, or choose another bucket")
    assert "gcloud auth application-default login" in str(bucket_error(
        type("DefaultCredentialsError", (Exception,), {})(), "gs://b/run", "listing the bucket"))


def test_two_processes_train_and_resume_in_a_bucket(s3):
    """Each process writes its own part of every checkpoint into the bucket, with its own manifest, and process 0
    finalizes from a fresh listing (a cached one missed process 1's files on resume, and the save hung)."""
    fs, run = s3["fs"], "s3://bkt/runs/two"
    env = {**s3["env"]}
    env.pop("XLA_FLAGS")
    for args in (settings(s3, run, "train.steps=6", "train.checkpoint_every=3"),
                 ["--resume", run, "--set", "train.steps=9"]):
        done = subprocess.run([sys.executable, "-m", "chipwise", "launch", "--processes", "2", "--devices-per-process",
                               "4", "--", "chipwise", "train", *args], env=env, capture_output=True, text=True,
                              timeout=180)  # about 12 s each; a hung save fails here
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 6" in done.stdout
    fs.invalidate_cache()
    names = fs.find("bkt/runs/two/checkpoints/9")
    assert "bkt/runs/two/checkpoints/9/chipwise_checksums.process_1.json" in names
    assert any("/state/ocdbt.process_1/" in n for n in names) and any("/array_metadatas/process_1" in n for n in names)
