"""Data for pre-training: corpus -> tokenizer -> packed token arrays (cached) -> Grain batches.

    data = prepare_data(cfg.data, cfg.model.vocab_size)
    batches = make_train_iterator(data, seq_len, global_batch, seed, jax.process_index(), jax.process_count())
    val = eval_batches(data.val_tokens, seq_len, batch_size, num_batches)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from chipwise.config import DataConfig
from chipwise.data.cache import default_cache_dir
from chipwise.data.corpus import Document, load_corpus
from chipwise.data.loader import TrainIterator, eval_batches
from chipwise.data.packing import cached_tokens, pack_documents, tokens_key
from chipwise.data.tokenizer import (EOS_TOKEN, cached_tokenizer, eos_id, load_tokenizer, tokenizer_fingerprint,
                                     train_tokenizer)
from chipwise.errors import DataError
from chipwise.host_memory import should_offload

__all__ = ["EOS_TOKEN", "PreparedData", "TrainIterator", "default_cache_dir", "eval_batches",
           "make_train_iterator", "prepare_data", "tokenizer_fingerprint"]


@dataclass
class PreparedData:
    train_tokens: np.ndarray  # read-only memmap of packed token ids (uint16 or uint32)
    val_tokens: np.ndarray
    tokenizer: Tokenizer
    eos_id: int
    corpus_fingerprint: str
    tokenizer_fingerprint: str
    num_documents: tuple[int, int]  # train, val
    description: str  # one line for the log


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


# Where tokenizer work runs is decided here, not in tokenizer.py and packing.py: the child process
# (offload.py) calls back into those two, which therefore stay plain in-process code.


def _offload():
    # Imported on first use, not at the top: `python -m chipwise.data.offload` imports this package before it
    # runs offload.py as __main__, and runpy warns when it finds that module already imported.
    from chipwise.data import offload

    return offload


def train_tokenizer_in_best_process(docs: list[Document], vocab_size: int) -> Tokenizer:
    """train_tokenizer, in a child process when this process's allocator would slow it (host_memory.py)."""
    if should_offload(sum(len(d.text.encode()) for d in docs)):
        return _offload().train_tokenizer([d.text for d in docs], vocab_size)
    return train_tokenizer(docs, vocab_size)


def pack_in_best_process(docs: list[Document], tok: Tokenizer) -> np.ndarray:
    """pack_documents, in a child process when this process's allocator would slow it (host_memory.py)."""
    if should_offload(sum(len(d.text) for d in docs)):
        return _offload().pack([d.text for d in docs], tok)
    return pack_documents(docs, tok)


def _check_cache_dir(cache_dir: Path) -> None:
    """The cache must be a directory chipwise can write to (created if missing): say so in one line up front,
    rather than with a traceback from deep inside a tokenizer or packing write."""
    existing = next(p for p in [cache_dir, *cache_dir.parents] if p.exists())
    if existing == cache_dir and not cache_dir.is_dir():
        raise DataError(f"the data cache {cache_dir} is a file, not a directory; set data.cache_dir (or "
                        f"CHIPWISE_CACHE) to a directory")
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"cannot write the data cache in {cache_dir} ({existing} is not writable); set "
                        f"data.cache_dir (or CHIPWISE_CACHE) to a writable directory")


def prepare_data(data_cfg: DataConfig, vocab_size: int, log=print) -> PreparedData:
    """Read the corpus, get a tokenizer and the packed tokens, reusing the cache where it can."""
    cache_dir = default_cache_dir(data_cfg)
    _check_cache_dir(cache_dir)
    corpus = load_corpus(data_cfg)
    for note in corpus.notes:
        log(f"corpus: {note}")
    if data_cfg.tokenizer:
        tok = load_tokenizer(data_cfg.tokenizer)
        size = tok.get_vocab_size()
        if size > vocab_size:
            raise DataError(f"tokenizer {data_cfg.tokenizer} has {size:,} tokens but model.vocab_size is "
                            f"{vocab_size:,}; set model.vocab_size to at least {size}")
        log(f"tokenizer: {data_cfg.tokenizer}, {size:,} tokens")
    else:
        # The split is part of the key: the tokenizer must never have seen the validation documents.
        name = f"{corpus.fingerprint[:32]}-val{data_cfg.val_fraction!r}-{vocab_size}.json"
        tok = cached_tokenizer(corpus.train, vocab_size, cache_dir / "tokenizers" / name, log,
                               train=train_tokenizer_in_best_process)
    tok_fp = tokenizer_fingerprint(tok)
    key = tokens_key(corpus.fingerprint, tok_fp, data_cfg.val_fraction)
    arrays = cached_tokens({"train": corpus.train, "val": corpus.val}, tok, key, cache_dir, log,
                           pack=pack_in_best_process)
    ndocs = (len(corpus.train), len(corpus.val))
    kind = "files" if not data_cfg.sources else "documents"
    description = (f"{corpus.label}: {corpus.num_documents:,} {kind}, {corpus.num_bytes / 1e6:.1f} MB -> "
                   f"{_millions(len(arrays['train']))} train / {_millions(len(arrays['val']))} val tokens")
    return PreparedData(train_tokens=arrays["train"], val_tokens=arrays["val"], tokenizer=tok,
                        eos_id=eos_id(tok), corpus_fingerprint=corpus.fingerprint,
                        tokenizer_fingerprint=tok_fp, num_documents=ndocs, description=description)


def make_train_iterator(data: PreparedData | np.ndarray, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1, worker_threads: int = 2) -> TrainIterator:
    """This process's rows of each global batch, endlessly; see loader.TrainIterator."""
    tokens = data.train_tokens if isinstance(data, PreparedData) else data
    return TrainIterator(tokens, seq_len, global_batch, seed, process_index, process_count, worker_threads)
