"""Children die with their parent, even when it is SIGKILLed, and leave nothing on disk (docs/reliability.md,
"Orphans"): the tokenizer child of chipwise.data.offload, and the processes of `chipwise launch`.

Linux only: the parent-death signal is Linux's (elsewhere chipwise documents that it cannot do this). Every wait
polls against a deadline, since the machine may be loaded.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

DEADLINE = 30.0  # seconds for anything to happen on a loaded 2-core machine

# Trains a tokenizer in the offload child on ~40 MB of made-up text: tens of CPU-seconds of work for the child (at
# ~12 MB, an AMD EPYC VM's child finished before it had used the 3 CPU-seconds the test waits for). The child dies
# with its parent well before the end, so the size costs nothing when the test passes.
DRIVER = """
import random
from chipwise.data import offload
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12))) for _ in range(50000)]
texts = ["\\n".join(" ".join(rng.choices(words, k=12)) for _ in range(1000)) for _ in range(400)]
offload.train_tokenizer(texts, 30000)
"""


def stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...), or None once the process is gone (a
    zombie, killed and waiting for whichever process adopted it to reap it, counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := stat(int(entry.name))) and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def wait_until(condition, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.05)
    return result


def clean_up(proc: subprocess.Popen, pids):
    """Kill what a failed test left running: `proc`, and those of `pids` still alive."""
    proc.kill()
    proc.wait(timeout=DEADLINE)
    for pid in pids:
        if stat(pid) is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_parent_takes_the_tokenizer_child_with_it_and_leaves_no_files(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env={**os.environ, "TMPDIR": str(tmp)})
    child = None
    try:
        def the_child():
            assert driver.poll() is None, f"the driver ended ({driver.returncode}) before the test killed it"
            return next((p for p in children_of(driver.pid) if b"chipwise.data.offload" in cmdline(p)), None)

        child = wait_until(the_child, "the driver starts its offload child")

        def working():
            fields = stat(child)
            assert fields is not None, "the child ended before the test killed its parent; give it more work"
            return cpu_seconds(fields) > 3.0  # past its start-up (imports take about 1.5 s): it is at work

        wait_until(working, "the child gets to work", timeout=2 * DEADLINE)
        # Frozen, the child cannot finish, nor exit of its own accord: only the kernel's SIGKILL ends it now.
        os.kill(child, signal.SIGSTOP)
        driver.kill()
        driver.wait(timeout=DEADLINE)
        wait_until(lambda: stat(child) is None, "the child dies with its parent")
    finally:
        clean_up(driver, [child] if child else [])
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    assert not left, f"the killed run left {left} in its temporary directory"


def test_a_tokenizer_child_whose_parent_died_while_it_started_does_nothing():
    """The parent may die before the child has armed its parent-death signal; the child then finds another
    parent than the one that started it, and kills itself before reading any input."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait(timeout=DEADLINE)  # the pid of a process that has ended, standing for the parent that died
    child = subprocess.Popen([sys.executable, "-m", "chipwise.data.offload", "train"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env={**os.environ, "CHIPWISE_OFFLOAD_PARENT": str(gone.pid)})
    try:  # stdin stays open and empty: a child that went on to read its input would wait forever
        assert child.wait(timeout=DEADLINE) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(timeout=DEADLINE)
        child.stdin.close()
        child.stdout.close()


def test_a_killed_launcher_takes_its_processes_with_it(tmp_path):
    worker = ("import os, pathlib, time\n"
              f"d = pathlib.Path(r'{tmp_path}')\n"
              "i = os.environ['CHIPWISE_PROCESS_ID']\n"
              "(d / f'{i}.tmp').write_text(str(os.getpid()))\n"
              "(d / f'{i}.tmp').rename(d / f'{i}.pid')\n"
              "time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-m", "chipwise", "launch", "--processes", "2",
                                 "--devices-per-process", "1", "--", sys.executable, "-c", worker],
                                stderr=subprocess.DEVNULL)
    pids = []
    try:
        def started():
            assert launcher.poll() is None, f"the launcher ended ({launcher.returncode}) before the test killed it"
            return all((tmp_path / f"{i}.pid").exists() for i in range(2))

        wait_until(started, "both processes start")
        pids = [int((tmp_path / f"{i}.pid").read_text()) for i in range(2)]
        assert all(stat(p) is not None for p in pids)
        launcher.kill()
        launcher.wait(timeout=DEADLINE)
        wait_until(lambda: all(stat(p) is None for p in pids), "the processes die with the launcher")
    finally:
        clean_up(launcher, pids)
