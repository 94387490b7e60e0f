"""Data for pre-training: corpus -> tokenizer -> packed token arrays (cached) -> Grain batches.

    data = prepare_data(cfg.data, cfg.model.vocab_size)
    batches = make_train_iterator(data, seq_len, global_batch, seed, jax.process_index(), jax.process_count())
    val = eval_batches(data.val_tokens, seq_len, batch_size, num_batches)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from chipwise.config import DataConfig
from chipwise.data.cache import default_cache_dir
from chipwise.data.corpus import load_corpus
from chipwise.data.loader import TrainIterator, eval_batches
from chipwise.data.packing import cached_tokens, tokens_key
from chipwise.data.tokenizer import EOS_TOKEN, cached_tokenizer, eos_id, load_tokenizer, tokenizer_fingerprint
from chipwise.errors import DataError

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


def prepare_data(data_cfg: DataConfig, vocab_size: int, log=print) -> PreparedData:
    """Read the corpus, get a tokenizer and the packed tokens, reusing the cache where it can."""
    cache_dir = default_cache_dir(data_cfg)
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
        tok = cached_tokenizer(corpus.train, vocab_size, cache_dir / "tokenizers" / name, log)
    tok_fp = tokenizer_fingerprint(tok)
    key = tokens_key(corpus.fingerprint, tok_fp, data_cfg.val_fraction)
    arrays = cached_tokens({"train": corpus.train, "val": corpus.val}, tok, key, cache_dir, log)
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
