"""Checkpoint checksums (train/integrity.py): per-process manifests of xxh3_128 digests hashed off the caller's
thread, damage of every kind found on restore (the checkpoint set aside, the one before it used), the shares of a
multi-process checkpoint checked separately, and checkpoints of the older sha256 format still verified."""

import hashlib
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xxhash
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chipwise.train import integrity
from chipwise.train.checkpoint import Checkpoints, abstract_like


def tiny_state(seed: int):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    split, whole = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P())
    rng = np.random.default_rng(seed)
    return {"params": {"w": jax.device_put(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), split),
                       "b": jax.device_put(jnp.asarray(rng.normal(size=(32,)), jnp.float32), whole)},
            "mu": {"w": jax.device_put(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), split)},
            "step": jax.device_put(jnp.int32(seed), whole)}


@pytest.fixture
def saved(tmp_path):
    """Checkpoints at steps 1 and 2 of a tiny sharded state, and the log lines of the Checkpoints object."""
    lines = []
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=3, log=lines.append)
    states = {}
    for step in (1, 2):
        states[step] = tiny_state(step)
        assert ckpt.save(step, states[step], {"step": step})
        assert ckpt.wait()
    yield ckpt, states, lines
    ckpt.close()


def restore_latest(ckpt, states):
    shardings = jax.tree.map(lambda x: x.sharding, states[1])
    return ckpt.restore_latest(abstract_like(states[1], shardings))


def largest_data_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("ocdbt.process_0/d/*")), key=lambda p: p.stat().st_size)


def test_each_checkpoint_carries_a_manifest_hashed_off_the_callers_thread(tmp_path, monkeypatch):
    threads, real = [], integrity.digest_files

    def recording(root, names, **options):
        threads.append(threading.current_thread().name)
        return real(root, names, **options)

    monkeypatch.setattr(integrity, "digest_files", recording)
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2, log=print)
    assert ckpt.save(5, tiny_state(5), {"step": 5}) and ckpt.wait()
    step_dir = tmp_path / "checkpoints" / "5"
    manifest = json.loads((step_dir / integrity.MANIFEST).read_text())
    assert (manifest["format"], manifest["hash"], manifest["processes"], manifest["process"]) == (2, "xxh3_128", 1, 0)
    on_disk = sorted(str(p.relative_to(step_dir)) for p in step_dir.glob("*/**/*") if p.is_file())
    assert sorted(manifest["files"]) == on_disk  # every file of the items, shared metadata and data alike
    assert all(size == (step_dir / name).stat().st_size for name, (size, _) in manifest["files"].items())
    assert threads and threading.main_thread().name not in threads  # Orbax's background thread hashed them
    assert ckpt.verify(5) is None
    ckpt.close()


@pytest.mark.parametrize("damage, expected", [
    ("flip", "does not match its checksum"),
    ("truncate", "does not match its checksum ("),
    ("missing", "is missing"),
    ("metadata", "state/_METADATA does not match its checksum"),
])
def test_damage_is_found_and_the_checkpoint_before_it_restored(saved, damage, expected):
    ckpt, states, lines = saved
    step_dir = ckpt.directory / "2"
    victim = step_dir / "state" / "_METADATA" if damage == "metadata" else largest_data_file(step_dir)
    data = bytearray(victim.read_bytes())
    if damage in ("flip", "metadata"):
        data[len(data) // 2] ^= 0x01  # one bit, same size
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        victim.unlink()
    problem = ckpt.verify(2)
    assert problem is not None and expected in problem and "\n" not in problem, problem
    step, state, meta = restore_latest(ckpt, states)
    assert step == 1 and meta["step"] == 1
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state, states[1])
    assert (ckpt.aside / "2-damaged").is_dir() and ckpt.all_steps() == [1]  # moved aside, not deleted
    assert any("checkpoint at step 2 is damaged" in line and expected in line for line in lines), lines


def test_a_checkpoint_without_checksums_is_restored_unverified(saved):
    ckpt, states, lines = saved
    (ckpt.directory / "2" / integrity.MANIFEST).unlink()
    assert ckpt.verify(2) is None and ckpt.verify(2) is None
    step, _, _ = restore_latest(ckpt, states)
    assert step == 2
    assert sum("has no chipwise_checksums.json" in line and "restoring it unverified" in line
               for line in lines) == 1


def test_checkpoints_with_the_older_sha256_checksums_are_still_verified(saved):
    ckpt, states, lines = saved
    step_dir = ckpt.directory / "2"
    # exactly what chipwise wrote before per-process manifests: the sha256 of every file of the items
    digests = {str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(step_dir.glob("*/**/*")) if p.is_file()}
    (step_dir / integrity.MANIFEST).write_text(json.dumps({"sha256": digests}, indent=0))
    assert ckpt.verify(2) is None and not lines
    victim = largest_data_file(step_dir)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x80
    victim.write_bytes(bytes(data))
    assert ckpt.verify(2) == f"{victim.relative_to(step_dir)} does not match its checksum"
    data[-1] ^= 0x80
    victim.write_bytes(bytes(data))
    step, state, _ = restore_latest(ckpt, states)
    assert step == 2
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state, states[2])


