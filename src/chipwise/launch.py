"""`chipwise launch`: run one command as several cooperating processes on this machine, each with its own CPU
devices, joined by JAX's distributed runtime (gloo collectives over 127.0.0.1). For tests and workstations;
clusters start their processes with their own scheduler (see deploy/).

The launcher forwards SIGINT and SIGTERM to every process (a second signal kills them), and when one process
fails it stops the others: a process whose peer is gone would otherwise wait in its next collective. The exit
status is that of the first process to fail, or else the worst one.

A launcher that dies without running any of that (SIGKILL, the OOM killer) takes its processes with it: each is
started with a parent-death signal (`parent_death_signal`, Linux's prctl(PR_SET_PDEATHSIG, SIGKILL), set in the
child between fork and exec), so the kernel kills it when the launcher goes; otherwise they would train on into
the run directory with nobody to stop them. The kernel sends that signal when the *thread* that started the child
ends, not the process: `launch` starts its processes and waits for them in one thread, so that thread outlives
them. Elsewhere than Linux there is no such signal and a killed launcher leaves its processes running (stop them
by their pids, which it prints). chipwise.data.offload arms the same signal in its tokenizer child.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time

from chipwise.errors import ChipwiseError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def add_commands(sub) -> None:
    p = sub.add_parser("launch", help="run a command as P processes on this machine with CPU devices "
                                      "(multi-process tests and workstations)",
                       description="e.g. chipwise launch --processes 2 --devices-per-process 4 -- chipwise train "
                                   "--config configs/demo.yaml")
    p.add_argument("--processes", type=int, required=True, metavar="P")
    p.add_argument("--devices-per-process", type=int, default=1, metavar="D",
                   help="simulated CPU devices in each process (default 1)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="after one process fails, how long the others get to stop before they are killed")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prctl():
    """libc's prctl, or None where there is none (anything but Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def parent_death_signal(parent_pid: int | None = None):
    """A function for a child to run first (as Popen's preexec_fn, between fork and exec, or at the start of its own
    code) so that the kernel SIGKILLs it when its parent dies, even by SIGKILL. If the parent (`parent_pid`,
    default: the calling process) is already gone by then, the child was orphaned before the signal was armed, and
    the function kills it at once. Returns None where prctl does not exist (not Linux): nothing to arm there.

    Everything the child calls is looked up here, in the parent, so that it loads no library after fork."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid() if parent_pid is None else parent_pid
    kill = int(signal.SIGKILL)

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), kill)

    return arm


def child_env(base: dict, index: int, count: int, devices: int, port: int) -> dict:
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        "CHIPWISE_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",  # JAX would otherwise listen on every interface
        "CHIPWISE_NUM_PROCESSES": str(count),
        "CHIPWISE_PROCESS_ID": str(index),
    })
    return env


def exit_code(returncode: int) -> int:
    """Popen reports death by signal N as -N; a shell says 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(code: int) -> str:
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def launch(cmd: list[str], processes: int, devices: int, grace: float = 10.0, say=None) -> int:
    say = say or (lambda m: print(f"launch: {m}", file=sys.stderr, flush=True))
    if cmd[:1] == ["chipwise"]:  # the same installation as this launcher, whatever PATH says
        cmd = [sys.executable, "-m", "chipwise", *cmd[1:]]
    port = free_port()
    die_with_launcher = parent_death_signal()
    children: list[subprocess.Popen] = []
    signals: list[int] = []
    stopped: set[int] = set()  # processes this launcher asked to stop after another failed

    def alive():
        return [(i, c) for i, c in enumerate(children) if c.poll() is None]

    def forward(signum, _frame):
        if signals:  # a second signal: stop waiting for a clean exit
            for _, c in alive():
                c.kill()
        signals.append(signum)
        for _, c in alive():
            c.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(processes):
            # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards it once.
            # Started, and waited for below, from this one thread: see the module's note on the parent-death signal.
            try:
                children.append(subprocess.Popen(cmd, env=child_env(os.environ, i, processes, devices, port),
                                                 start_new_session=True, preexec_fn=die_with_launcher))
            except OSError as e:  # the processes already started are killed below
                raise ChipwiseError(f"cannot start {cmd[0]}: {e.strerror}") from None
            say(f"process {i} of {processes} is pid {children[-1].pid} ({devices} CPU devices)")
        codes: dict[int, int] = {}
        first_failure, kill_at = None, None
        while len(codes) < processes:
            for i, c in enumerate(children):
                if i in codes or c.poll() is None:
                    continue
                codes[i] = exit_code(c.returncode)
                if codes[i] and first_failure is None and not signals and i not in stopped:
                    first_failure = i
                    rest = alive()
                    say(f"error: process {i} failed ({describe(codes[i])}); stopping the other "
                        f"{len(rest)} process(es)")
                    for j, other in rest:
                        other.terminate()
                        stopped.add(j)
                    kill_at = time.monotonic() + grace
            if kill_at is not None and time.monotonic() > kill_at and alive():
                say(f"processes {[i for i, _ in alive()]} did not stop within {grace:g} s; killing them")
                for _, c in alive():
                    c.kill()
                kill_at = None
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for _, c in alive():  # only on an error in the launcher itself
            c.kill()
    if first_failure is not None:
        return codes[first_failure]
    return max(codes.values())


def _launch(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ChipwiseError("launch needs a command after --, e.g. chipwise launch --processes 2 -- chipwise train "
                            "--config configs/demo.yaml")
    if args.processes < 1 or args.devices_per_process < 1:
        raise ChipwiseError("--processes and --devices-per-process must be at least 1")
    return launch(cmd, args.processes, args.devices_per_process, args.grace)


COMMANDS = {"launch": _launch}
