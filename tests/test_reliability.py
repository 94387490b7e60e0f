"""Faults injected into real training runs: kills, preemption signals, damaged and failed checkpoints, NaNs,
incompatible resumes and other device counts. Each test reports what it observed through `fault()`;
docs/reliability.md records those reports.

Killed runs are real `python -m chipwise train` subprocesses; they share one persistent JAX compilation cache so
each pays only its start-up. One uninterrupted reference run (module fixture) is what everything is compared with.
"""

import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from chipwise.cli import main
from conftest import fault, flat
from chipwise.config import load_config, to_dict
from chipwise.errors import ConfigError

pytestmark = pytest.mark.slow

STEPS = 60
TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.d_ff=64",
        "model.vocab_size=320", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1", "train.warmup_steps=1",
        "train.checkpoint_every=7", "train.keep_checkpoints=2", "train.keep_every=21", "mesh.fsdp=2",
        "hardware.peak_tflops=1"]  # a given peak: no matmul measurement at start-up


def settings(run_dir, corpus, *extra):
    return [x for s in [*TINY, f"data.sources=[{corpus}]", f"run_dir={run_dir}", *extra] for x in ("--set", s)]


@contextmanager
def only_one_worker(marker: Path):
    """Run the body once per test session, whichever xdist worker gets here first; the others wait for it.

    (`make test` hands each module to one worker, `--dist loadfile`; this keeps the module right under any other
    distribution too, e.g. `-n 2` alone.)"""
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker.with_name(marker.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield marker.exists()
            marker.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "reliability"
    corpus = root / "corpus"
    with only_one_worker(root / "corpus.done") as done:
        if not done:
            corpus.mkdir(parents=True, exist_ok=True)
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            for name in ("textwrap.py", "shlex.py", "string.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                         "colorsys.py", "keyword.py", "queue.py", "sched.py", "this.py", "token.py", "abc.py"):
                shutil.copy(stdlib / name, corpus / name)
    env = {**os.environ, "CHIPWISE_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # conftest's cache, if it set one
    # In-process runs (those that monkeypatch or read the console) use the same compilation cache as the
    # subprocesses: a run with the reference's settings then compiles nothing.
    previous = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                 "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield {"root": root, "corpus": corpus, "env": env}
    for key, value in previous.items():
        jax.config.update(key, value)


def chipwise(shared, args, devices=8, **kw):
    env = {**shared["env"], "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "chipwise", "train", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in read_metrics(run_dir):
        if "loss" in r and "event" not in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def saved_state(run_dir, step):
    """A checkpoint's full train state as numpy, read onto one device whatever mesh saved it."""
    path = Path(run_dir) / "checkpoints" / str(step) / "state"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)
        return jax.tree.map(np.asarray, c.restore(path, target))


def checkpoint_steps(run_dir):
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(shared):
    """The uninterrupted run: 60 steps, 8 simulated devices (data 4 x fsdp 2)."""
    run = shared["root"] / "reference"
    with only_one_worker(shared["root"] / "reference.done") as done:
        if not done:
            proc = chipwise(shared, settings(run, shared["corpus"], f"train.steps={STEPS}"))
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    return run


def test_retention_keeps_the_last_k_plus_every_mth(reference):
    # saves at 7, 14, ..., 56 and the final 60; keep the last 2 plus multiples of 21
    assert checkpoint_steps(reference) == [21, 42, 56, 60]
    assert sorted(set(step_losses(reference))) == list(range(1, STEPS + 1))


def wait_for_step(proc, run_dir, offset, target) -> int:
    """Poll metrics.jsonl (written by `proc` from byte `offset` on) until it logs a step >= target."""
    path, seen = Path(run_dir) / "metrics.jsonl", 0
    while proc.poll() is None:
        if path.exists():
            with open(path) as f:
                f.seek(offset)
                steps = [json.loads(line)["step"] for line in f.read().split("\n")[:-1] if '"loss"' in line]
            seen = max(steps, default=seen)
            if seen >= target:
                return seen
        time.sleep(0.005)
    out, err = proc.communicate()
    raise AssertionError(f"the run ended (rc {proc.returncode}) before step {target}: {err[-2000:]}")


def test_killed_and_preempted_run_ends_bitwise_identical(shared, reference):
    """SIGKILL three times, SIGTERM and SIGINT once each, at random steps; resume after each."""
    seed = int(os.environ.get("CHIPWISE_FAULT_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    fault(f"kill/preempt chain seed {seed} (CHIPWISE_FAULT_SEED replays it)")
    run = shared["root"] / "chain"
    signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL]
    last = 0  # the last step the previous run logged
    for i, sig in enumerate(signals):
        target = rng.randint(3 + 11 * i, 9 + 11 * i)
        args = settings(run, shared["corpus"], f"train.steps={STEPS}")
        offset = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0
        proc = chipwise(shared, ["--resume", str(run), *args] if i else args)
        seen = wait_for_step(proc, run, offset, target)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        resumed = [line for line in out.splitlines() if line.startswith("resumed from step")]
        start = int(resumed[0].split()[-1]) if resumed else 0
        if i:
            fault(f"  the next run started at step {start}: {last - start} steps lost and redone")
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            last = max(r["step"] for r in read_metrics(run) if "loss" in r)
            fault(f"SIGKILL once step {seen} was logged (started at {start}); last step logged {last}; "
                  f"checkpoints on disk {checkpoint_steps(run)}")
        else:
            assert proc.returncode == 128 + sig, err[-2000:]
            line = [x for x in err.splitlines() if x.startswith("stopped:")][-1]
            saved = int(line.split("checkpoint saved at step ")[1].split(";")[0])
            # it finished the steps already dispatched, then saved: no further
            assert seen <= saved <= seen + 5, line
            assert saved in checkpoint_steps(run) and (run / "checkpoints" / str(saved) /
                                                       "chipwise_checksums.json").is_file()
            fault(f"{sig.name} once step {seen} was logged (started at {start}): exit {proc.returncode}, "
                  f"checkpoint at step {saved}; message: {line}")
            last = saved
    proc = chipwise(shared, ["--resume", str(run)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    start = int([x for x in out.splitlines() if x.startswith("resumed from step")][0].split()[-1])
    fault(f"  the final run started at step {start}: {last - start} steps lost and redone; it ran to step "
          f"{STEPS} and exited 0")

    ref, got = step_losses(reference), step_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    redone = {s: v for s, v in got.items() if len(v) > 1}
    for s in range(1, STEPS + 1):  # every step, including each one run twice around a kill, is the same
        assert set(got[s]) == {ref[s][0]}, (s, got[s], ref[s])
    fault(f"{len(redone)} steps were run twice (lost to kills and redone); every loss equal to the reference, "
          f"bit for bit")
    a, b = saved_state(reference, STEPS), saved_state(run, STEPS)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)  # params, optimizer moments, step, PRNG key
    assert not list((run / "checkpoints").glob("*tmp*"))  # nothing half-written left behind


@pytest.mark.parametrize("devices,mesh", [(1, "mesh.fsdp=1"), (4, "mesh.fsdp=2")])
def test_resume_on_another_device_count(shared, reference, tmp_path, devices, mesh):
    """A checkpoint saved by 8 devices (data 4 x fsdp 2) continues on 1 device and on 4 (data 2 x fsdp 2)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "60")  # resume from step 56, saved on 8 devices
    proc = chipwise(shared, ["--resume", str(run), "--set", mesh], devices=devices)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from step 56" in out
    info = json.loads((run / "run_info.json").read_text())
    assert info["devices"].startswith(f"{devices} x")
    ref, got = step_losses(reference), step_losses(run)
    for s in range(57, STEPS + 1):  # other reduction orders: equal to rounding, not bit for bit
        np.testing.assert_allclose(got[s][-1], ref[s][0], rtol=1e-5)
    a, b = saved_state(reference, STEPS), saved_state(run, STEPS)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    fault(f"8-device checkpoint (step 56) resumed on {devices} device(s), mesh {info['mesh']}: losses at steps "
          f"57-60 within {max(abs(got[s][-1] - ref[s][0]) for s in range(57, 61)):.1e} of the 8-device run")


def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(shared, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    data_files = sorted((run / "checkpoints" / "60" / "state").rglob("ocdbt.process_0/d/*"))
    victim = max(data_files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    (run / "checkpoints" / "63.orbax-checkpoint-tmp").mkdir()  # a save cut short by a kill
    assert main(["train", "--resume", str(run)]) == 0
    out = flat(capsys.readouterr().out)
    assert "checkpoint at step 60 is damaged" in out and "does not match its checksum" in out
    assert "resumed from step 56" in out
    assert (run / "checkpoints_set_aside" / "60-damaged").is_dir()  # kept for inspection, not deleted
    assert not (run / "checkpoints" / "63.orbax-checkpoint-tmp").exists()
    ref, got = step_losses(reference), step_losses(run)
    assert [got[s][-1] for s in range(57, 61)] == [ref[s][0] for s in range(57, 61)]
    a, b = saved_state(reference, STEPS), saved_state(run, STEPS)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    note = out[out.index("checkpoint at step 60 is damaged"):].split("one before it")[0]
    fault(f"truncated {victim.relative_to(run)} of checkpoint 60 to half: {note}one before it; "
          f"redid steps 57-60, identical to the reference")


def test_incompatible_resume_is_one_line_and_touches_nothing(shared, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other_corpus = tmp_path / "other"
    other_corpus.mkdir()
    shutil.copy(shared["corpus"] / "textwrap.py", other_corpus)
    cases = [(["--set", "model.d_model=64"], "checkpoint has model.d_model=32, config has 64"),
             (["--set", "model.vocab_size=384"], "checkpoint has model.vocab_size=320, config has 384"),
             (["--set", f"data.sources=[{other_corpus}]"], "checkpoint was trained with tokenizer")]
    for extra, expected in cases:
        assert main(["train", "--resume", str(run), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
        fault(f"resume with {' '.join(extra[1::2])}: exit 2, {err}")
    # Rerunning the original command with --resume, after editing the model in its config file
    changed = to_dict(load_config(None, [*TINY, f"data.sources=[{shared['corpus']}]", f"run_dir={run}",
                                         "model.num_layers=2"]))
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    assert main(["train", "--config", str(tmp_path / "changed.yaml"), "--resume"]) == 2
    assert "checkpoint has model.num_layers=1, config has 2" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


# The failed-save and NaN runs share these settings (the injected NaNs are an input of the compiled step, not a
# constant in it), so the second one reuses the first one's compilation.
SHORT = ["train.steps=14", "train.checkpoint_every=4", "train.keep_checkpoints=3", "train.keep_every=0",
         "train.max_bad_steps=3", "train.max_rollbacks=1"]


def test_failed_saves_are_reported_and_training_goes_on(shared, tmp_path, monkeypatch, capsys):
    """Saves at steps 8 (disk full) and 12 (permission denied) fail inside Orbax's background write."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    real = jh.JsonCheckpointHandler._save_fn
    failures = {8: OSError(errno.ENOSPC, "No space left on device"), 12: PermissionError(errno.EACCES,
                                                                                          "Permission denied")}

    async def failing(self, x, directory):
        if isinstance(x, dict) and x.get("step") in failures:
            raise failures[x["step"]]
        return await real(self, x, directory)

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", failing)
    run = tmp_path / "run"
    args = settings(run, shared["corpus"], *SHORT)
    assert main(["train", *args]) == 0
    out = flat(capsys.readouterr().out)
    events = [r for r in read_metrics(run) if r.get("event") == "checkpoint_failed"]
    assert [(r["step"], "No space" in r["reason"] or "Permission" in r["reason"]) for r in events] == \
        [(8, True), (12, True)]
    assert "checkpoint at step 8 FAILED" in out and "training continues" in out
    assert checkpoint_steps(run) == [4, 14]  # the failed ones never appeared; 4 survived both
    assert max(step_losses(run)) == 14
    monkeypatch.undo()
    from chipwise.run_dir import RunDir

    ckpt = RunDir(run).checkpoints(3)
    assert ckpt.verify(4) is None and ckpt.verify(14) is None
    ckpt.close()
    fault(f"saves at steps 8 (ENOSPC) and 12 (EACCES) failed: reported, run reached step 14, checkpoints "
          f"{checkpoint_steps(run)} intact; {[e['reason'] for e in events]}")


def test_nan_steps_are_skipped_then_rolled_back(shared, tmp_path, capsys):
    # data positions 5, 9, 10, 11 are steps 6, 10, 11, 12: one lone bad step, then three in a row
    run = tmp_path / "run"
    args = settings(run, shared["corpus"], *SHORT, "train.inject_nan_batches=[5,9,10,11]")
    assert main(["train", *args]) == 0
    out = flat(capsys.readouterr().out)
    records = read_metrics(run)
    assert [r["step"] for r in records if r.get("event") == "skipped_update"] == [6, 10, 11, 12]
    (rollback,) = [r for r in records if r.get("event") == "rollback"]
    assert (rollback["step"], rollback["from_step"], rollback["data_skipped_batches"]) == (8, 12, 4)
    assert "rolled back to step 8" in out and "update skipped" in out
    last = [r for r in records if "loss" in r and "event" not in r][-1]
    assert last["step"] == 14 and np.isfinite(last["loss"]) and last["skipped_steps"] == 4
    assert last["rollbacks"] == 1
    fault(f"NaN injected at data positions 5, 9, 10, 11: skipped steps "
          f"{[r['step'] for r in records if r.get('event') == 'skipped_update']}, rollback {rollback}, "
          f"final loss {last['loss']:.4f} at step 14")

    # Resumed with more NaNs and no rollback left (the one allowed is used): stops with exit code 3.
    assert main(["train", "--resume", str(run), "--set", "train.steps=24",
                 "--set", "train.inject_nan_batches=[20,21,22]"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("stopped: training diverged") and "\n" not in err
    fault(f"three more NaN batches with no rollback left: exit 3, {err}")


def test_a_non_finite_step_leaves_parameters_and_optimizer_untouched():
    from chipwise.attention import reference as ref_attention
    from chipwise.sharding import make_mesh, use_mesh
    from chipwise.train.step import build_steps

    cfg = load_config(None, [*TINY, "mesh.fsdp=1", "mesh.data=1", "train.warmup_steps=0"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, 320, (8, 33)).astype(np.int32)
    with use_mesh(mesh):
        steps = build_steps(cfg, mesh, ref_attention.attend, jnp.float32)
        before = jax.tree.map(np.asarray, steps.init())
        state, metrics = steps.train(steps.init(), jax.device_put(tokens, steps.batch_sharding), np.float32("nan"))
        after = jax.tree.map(np.asarray, state)
        assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
        for key in ("params", "opt_state"):
            assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before[key]),
                                                            jax.tree.leaves(after[key])))
        assert after["step"] == 1 and not np.array_equal(after["rng"], before["rng"])
        state, metrics = steps.train(state, jax.device_put(tokens, steps.batch_sharding), np.float32(0.0))
        assert float(metrics["finite"]) == 1.0  # a clean step still trains
        changed = jax.tree.map(np.asarray, state["params"])
        assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["params"]),
                                                            jax.tree.leaves(changed)))


def test_loading_never_unpickles(reference, monkeypatch):
    """Checkpoint and tokenizer loading run with every pickle entry point disabled, and no chipwise source
    uses pickle at all."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    from chipwise.data.tokenizer import load_tokenizer
    from chipwise.run_dir import RunDir

    params, _ = RunDir(reference).latest_params(RunDir(reference).read_config())
    assert np.isfinite(np.asarray(jax.tree.leaves(params)[0])).all()
    assert load_tokenizer(str(reference / "tokenizer.json")).get_vocab_size() == 320
    # No code path imports a pickling library or asks for pickles (prose that explains why is fine).
    unsafe = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|cloudpickle)\b|allow_pickle\s*=\s*True|"
                        r"torch\.load\(|pd\.read_pickle", re.MULTILINE)
    src = Path(__file__).parents[1] / "src" / "chipwise"
    for path in src.rglob("*.py"):
        match = unsafe.search(path.read_text())
        assert match is None, f"{path.relative_to(src)} uses {match.group(0).strip()!r}"


def test_new_reliability_settings_are_checked():
    for bad, key in [("train.max_bad_steps=0", "max_bad_steps"), ("train.keep_every=-1", "keep_every"),
                     ("train.inject_nan_batches=[-2]", "inject_nan_batches")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])
