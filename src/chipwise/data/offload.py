"""Tokenizer training and packing in a child process that has the C library's default allocator.

Whether to use it is chipwise.data's decision (prepare_data); tokenizer.py and packing.py, which the child runs,
know nothing of it.

A process that keeps freed memory (chipwise/host_memory.py) has one malloc arena, and the tokenizers library's
Rust threads then queue for its lock (3x slower on the stdlib corpus). The child is a plain interpreter
(`python -m chipwise.data.offload`), not multiprocessing, which would re-import the caller's main script.
Inputs and outputs cross as JSON, tokenizer.json and .npy files, never pickles (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from chipwise.data import packing, tokenizer
from chipwise.data.corpus import Document
from chipwise.errors import DataError

EXIT_DATA_ERROR = 2


def _run(command: str, tmp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "chipwise.data.offload", command, str(tmp)], env=env)
    if done.returncode == EXIT_DATA_ERROR and (tmp / "error.txt").is_file():
        raise DataError((tmp / "error.txt").read_text())
    if done.returncode:
        raise DataError(f"the child process that runs `{command}` failed with exit code {done.returncode}; "
                        f"set CHIPWISE_MALLOC=default to run it in this process instead")


def _write_texts(texts: list[str], tmp: Path) -> None:
    (tmp / "texts.json").write_text(json.dumps(texts))


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    with tempfile.TemporaryDirectory(prefix="chipwise-") as name:
        tmp = Path(name)
        _write_texts(texts, tmp)
        (tmp / "vocab_size").write_text(str(vocab_size))
        _run("train", tmp)
        return Tokenizer.from_file(str(tmp / "tokenizer.json"))


def pack(texts: list[str], tok: Tokenizer) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="chipwise-") as name:
        tmp = Path(name)
        _write_texts(texts, tmp)
        tok.save(str(tmp / "tokenizer.json"))
        _run("pack", tmp)
        return np.load(tmp / "tokens.npy")


def _child(command: str, tmp: Path) -> int:
    docs = [Document(name=str(i), text=t) for i, t in enumerate(json.loads((tmp / "texts.json").read_text()))]
    try:
        if command == "train":
            tokenizer.train_tokenizer(docs, int((tmp / "vocab_size").read_text())).save(str(tmp / "tokenizer.json"))
        else:
            np.save(tmp / "tokens.npy", packing.pack_documents(docs, Tokenizer.from_file(str(tmp / "tokenizer.json"))))
    except DataError as e:
        (tmp / "error.txt").write_text(str(e))
        return EXIT_DATA_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1], Path(sys.argv[2])))
