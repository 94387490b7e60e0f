"""Keep the C allocator from giving a train step's buffers back to the OS, only to fault them in again.

XLA:CPU's worker threads malloc each step's temporary buffers and free them when the step ends. With glibc's
defaults those threads allocate from per-thread arenas, which cannot hold blocks above 64 MiB and unmap what they
free, so the next step maps the same memory afresh and the kernel zeroes every page. Measured on this project's
2-vCPU EPYC VM: the demo's step faulted in about 560 MiB (145,000 pages) each time and ran 20-33% slower
(docs/benchmarks.md); a 4-layer calibration model lost 30% of its step time, and how much depended on which arena
a thread happened to get, so CPU timings varied by up to 70% between processes (docs/planner.md).

The fix is the usual one for long-running numeric processes: one arena, no mmap for blocks up to 1 GiB, no
trimming. The process keeps its high-water memory, which a training process reaches in its first step anyway.
It must run before JAX starts its thread pool (a thread, once given an arena, keeps it). The one arena's lock
slows native code that allocates from many threads at once, so such work (tokenizer training and packing)
runs in a child process (`should_offload`, chipwise/data/offload.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("chipwise")

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main heap, which never unmaps what it frees
    # Blocks up to 1 GiB come from the heap, not from fresh mappings. Older glibc versions refuse more than 32 MiB
    # (half its heap size); then that, the most it allows.
    (_M_MMAP_THRESHOLD, (1 << 30, 32 << 20)),
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # never shrink the heap (the next step needs the same memory again)
    (_M_TOP_PAD, 64 << 20),  # grow the heap in 64 MiB steps: fewer brk calls while the first step finds its size
)
# CHIPWISE_MALLOC=default keeps glibc's defaults (as do glibc's own MALLOC_* / GLIBC_TUNABLES variables: the
# user's settings are left in charge).
ENV = "CHIPWISE_MALLOC"
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True if they are in effect. A no-op off glibc (macOS, musl),
    with CHIPWISE_MALLOC=default, or when the user set glibc's malloc variables themselves."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "") == "default":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for param, values in _SETTINGS:
        ok &= any(mallopt(param, v) == 1 for v in (values if isinstance(values, tuple) else (values,)))
    if not ok:
        log.debug("mallopt refused a setting; the C allocator keeps its defaults for the rest")
    _applied = ok
    return ok


# Work above this size runs outside a process that keeps freed memory (below, a child's start-up costs more
# than the contention): see chipwise/data/offload.py.
OFFLOAD_MIN_BYTES = 4 * 2**20


def should_offload(work_bytes: int) -> bool:
    """Whether native multi-threaded work of this size should run in a child with the default allocator. One
    arena serialises code that allocates from many threads: the Hugging Face tokenizers' Rust threads, measured
    on the stdlib corpus (2 cores), trained a BPE in 23 s instead of 8 and packed the tokens in 34 s instead of
    12 (a child with the default allocator: 10 s and 12 s)."""
    return bool(_applied) and work_bytes >= OFFLOAD_MIN_BYTES