def fake_two_process_step(root):
    """The layout two processes leave (Orbax with OCDBT), with made-up contents, as each process sees it when
    its own writes are done: the items still in their temporary directories, the shared files not yet written."""
    own = {"state/ocdbt.process_0/d/aa": os.urandom(3000), "state/ocdbt.process_0/manifest.ocdbt": b"m0",
           "state/ocdbt.process_1/d/bb": os.urandom(3000), "state/ocdbt.process_1/manifest.ocdbt": b"m1",
           "state/array_metadatas/process_0": b"a0", "state/array_metadatas/process_1": b"a1"}
    shared = {"state/_METADATA": b"{}", "state/manifest.ocdbt": b"root", "meta/metadata": b"{\"step\": 3}"}
    for name, data in own.items():
        path = root / name.replace("state/", "state.orbax-checkpoint-tmp/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return own, shared


def finalize(root, shared):
    (root / "state.orbax-checkpoint-tmp").rename(root / "state")
    for name, data in shared.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_each_process_checks_its_own_share(tmp_path):
    step_dir = tmp_path / "3.orbax-checkpoint-tmp"
    own, shared = fake_two_process_step(step_dir)
    # process 1 at Orbax's barrier after the writes: its files, named as they will be once published
    mine = integrity.item_files(step_dir, 1, explicit=True)
    assert mine == {n: n.replace("state/", "state.orbax-checkpoint-tmp/") for n in
                    ["state/array_metadatas/process_1", "state/ocdbt.process_1/d/bb",
                     "state/ocdbt.process_1/manifest.ocdbt"]}
    assert list(integrity.item_files(step_dir, 0, explicit=True)) == ["state/array_metadatas/process_0",
                                                                       "state/ocdbt.process_0/d/aa",
                                                                       "state/ocdbt.process_0/manifest.ocdbt"]
    integrity.write_manifest(step_dir, 1, integrity.digest_files(step_dir, mine))
    finalize(step_dir, shared)  # process 0: the items renamed, the shared files written; then its manifest
    assert sorted(integrity.item_files(step_dir)) == sorted({**own, **shared})
    integrity.write_manifest(step_dir, 0, integrity.digest_files(step_dir, integrity.item_files(step_dir, 0)),
                             processes=2)
    step_dir = step_dir.rename(tmp_path / "3")
    checks = {(i, n): integrity.verify_part(step_dir, i, n) for i, n in ((0, 1), (0, 2), (1, 2), (0, 3), (2, 3))}
    assert set(checks.values()) == {None}

    victim = step_dir / "state/ocdbt.process_1/d/bb"
    data = bytearray(victim.read_bytes())
    data[1234] ^= 0x10
    victim.write_bytes(bytes(data))
    # restored by two processes: process 1 finds it, process 0 never reads process 1's files
    assert integrity.verify_part(step_dir, 1, 2) == "state/ocdbt.process_1/d/bb does not match its checksum"
    assert integrity.verify_part(step_dir, 0, 2) is None
    assert integrity.verify_part(step_dir, 0, 1) == "state/ocdbt.process_1/d/bb does not match its checksum"

    (step_dir / "chipwise_checksums.process_1.json").unlink()
    assert integrity.verify_part(step_dir, 1, 2) == "chipwise_checksums.process_1.json is missing"
    assert integrity.verify_part(step_dir, 0, 1) == "chipwise_checksums.process_1.json is missing"
    (step_dir / integrity.MANIFEST).write_text("{not json")
    assert integrity.verify_part(step_dir, 0, 1).startswith("unreadable checksums: JSONDecodeError")


def test_a_file_larger_than_a_piece_is_hashed_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "CHUNK", 1000)
    data = bytearray(os.urandom(3500))
    (tmp_path / "big").write_bytes(bytes(data))
    (tmp_path / "empty").write_bytes(b"")
    got = integrity.digest_files(tmp_path, ["big", "empty"])
    pieces = b"".join(xxhash.xxh3_128(bytes(data[i:i + 1000])).digest() for i in range(0, 3500, 1000))
    assert got["big"] == [3500, xxhash.xxh3_128(pieces).hexdigest()]
    assert got["empty"] == [0, xxhash.xxh3_128(b"").hexdigest()]
    data[2500] ^= 0x01  # a bit in the third piece
    (tmp_path / "big").write_bytes(bytes(data))
    assert integrity.digest_files(tmp_path, ["big"])["big"][1] != got["big"][1]
