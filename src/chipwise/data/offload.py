"""Tokenizer training in a child process that has the C library's default allocator.

Whether to use it is chipwise.data's decision (prepare_data); tokenizer.py and packing.py, which the child runs,
know nothing of it.

A process that keeps freed memory (chipwise/host_memory.py) has one malloc arena, and the tokenizers library's
Rust threads then queue for its lock (3x slower on the stdlib corpus). The child is a plain interpreter
(`python -m chipwise.data.offload COMMAND`), not multiprocessing, which would re-import the caller's main script.
Inputs and outputs cross as JSON, tokenizer.json and .npy bytes, never pickles (docs/reliability.md).

The child never outlives its parent, and neither does anything it was given:

- No files. The request (the texts, and the vocabulary size or the tokenizer.json) goes to the child's stdin as
  one JSON document, and the result (tokenizer.json, or the packed tokens as .npy bytes) comes back on its
  stdout. Pipes vanish with the processes that hold them, so a parent killed at any moment, even by SIGKILL
  with the child already done, leaves no copy of the corpus (or of its tokens) on disk for anyone to clean up.
  (Temporary files cannot promise that: a SIGKILLed parent never runs its cleanup, and a child killed with it
  cannot run one either.) The child sends everything else it might print to stderr, keeping stdout for the
  result. A data error comes back as exit code 2 with its one-line message on stdout.
- The child dies with its parent. First thing, it asks the kernel to SIGKILL it when the parent dies
  (chipwise.launch.parent_death_signal: prctl(PR_SET_PDEATHSIG), Linux), then checks that its parent is still
  the process that started it (whose pid it is given in CHIPWISE_OFFLOAD_PARENT), so a parent that died
  while the child was starting up is noticed too; the child then exits without doing any work. The signal fires
  when the parent's thread that started the child ends: `_run` waits for the child in that same thread.
  Elsewhere than Linux the signal does not exist: a child whose parent is killed runs to its end and then fails
  to write its result to the closed pipe; it still leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tokenizers import Tokenizer

from chipwise.data import tokenizer
from chipwise.data.corpus import Document
from chipwise.errors import DataError
from chipwise.launch import parent_death_signal

EXIT_DATA_ERROR = 2
PARENT_ENV = "CHIPWISE_OFFLOAD_PARENT"


def _run(command: str, request: dict) -> bytes:
    """Run `command` on `request` in the child; its result, as bytes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), PARENT_ENV: str(os.getpid())}
    # run() waits in this thread, which must outlive the child (the parent-death signal follows the thread).
    done = subprocess.run([sys.executable, "-m", "chipwise.data.offload", command],
                          input=json.dumps(request).encode(), stdout=subprocess.PIPE, env=env)
    if done.returncode == EXIT_DATA_ERROR and done.stdout:
        raise DataError(done.stdout.decode())
    if done.returncode:
        raise DataError(f"the child process that runs `{command}` failed with exit code {done.returncode}; "
                        f"set CHIPWISE_MALLOC=default to run it in this process instead")
    return done.stdout


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    return Tokenizer.from_str(_run("train", {"texts": texts, "vocab_size": vocab_size}).decode())


def _child(command: str) -> int:
    parent = os.environ.get(PARENT_ENV)
    arm = parent_death_signal(int(parent)) if parent else None
    if arm is not None:
        arm()
    result = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stdout is for the result alone; anything else to stderr
    request = json.load(sys.stdin.buffer)
    docs = [Document(name=str(i), text=t) for i, t in enumerate(request["texts"])]
    del request["texts"]
    try:
        if command == "train":
            reply = tokenizer.train_tokenizer(docs, int(request["vocab_size"])).to_str().encode()
        else:
            raise ValueError(f"unknown command {command!r}")
    except DataError as e:
        reply, code = str(e).encode(), EXIT_DATA_ERROR
    else:
        code = 0
    with result:
        result.write(reply)
    return code


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1]))
