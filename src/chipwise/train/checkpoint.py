"""Orbax checkpoints: the sharded train state plus a JSON record (step, data position, config, fingerprints).

Saves are asynchronous (Orbax writes in the background while training goes on) and atomic: Orbax writes into
STEP.orbax-checkpoint-tmp and renames it to STEP only when every item is complete, and never lists a temporary
directory as a step (leftovers of a killed save are removed when the next run opens the directory).

Every process writes the checksums of the files it wrote (train/integrity.py: one manifest per process, xxh3_128
hashed by a thread pool) into the temporary directory before the rename, so a published checkpoint always carries
them: with several processes each hashes its own part before Orbax's barrier at the end of the writes, and
process 0 adds the shared metadata files in Orbax's post-finalization callback. Both run in Orbax's background
thread; `save()` blocks only for the device-to-host copy, and once hashed the files are dropped from the page cache
(integrity.digest_files). A restore has each process check its share of the manifests in a thread while the
restore reads the same files, and the processes agree on the verdict: a checkpoint damaged afterwards
(truncated, bit-flipped, files lost) is reported, moved aside to checkpoints_set_aside/, and the previous good one
is used. Older checkpoints (one chipwise_checksums.json of sha256 digests) are still checked. Nothing is ever
deleted except by the retention policy.

A save that fails (disk full, permission denied) is reported and leaves the earlier checkpoints as they were
(the failed one never left its temporary directory, which is then removed so that failures do not pile up and
fill the disk); training goes on. Retention never deletes a checkpoint before its successor is published: Orbax
decides what to delete when a save starts but deletes only after that save's rename succeeded, which
tests/test_full_disk.py checks with keep_checkpoints=1. Restores read straight into the run's current
shardings, so the mesh and the device count may change between save and restore.

In a bucket (storage.py) a directory cannot be renamed atomically: Orbax writes the step in place and publishes it
with a commit_success.txt file (as it does on gs://), and a step without one is a save that did not complete.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from chipwise import storage
from chipwise.distributed import barrier
from chipwise.errors import ChipwiseError
from chipwise.train import integrity
from chipwise.train.integrity import MANIFEST as CHECKSUMS
from chipwise.train.integrity import one_line

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how Orbax names a step directory until it is complete
# OCDBT data files of about this size: tensorstore writes (and fsyncs) separate files in parallel; unbounded, a
# process's arrays went into a few files and most of a save was one thread copying into one of them
# (docs/benchmarks.md: a 2 GB state saved 25% faster on 2 cores). Files of this size suit buckets as well.
DATA_FILE_BYTES = 256 * 2**20
WRITES_DONE = "async_write_complete"  # Orbax's barrier after every process's own writes, before the finalize


def _wait_until_still(path: Path, quiet: float = 0.2, limit: float = 5.0) -> None:
    """Wait until no file under `path` has changed size or time for `quiet` seconds (at most `limit` seconds)."""
    def listing():
        found = []
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                found.append((root, name, st.st_size, st.st_mtime_ns))
        return sorted(found)

    deadline, before = time.monotonic() + limit, listing()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = listing()
        if now == before:
            return
        before = now


def _mtimes(root: Path, files: dict[str, str]) -> dict[str, tuple[int, int]]:
    return {n: (st.st_size, st.st_mtime_ns) for n, path in files.items() for st in [os.stat(root / path)]}


def _handlers(compress: bool) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The train state through Orbax's PyTree handler, whose zstd compression can be turned off (the Standard
    handler always compresses); the record as JSON. Both read checkpoints written either way."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state = ocp.PyTreeCheckpointHandler(use_compression=compress)
    meta = ocp.JsonCheckpointHandler()
    for name, handler, save, restore in (("state", state, ocp.args.PyTreeSave, ocp.args.PyTreeRestore),
                                         ("meta", meta, ocp.args.JsonSave, ocp.args.JsonRestore)):
        registry.add(name, save, handler)
        registry.add(name, restore, handler)
    return registry


class Checkpoints:
    def __init__(self, directory: Path, keep: int, keep_every: int = 0, log: Callable[[str], None] = print,
                 compress: bool = False):
        self.remote = storage.is_remote(directory)
        self.directory = directory if self.remote else Path(directory).absolute()
        storage.orbax_for(directory)
        self.aside = self.directory.with_name(self.directory.name + "_set_aside")
        self.log = log
        self.failures: list[tuple[int, str]] = []  # (step, reason) of every save that did not complete
        self._saving: int | None = None  # the step whose save is in flight (Orbax runs one at a time)
        self._leftovers: set[int] = set()  # steps whose save failed: their temporary directories are removed
        self._unverified: set[int] = set()  # steps already reported as having no checksums
        self._own: tuple = (None, {}, {})  # process 0: (step, digests, mtimes) of its files hashed before finalize
        self._real_barrier = None
        keep_policies = [policies.LatestN(n=keep)] + ([policies.EveryNSteps(keep_every)] if keep_every else [])
        options = ocp.CheckpointManagerOptions(
            # when a checkpoint is due is the training loop's decision alone (train/cadence.py): every save asked
            # for is made
            save_interval_steps=1, enable_async_checkpointing=True, create=True,
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            cleanup_tmp_directories=True,  # a save cut short by a kill leaves STEP.orbax-checkpoint-tmp behind
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums,
                                           barrier_sync_fn=self._barrier))
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handlers(compress))

    # ---- saving -------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Start writing a checkpoint in the background; False if it was not started (reported, not raised)."""
        self.wait()  # one save at a time; also surfaces a failure of the previous one
        self._remove_leftovers()  # no save is in flight here
        self._leftovers.discard(step)  # from here its temporary directory is this save's own
        self._saving = step
        try:
            return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
                state, ocdbt_target_data_file_size=DATA_FILE_BYTES),
                                                                   meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 - any I/O error: report it, keep training
            try:
                self._settle()  # whatever else this save left behind is the same failure
            except Exception:  # noqa: BLE001
                pass
            self._saving = None
            self._failed(step, e)
            return False

    def wait(self) -> bool:
        """Block until the save in flight is on disk; False (and reported) if it failed."""
        step = self._saving
        try:
            self._settle()
        except Exception as e:  # noqa: BLE001
            self._failed(step, e)
            return False
        finally:
            self._saving = None  # only now: the checksum callback reads it until the save is finished
        return True

    def _settle(self) -> None:
        """Wait for Orbax and collect every error of the save in flight, raising the first. A save that failed on
        a full disk leaves several (its items, and each metadata file Orbax writes in the background), raised one
        per call; one left behind would fail the next save before it wrote anything, and report it falsely."""
        first = None
        for _ in range(50):  # each call consumes at least one error
            try:
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
                break
            except Exception as e:  # noqa: BLE001
                first = first or e
        if first is not None:
            raise first

    def _failed(self, step, e: BaseException) -> None:
        self.failures.append((step, one_line(e)))
        if step is not None:
            self._leftovers.add(step)
            self._remove_leftovers()
        try:
            # Orbax drops the steps its retention policy will delete from its list when a save *starts* (and
            # deletes them from disk only once that save is published, so with a failed save they are still
            # there). Without this re-read a failed save with keep_checkpoints=1 reported "latest good: none",
            # and a rollback or a preemption message would overlook the intact checkpoint.
            self.manager.reload()
        except Exception as reload_error:  # noqa: BLE001 - an unreadable directory: keep Orbax's own list
            self.log(f"could not re-read {self.directory} ({one_line(reload_error)})")
        kept = [s for s in self.all_steps() if s != step]
        what = f"checkpoint at step {step}" if step is not None else "a checkpoint write"
        self.log(f"{what} FAILED ({one_line(e)}); earlier checkpoints are untouched "
                 f"(latest good: {kept[-1] if kept else 'none'}); training continues")

    def _remove_leftovers(self) -> None:
        """Remove the partial temporary directories of failed saves: only `STEP.orbax-checkpoint-tmp*` of a step
        whose save failed, never a published checkpoint, so that failures do not pile up and fill the disk.

        Orbax reports a failure as soon as one item fails, while tensorstore may still be writing the others into
        the same directory (and recreating directories a removal took away), so each directory is removed once it
        has stopped changing, and the failed steps are swept again at every save and at close (Orbax removes any
        still left when the next run opens the directory). Process 0 alone removes: the others may share the
        file system."""
        if jax.process_index() != 0:
            return
        for step in sorted(self._leftovers):
            for path in self._unfinished(step):
                if self.remote:
                    storage.remove_tree(path)
                else:
                    _wait_until_still(path)
                    shutil.rmtree(path, ignore_errors=True)
                if path.exists():
                    self.log(f"could not remove {path} yet (the failed save at step {step}); retrying later")

    def _unfinished(self, step: int) -> list:
        """The directories of a save of `step` that did not complete."""
        if self.remote:  # written in place: unfinished while it has no commit file
            path = self.directory / str(step)
            return [path] if path.exists() and not (path / "commit_success.txt").exists() else []
        return list(self.directory.glob(f"{step}{TMP_SUFFIX}*"))

    def _in_progress(self, step: int) -> Path:
        candidates = sorted(self.directory.glob(f"{step}{TMP_SUFFIX}*")) or [self.directory / str(step)]
        return candidates[0]

    def _barrier(self, *, key: str, timeout_ms: int) -> None:
        """Orbax's barriers (several processes only). At the one after the writes, each process first hashes the
        files it wrote, in parallel with the others."""
        if WRITES_DONE in key:
            self._hash_own_part()
        if self._real_barrier is None:
            self._real_barrier = ocp.multihost.get_barrier_sync_fn()
        self._real_barrier(key=key, timeout_ms=timeout_ms)

    def _hash_own_part(self) -> None:
        step, me = self._saving, jax.process_index()
        if step is None:
            return
        try:
            step_dir = self._in_progress(step)
            files = integrity.item_files(step_dir, me, explicit=True)  # {name once published: path now}
            stamps = {} if self.remote else _mtimes(step_dir, files)
            digests = integrity.digest_files(step_dir, files, evict=True)
            if me == 0:
                self._own = (step, digests, stamps)  # the shared files are still to come: written at the finalize
            else:
                integrity.write_manifest(step_dir, me, digests)
        except Exception as e:  # noqa: BLE001 - never fail the save: process 0 hashes a part it misses
            self.log(f"process {me} could not hash its part of the checkpoint at step {step} ({one_line(e)})")

    def _write_checksums(self) -> None:
        """Runs on process 0 in Orbax's finalize thread after every item is written and finalized, and before the
        directory is renamed: the shared files and the parts no process hashed (all of them for one process)."""
        step = self._saving
        if step is None or jax.process_index() != 0:
            return
        step_dir, processes = self._in_progress(step), jax.process_count()
        try:
            names = integrity.item_files(step_dir, 0)  # the items are renamed: names and paths agree now
            if self._own[0] == step and not self.remote:  # hashed before the finalize; reused where unchanged since
                now = _mtimes(step_dir, {n: p for n, p in names.items() if n in self._own[1]})
                cached = {n: d for n, d in self._own[1].items() if n in now and now[n] == self._own[2].get(n)}
            else:
                cached = {}
            fresh = {n: p for n, p in names.items() if n not in cached}
            digests = {**integrity.digest_files(step_dir, fresh, evict=True),
                       **{n: cached[n] for n in names if n in cached}}
            for other in range(1, processes):
                if not (step_dir / integrity.manifest_name(other)).is_file():
                    integrity.write_manifest(step_dir, other, integrity.digest_files(
                        step_dir, integrity.item_files(step_dir, other), evict=True), hashed_by=0)
            integrity.write_manifest(step_dir, 0, dict(sorted(digests.items())), processes=processes)
        except Exception as e:  # noqa: BLE001 - never fail the save: a restore treats it as unverified
            self.log(f"could not write checksums for the checkpoint at step {step} ({one_line(e)})")
        finally:
            self._own = (None, {}, {})

    # ---- restoring ----------------------------------------------------------------------------------------
    def verify(self, step: int) -> str | None:
        """None if the step's files match the checksums written with it, else what is wrong. Each process checks
        its share (integrity.verify_part) and every process returns the same verdict."""
        return self._agree(step, integrity.verify_part(self.directory / str(step), jax.process_index(),
                                                        jax.process_count()))

    def _agree(self, step: int, verdict: str | None) -> str | None:
        """Every process's verdict on its share of `step`, combined (a collective with several processes)."""
        verdicts = integrity.gather_text(verdict or "")
        problem = next((v for v in verdicts if v and v != integrity.UNVERIFIED), None)
        if problem is None and integrity.UNVERIFIED in verdicts:  # Orbax's own checks during the restore must do
            if step not in self._unverified:
                self._unverified.add(step)
                self.log(f"checkpoint at step {step} has no {CHECKSUMS} (written by an older chipwise, or its "
                         f"checksum write failed): restoring it unverified")
        return problem

    def read_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_state, partial: bool = False) -> dict:
        """`abstract_state`: ShapeDtypeStructs carrying the target shardings; with `partial`, of part of the saved
        state (e.g. only the params: the rest is not read)."""
        args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        target = ocp.args.PyTreeRestore(abstract_state, args, partial_restore=partial)
        return self.manager.restore(step, args=ocp.args.Composite(state=target))["state"]

    def restore_latest(self, abstract_state, check: Callable[[dict], None] = lambda meta: None,
                       move_damaged: bool = True, partial: bool = False):
        """(step, state, meta) of the newest checkpoint that verifies, or None if there is none at all.
        `abstract_state` is the restore target, or a function of the checkpoint's meta that gives it (a checkpoint
        saved under another pipeline degree holds its layers in another order, train/pipeline.py).

        Damaged checkpoints met on the way are reported and (if `move_damaged`) moved aside. `check(meta)`
        raises a one-line ChipwiseError if the checkpoint belongs to an incompatible config; that is the
        user's to fix, so it stops the search instead of setting anything aside. `partial`: see `restore`.
        """
        damaged = []
        with ThreadPoolExecutor(1) as checker:
            for step in reversed(self.all_steps()):
                # The checksums are checked while the checkpoint is restored, not before: each reads the files
                # once from the disk and the other from the page cache. A damaged checkpoint's restored state (if
                # its restore did not fail anyway) is dropped unused. Only the local check runs in the thread; the
                # processes agree on the verdicts after the restore, in this thread. `check` still runs before any
                # array is read, and its refusal counts only for a checkpoint that verifies.
                checking = checker.submit(integrity.verify_part, self.directory / str(step), jax.process_index(),
                                          jax.process_count())
                state = meta = failure = refusal = None
                try:
                    meta = self.read_meta(step)
                except Exception as e:  # noqa: BLE001 - judged below, once the checksums have been checked
                    failure = e
                if meta is not None:
                    try:
                        check(meta)
                    except Exception as e:  # noqa: BLE001 - raised below if the checkpoint is intact
                        refusal = e
                if meta is not None and refusal is None:
                    try:
                        state = self.restore(step, abstract_state(meta) if callable(abstract_state) else
                                             abstract_state, partial)
                    except Exception as e:  # noqa: BLE001
                        failure = e
                problem = self._agree(step, checking.result())
                if problem is None and meta is None:  # verified files that Orbax cannot read: damaged too
                    problem = f"unreadable meta ({one_line(failure)})"
                if problem is None:
                    if refusal is not None:
                        raise refusal
                    if failure is None:
                        return step, state, meta
                    # files that match their checksums are intact: the config, not the checkpoint, is wrong
                    if (self.directory / str(step) / CHECKSUMS).is_file():
                        raise ChipwiseError(f"checkpoint at step {step} does not match this run's model ("
                                            f"{one_line(failure)}); resume with the config it was saved with") from None
                    problem = one_line(failure)
                del state
                where = f"moved to {self.set_aside(step, 'damaged')}" if move_damaged else "left in place"
                damaged.append(step)
                self.log(f"checkpoint at step {step} is damaged ({problem}); {where}; trying the one before it")
        if damaged:
            raise ChipwiseError(f"no usable checkpoint in {self.directory}: every one is damaged (steps "
                                f"{', '.join(map(str, damaged))}); start a new run")
        return None

    def set_aside(self, step: int, reason: str) -> Path:
        """Move a step out of Orbax's sight (kept for inspection, never deleted). Every process calls it; process
        0 alone moves."""
        barrier(f"chipwise-set-aside-{step}")  # every process has looked at the directory as it was
        target, n = self.aside / f"{step}-{reason}", 1
        while target.exists():
            n += 1
            target = self.aside / f"{step}-{reason}-{n}"
        if jax.process_index() == 0:
            self.aside.mkdir(parents=True, exist_ok=True)
            storage.move_tree(self.directory / str(step), target)
        barrier(f"chipwise-set-aside-{step}-done")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.wait()
        self._remove_leftovers()
        self.manager.close()


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
