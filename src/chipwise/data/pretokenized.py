"""Pre-tokenized sources, used as they are: nanoGPT-style `.bin` files (raw uint16 token ids, native byte order)
and `.npy` files (a 1-D array of integer ids). They need `data.tokenizer`, the tokenizer that made them: its EOS
is taken to separate their documents, and every id must be below its vocabulary size.

A file's tokens are split by position: the last `data.val_fraction` of them (moved forward to just after an EOS,
when there is one in the part, so no document is cut in two; back to the last EOS before the part when the only one
in it ends the file) are validation tokens. They are read in chunks, so
memory stays bounded whatever the file's size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from chipwise.errors import DataError

SUFFIXES = (".bin", ".npy")
CHUNK_TOKENS = 8 * 2**20


def is_pretokenized(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def open_tokens(path: Path) -> np.ndarray:
    """The file's ids as a read-only memmap, or one line saying what is wrong with it."""
    if path.suffix.lower() == ".bin":
        if path.stat().st_size % 2:
            raise DataError(f"{path} has an odd number of bytes; a .bin source holds uint16 token ids (nanoGPT's "
                            f"format), 2 bytes each")
        return np.memmap(path, dtype=np.uint16, mode="r")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npy file ({(str(e).splitlines() or [type(e).__name__])[0]})"
                        ) from None
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(f"{path} holds {array.dtype} of shape {array.shape}; a .npy source must be a 1-D array of "
                        f"integer token ids")
    return array


def chunks(tokens: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(tokens), CHUNK_TOKENS):
        yield np.asarray(tokens[start:start + CHUNK_TOKENS])


def check_and_hash(path: Path, tokens: np.ndarray, vocab_size: int) -> str:
    """sha256 of the ids; an id at or past the tokenizer's vocabulary is an error naming the file."""
    h = hashlib.sha256()
    for chunk in chunks(tokens):
        if len(chunk) and (int(chunk.max()) >= vocab_size or int(chunk.min()) < 0):
            bad = int(chunk.max()) if int(chunk.max()) >= vocab_size else int(chunk.min())
            raise DataError(f"{path} holds token id {bad}, outside the tokenizer's {vocab_size:,} ids; give the "
                            f"tokenizer that made it as data.tokenizer")
        h.update(chunk.astype(np.int64).tobytes())
    return h.hexdigest()


def split_point(tokens: np.ndarray, val_fraction: float, eos: int) -> int:
    """Where validation starts: just after the first EOS at or past the (1 - val_fraction) mark, so that no document
    is cut in two. Where that EOS is the file's last token (validation would be empty, or a lone EOS), just after the
    last EOS before the mark instead: validation is then the whole last document. With no such EOS, at the mark."""
    n = len(tokens)
    mark = min(max(round(n * (1 - val_fraction)), 1), n - 1)
    for start in range(mark, n, CHUNK_TOKENS):
        hits = np.flatnonzero(np.asarray(tokens[start:start + CHUNK_TOKENS]) == eos)
        hits = hits[start + hits + 1 < n]
        if len(hits):
            return start + int(hits[0]) + 1
    for end in range(mark, 0, -CHUNK_TOKENS):
        begin = max(0, end - CHUNK_TOKENS)
        hits = np.flatnonzero(np.asarray(tokens[begin:end]) == eos)
        if len(hits):
            return begin + int(hits[-1]) + 1
    return mark
