"""Keep the C allocator from giving a train step's buffers back to the OS, only to fault them in again.

XLA:CPU mallocs each step's temporary buffers and frees them when the step ends. glibc's defaults hand large
freed blocks straight back to the kernel: requests above its mmap threshold (at most 32 MiB) get fresh mappings,
the worker threads' arenas unmap or MADV_DONTNEED their heaps as they empty, and the main heap is trimmed above
128 KiB of free space. The next step then touches the same amount of memory as new pages, and the kernel zeroes
every one. Measured on this project's 2-vCPU EPYC VM with a 4-layer, d_model=192 model: 15,600 page faults per
step and 30% of the step time (docs/benchmarks.md); the cost also varied from one process to the next by up to
70%, depending on which arena a thread happened to get, which made CPU timings unrepeatable.

The fix is the usual one for long-running numeric processes: one arena, no mmap for blocks up to 1 GiB, no
trimming.
The process's memory stays at its high-water mark, which a training process reaches in its first step anyway.
It must run before JAX starts its thread pool (an arena, once a thread has one, stays that thread's).
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
