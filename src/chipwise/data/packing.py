"""Tokenize each split once into one flat array of token ids, EOS after every document, cached as .npy.

Training windows are then plain slices of this array (see loader.py); reading it with mmap keeps
memory flat however large the corpus is, and lets every process on a host share the page cache.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from chipwise.data.cache import atomic_path
from chipwise.data.corpus import Document
from chipwise.data.tokenizer import eos_id
from chipwise.errors import DataError

_CHUNK_CHARS = 8 * 2**20  # text per encode_batch call: parallel enough, without holding every Encoding at once


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)


def _chunks(docs: list[Document]):
    chunk, size = [], 0
    for d in docs:
        chunk.append(d.text)
        size += len(d.text)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def pack_documents(docs: list[Document], tok: Tokenizer) -> np.ndarray:
    """All documents' token ids back to back, each followed by EOS."""
    eos, dtype = eos_id(tok), token_dtype(tok)
    # Document text that happens to contain "<|endoftext|>" must stay text, not become a document
    # boundary, so special tokens are not recognised while packing.
    saved = tok.encode_special_tokens
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets we never use
    parts = []
    try:
        for chunk in _chunks(docs):
            for enc in encode(chunk, add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=dtype))
                parts.append(np.asarray([eos], dtype=dtype))
    finally:
        tok.encode_special_tokens = saved
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def tokens_key(corpus_fingerprint: str, tok_fingerprint: str, val_fraction: float) -> str:
    """Everything the packed arrays depend on: the corpus, the tokenizer and how the split was drawn."""
    raw = f"chipwise-tokens-v1\0{corpus_fingerprint}\0{tok_fingerprint}\0{val_fraction!r}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a bare temp name
            np.save(f, array)


def _load_cached(path: Path, dtype: np.dtype) -> tuple[np.ndarray | None, str | None]:
    """(read-only memmap, None), or (None, why not) for a cache file that is truncated, damaged or of another
    layout. Files are written atomically (cache.atomic_path), but a full disk, a copy cut short or a shared file
    system can still leave a bad one, and a bad cache entry must be rebuilt, not end every run in a traceback."""
    try:
        array = np.load(path, mmap_mode="r")  # a short file fails here: the header promises more than there is
    except (ValueError, OSError, EOFError) as e:  # numpy's header parser raises ValueError for most damage
        return None, (str(e).splitlines() or [type(e).__name__])[0]
    if not isinstance(array, np.memmap) or array.ndim != 1 or array.dtype != dtype:
        return None, f"expected a flat {dtype} array, found {getattr(array, 'dtype', '?')} of shape " \
                     f"{getattr(array, 'shape', '?')}"
    return array, None


def cached_tokens(splits: dict[str, list[Document]], tok: Tokenizer, key: str, cache_dir: Path, log=print,
                  pack: Callable[[list[Document], Tokenizer], np.ndarray] = pack_documents) -> dict[str, np.ndarray]:
    """{split: read-only memmap of packed tokens}, tokenizing only the splits missing from the cache.

    `pack` tokenizes one split; the caller chooses where it runs (chipwise.data runs large splits in a child).
    """
    paths = {name: cache_dir / "tokens" / f"{key}-{name}.npy" for name in splits}
    dtype = token_dtype(tok)
    arrays = {}
    for name, path in paths.items():
        if path.is_file():
            arrays[name], problem = _load_cached(path, dtype)
            if problem:
                log(f"tokens: the cached {name} tokens {path} are unusable ({problem}); rebuilding them")
    missing = [name for name in paths if arrays.get(name) is None]
    if missing:
        size = sum(len(d.text.encode()) for name in missing for d in splits[name])
        log(f"tokens: tokenizing {', '.join(missing)} ({size / 1e6:.1f} MB)...")
        start = time.perf_counter()
        for name in missing:
            _save(paths[name], pack(splits[name], tok))
            arrays[name], problem = _load_cached(paths[name], dtype)
            if problem:  # just written whole, so the disk or the cache folder is at fault, not the cache entry
                raise DataError(f"cannot read back the tokens just written to {paths[name]} ({problem}); "
                                f"check the disk, or point data.cache_dir at another folder")
        log(f"tokens: tokenized in {time.perf_counter() - start:.1f} s")
    if not missing:
        log(f"tokens: {', '.join(f'{len(a):,} {n}' for n, a in arrays.items())} (cached)")
    return {name: arrays[name] for name in paths}  # in the splits' order, rebuilt ones included
