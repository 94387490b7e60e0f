"""`chipwise launch`: run one command as several cooperating processes on this machine, each with its own CPU
devices, joined by JAX's distributed runtime (gloo collectives over 127.0.0.1). For tests and workstations;
clusters start their processes with their own scheduler (see deploy/).

The launcher forwards SIGINT and SIGTERM to every process (a second signal kills them), and when one process
fails it stops the others: a process whose peer is gone would otherwise wait in its next collective. The exit
status is that of the first process to fail, or else the worst one.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

from chipwise.errors import ChipwiseError


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
            try:
                children.append(subprocess.Popen(cmd, env=child_env(os.environ, i, processes, devices, port),
                                                 start_new_session=True))
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
