"""Data for pre-training: corpus stream -> tokenizer -> token store (shards) -> Grain batches.

    data = prepare_data(cfg.data, cfg.model.vocab_size)
    batches = make_train_iterator(data, seq_len, global_batch, seed, jax.process_index(), jax.process_count())
    val = eval_batches(data.val_tokens, seq_len, batch_size, num_batches)
"""

from __future__ import annotations

import numpy as np

from chipwise.config import DataConfig
from chipwise.data.cache import default_cache_dir
from chipwise.data.mixture import prepare_mixture
from chipwise.data.pipeline import (PreparedData, locate_store, prepare_sources, prepare_store,
                                    train_tokenizer_in_best_process)
from chipwise.data.tokenizer import EOS_TOKEN, tokenizer_fingerprint

__all__ = ["EOS_TOKEN", "PreparedData", "TrainIterator", "default_cache_dir", "eval_batches", "locate_store",
           "make_train_iterator", "prepare_data", "prepare_store", "tokenizer_fingerprint",
           "train_tokenizer_in_best_process"]


def prepare_data(data_cfg: DataConfig, vocab_size: int, log=print) -> PreparedData:
    """The data a run trains on: the token store of data.sources, or one store per part of data.mixture."""
    if data_cfg.mixture:
        return prepare_mixture(data_cfg, vocab_size, log)
    return prepare_sources(data_cfg, vocab_size, log)


def __getattr__(name: str):
    # The loader (Grain, and with it JAX) is imported when first used, not with the package: the worker processes
    # that tokenize the corpus (data/prepare.py) import this package and need none of it.
    if name in ("TrainIterator", "eval_batches"):
        from chipwise.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_train_iterator(data: PreparedData | np.ndarray, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1, worker_threads: int = 2):
    """This process's rows of each global batch, endlessly; see loader.TrainIterator."""
    from chipwise.data.loader import TrainIterator

    if isinstance(data, PreparedData) and data.mixture:
        return TrainIterator([t for _, _, t in data.mixture], seq_len, global_batch, seed, process_index,
                             process_count, worker_threads, mixture=[(n, w) for n, w, _ in data.mixture])
    tokens = data.train_tokens if isinstance(data, PreparedData) else data
    return TrainIterator(tokens, seq_len, global_batch, seed, process_index, process_count, worker_threads)
