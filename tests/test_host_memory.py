"""The allocator setting that stops every CPU train step from page-faulting its buffers in afresh."""

import os
import subprocess
import sys

import pytest

# Allocate, fill and free 100 MiB three times (as XLA:CPU does with a step's buffers); print whether the setting
# is in effect and the page faults of the last two rounds (glibc only: elsewhere the setting is a no-op).
PROGRAM = """
import ctypes, resource, sys
from chipwise.host_memory import keep_freed_memory
applied = keep_freed_memory()
if not sys.platform.startswith("linux"):
    print(applied, -1)
    raise SystemExit
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
n = 100 << 20
for i in range(3):
    if i == 1:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


def test_freed_buffers_are_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    applied, kept = faults(env)
    if not sys.platform.startswith("linux"):  # no glibc: nothing is set, nothing is claimed
        assert applied == "False"
        return
    assert applied == "True" and kept < 100  # the two later rounds reuse the first round's pages
    # glibc's defaults map 100 MiB afresh each round: 2 x 25,600 pages of 4 KiB, each faulted in.
    applied, default = faults({**env, "CHIPWISE_MALLOC": "default"})
    assert applied == "False" and default > 40_000
    # The user's own glibc settings are left in charge.
    assert faults({**env, "MALLOC_ARENA_MAX": "2"})[0] == "False"


def test_large_tokenizer_training_runs_outside_the_single_arena(monkeypatch, tmp_path):
    """Tokenizer training (multi-threaded Rust) runs in a child with the default allocator when large; the result
    equals an in-process run's, and a data error comes back as the same one-line error. (Tokenizing the corpus runs
    in worker processes anyway: data/prepare.py.)"""
    from chipwise import host_memory
    from chipwise.data import offload, train_tokenizer_in_best_process
    from chipwise.data.corpus import Document
    from chipwise.data.tokenizer import train_tokenizer
    from chipwise.errors import DataError

    # As in a process that keeps freed memory (the `chipwise` command, and conftest on glibc).
    monkeypatch.setattr(host_memory, "_applied", True)
    assert host_memory.should_offload(64 << 20) and not host_memory.should_offload(1000)
    docs = [Document(name=f"d{i}", text=f"def f{i}(x):\n    return x + {i}\n" * 20) for i in range(5)]
    children = []
    real_run = offload._run
    monkeypatch.setattr(offload, "_run", lambda command, tmp: children.append(command) or real_run(command, tmp))
    monkeypatch.setattr(host_memory, "OFFLOAD_MIN_BYTES", 0)
    tok = train_tokenizer_in_best_process(docs, 300)
    assert children == ["train"]
    assert tok.get_vocab() == train_tokenizer(docs, 300).get_vocab()
    with pytest.raises(DataError, match="at least"):
        offload.train_tokenizer([d.text for d in docs], 10)
