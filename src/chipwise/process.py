"""Process set-up that every entry point shares: the `chipwise` command, benchmarks/, and the tests' conftest.

`setup()` must run before JAX starts (the allocator setting applies only to threads created after it). It changes
nothing a computation depends on: PRNG keys name their implementation explicitly (prng.py) and the active mesh is
a context variable (sharding.py), so `chipwise train` and `Trainer(cfg).run()` from Python compute the same.
"""

from __future__ import annotations

import logging
import os

from rich.console import Console

from chipwise.host_memory import keep_freed_memory

# Wide enough for the planner's tables; what goes to a file or a pipe is not wrapped at all (see make_console).
REDIRECTED_WIDTH = 200
NOISY_LOGGERS = ("absl", "orbax", "jax", "grain")


def quiet_libtpu_off_tpu() -> None:
    """With the `tpu` extra installed on a machine without TPUs (to compile for TPU topologies, `plan --aot`),
    libtpu looks for TPU VM metadata at start-up and prints screens of warnings. Tell it there is none to find, and
    that several processes may load it.
    Never on a TPU VM (its /dev/accel* or /dev/vfio devices exist) and never over the user's own settings."""
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) or "TPU_ACCELERATOR_TYPE" in os.environ:
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # With no TPU to own, two processes compiling for TPU topologies at once (two `plan --aot`, test workers) must not
    # fail on libtpu's one-process lock file ("Internal error when accessing libtpu multi-process lockfile").
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def setup(log_level: int = logging.INFO) -> None:
    """Quiet the libraries' start-up chatter, then keep freed host memory in the process (host_memory.py).
    Idempotent."""
    quiet_libtpu_off_tpu()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=log_level, format="%(message)s")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "no GPU/TPU found" on every CPU start
    # A failed checkpoint save (a full disk) makes Orbax log each failing write with its traceback, and asyncio its
    # unretrieved task errors: hundreds of lines for what chipwise reports itself in one (train/checkpoint.py).
    for failing_save in ("absl", "asyncio"):
        logging.getLogger(failing_save).setLevel(logging.CRITICAL)
    keep_freed_memory()


def make_console(quiet: bool = False) -> Console:
    """A rich console for run logs. On a terminal it wraps to the window; written to a file or a pipe (CI logs,
    Slurm output files) a line stays one line, so that it can be searched for."""
    console = Console(quiet=quiet)
    if not console.is_terminal:
        console = Console(quiet=quiet, soft_wrap=True, width=REDIRECTED_WIDTH)
    return console


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
