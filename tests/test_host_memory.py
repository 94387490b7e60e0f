"""The allocator setting that stops every CPU train step from page-faulting its buffers in afresh."""

import subprocess
import sys

import pytest

# Allocate, fill and free 100 MiB three times (as XLA:CPU does with a step's buffers); print the page faults of
# the last two rounds.
PROGRAM = """
import ctypes, resource, sys
from chipwise.host_memory import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
n = 100 << 20
for i in range(3):
    if i == 1:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_without_page_faults():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    applied, kept = faults(env)
    assert applied == "True" and kept < 100  # the two later rounds reuse the first round's pages
    # glibc's defaults map 100 MiB afresh each round: 2 x 25,600 pages of 4 KiB, each faulted in.
    applied, default = faults({**env, "CHIPWISE_MALLOC": "default"})
    assert applied == "False" and default > 40_000
    # The user's own glibc settings are left in charge.
    assert faults({**env, "MALLOC_ARENA_MAX": "2"})[0] == "False"


def test_large_native_work_runs_outside_the_single_arena(monkeypatch):
    """Tokenizer training and packing (multi-threaded Rust) run in a child with the default allocator when large;
    results and one-line errors come back as if run here."""
    import os

    from chipwise import host_memory
    from chipwise.data.corpus import Document
    from chipwise.data.tokenizer import train_tokenizer
    from chipwise.errors import DataError

    assert host_memory.keep_freed_memory()  # conftest applied it, as the `chipwise` command does
    assert host_memory.with_default_allocator(10, os.getpid) == os.getpid()  # small work stays here
    monkeypatch.setattr(host_memory, "OFFLOAD_MIN_BYTES", 0)
    assert host_memory.with_default_allocator(10, os.getpid) != os.getpid()
    docs = [Document(name=f"d{i}", text="def f(x):\n    return x + 1\n" * 20) for i in range(5)]
    here, there = train_tokenizer(docs, 300), host_memory.with_default_allocator(1, train_tokenizer, docs, 300)
    assert there.get_vocab() == here.get_vocab()
    with pytest.raises(DataError, match="at least"):
        host_memory.with_default_allocator(1, train_tokenizer, docs, 10)
