"""Orbax checkpoints: the sharded train state plus a JSON record (step, data position, config, fingerprints).

Saves are asynchronous (Orbax writes in the background while training goes on) and atomic: Orbax writes into
STEP.orbax-checkpoint-tmp and renames it to STEP only when every item is complete, and never lists a temporary
directory as a step (leftovers of a killed save are removed when the next run opens the directory).

Just before that rename, Orbax's post-finalization callback lets us write `chipwise_checksums.json` (the sha256 of
every file) into the temporary directory, so a published checkpoint always carries its checksums. A restore
verifies them: a checkpoint damaged afterwards (truncated, bit-flipped, files lost) is reported, moved aside to
checkpoints_set_aside/, and the previous good one is used. Nothing is ever deleted except by the retention policy.

A save that fails (disk full, permission denied) is reported and leaves the earlier checkpoints as they were
(the failed one never left its temporary directory, which is then removed so that failures do not pile up and
fill the disk); training goes on. Retention never deletes a checkpoint before its successor is published: Orbax
decides what to delete when a save starts but deletes only after that save's rename succeeded, which
tests/test_full_disk.py checks with keep_checkpoints=1. Restores read straight into the run's current
shardings, so the mesh and the device count may change between save and restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from chipwise.data.cache import atomic_path
from chipwise.errors import ChipwiseError

CHECKSUMS = "chipwise_checksums.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how Orbax names a step directory until it is complete


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _file_digests(step_dir: Path) -> dict[str, str]:
    """Every file of the saved items (state/, meta/). Orbax rewrites its own step-level files
    (_CHECKPOINT_METADATA, commit_success.txt) as it publishes the step, after our callback, so they are left out."""
    return {str(p.relative_to(step_dir)): _sha256(p) for p in sorted(step_dir.glob("*/**/*")) if p.is_file()}


class Checkpoints:
    def __init__(self, directory: Path, keep: int, keep_every: int = 0, log: Callable[[str], None] = print):
        self.directory = Path(directory).absolute()
        self.aside = self.directory.with_name(self.directory.name + "_set_aside")
        self.log = log
        self.failures: list[tuple[int, str]] = []  # (step, reason) of every save that did not complete
        self._saving: int | None = None  # the step whose save is in flight (Orbax runs one at a time)
        self._leftovers: set[int] = set()  # steps whose save failed: their temporary directories are removed
        self._unverified: set[int] = set()  # steps already reported as having no checksums
        keep_policies = [policies.LatestN(n=keep)] + ([policies.EveryNSteps(keep_every)] if keep_every else [])
        options = ocp.CheckpointManagerOptions(
            # when a checkpoint is due is the training loop's decision alone (train/cadence.py): every save asked
            # for is made
            save_interval_steps=1, enable_async_checkpointing=True, create=True,
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            cleanup_tmp_directories=True,  # a save cut short by a kill leaves STEP.orbax-checkpoint-tmp behind
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

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
            return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
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
            for path in self.directory.glob(f"{step}{TMP_SUFFIX}*"):
                _wait_until_still(path)
                shutil.rmtree(path, ignore_errors=True)
                if path.exists():
                    self.log(f"could not remove {path} yet (the failed save at step {step}); retrying later")

    def _write_checksums(self) -> None:
        """Runs in Orbax's finalize thread after every item is written and before the directory is renamed."""
        step = self._saving
        if step is None or jax.process_index() != 0:
            return
        candidates = sorted(self.directory.glob(f"{step}{TMP_SUFFIX}*")) or [self.directory / str(step)]
        step_dir = candidates[0]
        try:
            digests = _file_digests(step_dir)
            with atomic_path(step_dir / CHECKSUMS) as tmp:
                tmp.write_text(json.dumps({"sha256": digests}, indent=0))
        except OSError as e:  # the checkpoint is still complete; a restore will treat it as unverified
            self.log(f"could not write checksums for the checkpoint at step {step} ({one_line(e)})")

    # ---- restoring ----------------------------------------------------------------------------------------
    def verify(self, step: int) -> str | None:
        """None if the step's files match the checksums written with it, else what is wrong."""
        step_dir = self.directory / str(step)
        try:
            recorded = json.loads((step_dir / CHECKSUMS).read_text())["sha256"]
        except FileNotFoundError:  # Orbax's own checks during the restore must do
            if step not in self._unverified:
                self._unverified.add(step)
                self.log(f"checkpoint at step {step} has no {CHECKSUMS} (written by an older chipwise, or its "
                         f"checksum write failed): restoring it unverified")
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable {CHECKSUMS}: {one_line(e)}"
        actual = _file_digests(step_dir)
        for name, digest in recorded.items():
            if name not in actual:
                return f"{name} is missing"
            if actual[name] != digest:
                return f"{name} does not match its checksum"
        return None

    def read_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_state) -> dict:
        """`abstract_state`: ShapeDtypeStructs carrying the target shardings."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out["state"]

    def restore_latest(self, abstract_state, check: Callable[[dict], None] = lambda meta: None,
                       move_damaged: bool = True):
        """(step, state, meta) of the newest checkpoint that verifies, or None if there is none at all.
        `abstract_state` is the restore target, or a function of the checkpoint's meta that gives it (a checkpoint
        saved under another pipeline degree holds its layers in another order, train/pipeline.py).

        Damaged checkpoints met on the way are reported and (if `move_damaged`) moved aside. `check(meta)`
        raises a one-line ChipwiseError if the checkpoint belongs to an incompatible config; that is the
        user's to fix, so it stops the search instead of setting anything aside.
        """
        damaged = []
        for step in reversed(self.all_steps()):
            problem = self.verify(step)
            if problem is None:
                try:
                    meta = self.read_meta(step)
                except Exception as e:  # noqa: BLE001 - verified files that Orbax cannot read: damaged too
                    problem = f"unreadable meta ({one_line(e)})"
            if problem is None:
                check(meta)
                try:
                    target = abstract_state(meta) if callable(abstract_state) else abstract_state
                    return step, self.restore(step, target), meta
                except Exception as e:  # noqa: BLE001
                    # files that match their checksums are intact: the config, not the checkpoint, is wrong
                    if (self.directory / str(step) / CHECKSUMS).is_file():
                        raise ChipwiseError(f"checkpoint at step {step} does not match this run's model "
                                            f"({one_line(e)}); resume with the config it was saved with") from None
                    problem = one_line(e)
            where = f"moved to {self.set_aside(step, 'damaged')}" if move_damaged else "left in place"
            damaged.append(step)
            self.log(f"checkpoint at step {step} is damaged ({problem}); {where}; trying the one before it")
        if damaged:
            raise ChipwiseError(f"no usable checkpoint in {self.directory}: every one is damaged (steps "
                                f"{', '.join(map(str, damaged))}); start a new run")
        return None

    def set_aside(self, step: int, reason: str) -> Path:
        """Move a step out of Orbax's sight (kept for inspection, never deleted)."""
        self.aside.mkdir(parents=True, exist_ok=True)
        target, n = self.aside / f"{step}-{reason}", 1
        while target.exists():
            n += 1
            target = self.aside / f"{step}-{reason}-{n}"
        shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()
        return target

    def close(self) -> None:
        self.wait()
        self._remove_leftovers()
        self.manager.close()


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
