"""One run at a time in a run directory: a lock file that names its owner, and that a dead owner does not hold.

The lock is a file created with O_CREAT | O_EXCL (atomic on local file systems and on NFS v3 and later), holding
its owner: host, pid, the process's start time (so a recycled pid is not mistaken for the owner) and when it took
the lock. While the run lives, a daemon thread touches the file every HEARTBEAT_S seconds. A lock is stale, and
taken over, when
  * its owner ran on this host and that process no longer exists (a SIGKILLed run restarted here: at once), or
  * its heartbeat is older than STALE_S (an owner on another host that died: after STALE_S).
Taking over a stale lock is itself guarded by a second O_EXCL file (`<lock>.takeover`), so of two processes
that find the same stale lock only one removes it; the other then finds the winner's fresh lock. In a bucket
(gs://, s3://) the exclusive create is a conditional PUT (If-None-Match / if-generation-match) and the heartbeat
rewrites the object (storage.py); this module is the only one that knows how the lock is held.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from chipwise import storage
from chipwise.errors import ChipwiseError

HEARTBEAT_S = 10.0
STALE_S = 120.0  # several missed heartbeats: generous for a loaded shared file system


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a recycled pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return start is None or _process_start(pid) in (None, start)


class RunLock:
    def __init__(self, path: Path, what: str):
        self.path = path if storage.is_remote(path) else Path(path)
        self.what = what  # the run directory, for messages
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading ------------------------------------------------------------------------------------------
    def holder(self) -> dict | None:
        """The live owner of the lock, or None if it is free or stale."""
        try:
            owner = json.loads(self.path.read_text())
            age = time.time() - storage.modified(self.path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable or half-written: judge it by its age alone
            owner, age = {}, time.time() - self._mtime_or_now()
        if not isinstance(owner, dict):
            owner = {}
        if owner.get("host") == self.owner["host"] and isinstance(owner.get("pid"), int):
            if owner["pid"] == os.getpid() and owner.get("start") == self.owner["start"]:
                return None  # this very process (a resumed Trainer in the same interpreter)
            if not _alive(owner["pid"], owner.get("start")):
                return None
        if age > STALE_S:
            return None
        return owner | {"age_s": age}

    def _mtime_or_now(self) -> float:
        try:
            return storage.modified(self.path)
        except OSError:
            return time.time()

    def check_free(self) -> None:
        """Raise a one-line ChipwiseError naming the owner if another live run holds the lock."""
        owner = self.holder()
        if owner is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
            raise ChipwiseError(
                f"run directory {self.what} is in use by another chipwise run (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, since {since}, alive {owner['age_s']:.0f} s ago); wait for it to end or "
                f"stop it (a lock whose owner died expires after {STALE_S:.0f} s)")

    # ---- holding ------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        for _ in range(3):
            self.check_free()
            if self.path.exists():
                self._take_over_stale()
            if not storage.create_exclusive(self.path, json.dumps(self.owner | {"since": time.time()}).encode()):
                continue  # someone was quicker: judge their lock
            self._start_heartbeat()
            return
        self.check_free()
        raise ChipwiseError(f"could not lock run directory {self.what}: another run keeps taking it; retry")

    def _take_over_stale(self) -> None:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            if time.time() - storage.modified(guard) > STALE_S:  # left by a process that died taking over
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if not storage.create_exclusive(guard, b""):
            time.sleep(0.2)  # another process is taking over: let it finish, then judge its lock
            return
        try:
            if self.holder() is None:  # still stale now that we alone may remove it
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    storage.touch(self.path)
                except OSError:  # a full or flaky disk must not kill the run; the next beat retries
                    pass

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="chipwise-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            owner = json.loads(self.path.read_text())
            if owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
