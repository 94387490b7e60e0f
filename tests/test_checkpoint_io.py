"""How checkpoints meet the disk (train/checkpoint.py, train/integrity.py): arrays stored uncompressed unless
train.compress_checkpoints asks for zstd, either kind (and the Standard-handler checkpoints of earlier chipwise)
restored the same, and a save's files dropped from the page cache once hashed."""

import ctypes
import ctypes.util
import json
import mmap
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chipwise.train import integrity
from chipwise.train.checkpoint import Checkpoints, abstract_like


def state_of(w: np.ndarray):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    split, whole = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P())
    return {"params": {"w": jax.device_put(jnp.asarray(w), split)}, "step": jax.device_put(jnp.int32(3), whole)}


def target(state):
    return abstract_like(state, jax.tree.map(lambda x: x.sharding, state))


def data_bytes(step_dir) -> int:
    return sum(p.stat().st_size for p in (step_dir / "state").rglob("d/*") if p.is_file())


def equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_compression_is_a_choice_and_both_restore(tmp_path, compress):
    state = state_of(np.zeros((256, 1024), np.float32))  # 1 MiB that zstd makes almost nothing of
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2, compress=compress)
    assert ckpt.save(3, state, {"step": 3}) and ckpt.wait()
    stored = data_bytes(tmp_path / "checkpoints" / "3")
    assert (stored < 100_000) if compress else (stored >= 256 * 1024 * 4)
    step, back, meta = Checkpoints(tmp_path / "checkpoints", keep=2, compress=not compress).restore_latest(
        target(state))
    assert (step, meta) == (3, {"step": 3})
    equal(back, state)
    ckpt.close()


def test_a_checkpoint_of_orbaxs_standard_handler_still_restores(tmp_path):
    """Earlier chipwise saved the state with StandardSave (always zstd); those checkpoints still resume."""
    state = state_of(np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32))
    old = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "meta"))
    old.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 7})))
    old.wait_until_finished()
    old.close()
    lines = []
    step, back, meta = Checkpoints(tmp_path / "checkpoints", keep=2, log=lines.append).restore_latest(target(state))
    assert (step, meta) == (7, {"step": 7}) and "restoring it unverified" in lines[0]  # no checksums back then
    equal(back, state)
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2, log=lines.append)
    equal(ckpt.restore(7, {"params": target(state)["params"]}, partial=True), {"params": state["params"]})  # export


def test_a_partial_restore_reads_only_what_it_is_asked_for(tmp_path, monkeypatch):
    """Export and sample need the params alone: the optimizer's moments, twice their size, are not read (the
    files of a partial restore's arrays are the only ones tensorstore opens)."""
    import tensorstore as ts

    rng = np.random.default_rng(2)
    state = state_of(rng.normal(size=(64, 32)).astype(np.float32))
    state["opt"] = {"mu": jax.device_put(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                                         state["params"]["w"].sharding)}
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2)
    assert ckpt.save(3, state, {"step": 3}) and ckpt.wait()
    opened, real_open = [], ts.open

    def recording_open(spec, *a, **k):
        opened.append(json.dumps(spec if isinstance(spec, dict) else spec.to_json()))
        return real_open(spec, *a, **k)

    monkeypatch.setattr(ts, "open", recording_open)
    step, back, _ = ckpt.restore_latest({"params": target(state)["params"]}, partial=True)
    assert step == 3 and set(back) == {"params"}
    equal(back["params"], state["params"])
    assert any("params.w" in spec for spec in opened) and not any("opt.mu" in spec for spec in opened), opened
    opened.clear()
    assert set(ckpt.restore(3, target(state))) == {"params", "opt", "step"}  # the whole state still restores
    assert any("opt.mu" in spec for spec in opened)
    ckpt.close()


def resident(path) -> float:
    """The fraction of the file's pages in the page cache (mincore(2) on a mapping that touches none)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, pages = path.stat().st_size, -(-path.stat().st_size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = (ctypes.c_ubyte * pages)()
            assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) == 0
            return sum(v & 1 for v in vector) / pages
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS (macOS, Windows): chipwise "
                    "keeps the pages there (integrity._hash_piece), so there is no drop to check")
@pytest.mark.parametrize("evict", [True, False], ids=["chipwise", "pages-kept"])
def test_a_saves_files_leave_the_page_cache_once_hashed(tmp_path, monkeypatch, evict):
    real = integrity.digest_files
    monkeypatch.setattr(integrity, "digest_files", lambda root, names, **options: real(
        root, names, **(options | ({} if evict else {"evict": False}))))
    state = state_of(np.random.default_rng(1).normal(size=(512, 1024)).astype(np.float32))  # 2 MiB
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=2)
    assert ckpt.save(1, state, {"step": 1}) and ckpt.wait()
    data = [p for p in (tmp_path / "checkpoints" / "1" / "state").rglob("d/*") if p.is_file()]
    sizes = [p.stat().st_size for p in data]
    assert sum(sizes) >= 2 * 2**20  # how tensorstore splits it into files varies
    cached = sum(resident(p) * size for p, size in zip(data, sizes)) / sum(sizes)
    if evict:
        assert cached < 0.1
    else:  # the same save keeps them: what the test would see if the eviction were lost
        assert cached > 0.9
    assert ckpt.verify(1) is None  # and the files still verify (read back from the disk)
    ckpt.close()
