"""The data pipeline of one set of sources: where its token store is, preparing it, and opening it for training.
data/__init__.py is the package's face (prepare_data, make_train_iterator); data/mixture.py builds on this for
data.mixture.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from chipwise.config import DataConfig
from chipwise.data import prepare, store
from chipwise.data.cache import atomic_path, default_cache_dir
from chipwise.data.corpus import Document, DocumentStream, hash_unit, list_units, load_corpus
from chipwise.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from chipwise.errors import DataError
from chipwise.host_memory import should_offload
from chipwise.process import usable_cores


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
    # data.mixture: each part's name, weight and training tokens (train_tokens is then all of them, in order)
    mixture: list[tuple[str, float, object]] = field(default_factory=list)


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


def _store_settings(cfg: DataConfig) -> dict:
    """The data settings the tokens depend on (the sources themselves enter the key through their files)."""
    return {"text_field": cfg.text_field, "include": cfg.include, "exclude": cfg.exclude,
            "max_documents": cfg.max_documents, "val_fraction": cfg.val_fraction}


def _given_tokenizer(data_cfg: DataConfig, vocab_size: int, log) -> Tokenizer:
    tok = load_tokenizer(data_cfg.tokenizer)
    size = tok.get_vocab_size()
    if size > vocab_size:
        raise DataError(f"tokenizer {data_cfg.tokenizer} has {size:,} tokens but model.vocab_size is "
                        f"{vocab_size:,}; set model.vocab_size to at least {size}")
    log(f"tokenizer: {data_cfg.tokenizer}, {size:,} tokens")
    return tok


def _trained_tokenizer(path: Path, data_cfg: DataConfig, units, vocab_size: int, log) -> Tokenizer:
    """The store's own tokenizer: trained once on a sample of the training documents (tokenizer.MAX_TRAIN_CHARS),
    kept in the store so that a resumed preparation uses the very same one."""
    saved = path / "tokenizer.json"
    if saved.is_file():
        try:
            tok = Tokenizer.from_file(str(saved))
            log(f"tokenizer: byte-level BPE, {tok.get_vocab_size():,} tokens (from the unfinished store)")
            return tok
        except Exception:  # noqa: BLE001 - a damaged file is retrained, never trusted
            pass
    counts = {"train": 0, "val": 0}

    def train_docs():
        for d in DocumentStream(data_cfg, units):
            split = "val" if hash_unit(d.name) < data_cfg.val_fraction else "train"
            counts[split] += 1
            if split == "train":
                yield d

    log("tokenizer: reading the training documents for a sample...")
    sample = prepare.training_sample(train_docs())
    if counts["train"] + counts["val"] < 2 or not counts["train"] or not counts["val"]:
        sample = load_corpus(data_cfg).train  # a tiny corpus: the in-memory split's rules (corpus.split_documents)
    size = sum(len(d.text.encode()) for d in sample)
    part = "" if len(sample) == counts["train"] else f" (a sample of the {counts['train']:,} training documents)"
    log(f"tokenizer: training a byte-level BPE with {vocab_size:,} tokens on {len(sample):,} documents, "
        f"{size / 1e6:.1f} MB{part}...")
    start = time.perf_counter()
    tok = train_tokenizer_in_best_process(sample, vocab_size)
    with atomic_path(saved) as tmp:
        tok.save(str(tmp))
    log(f"tokenizer: trained in {time.perf_counter() - start:.1f} s")
    return tok


def locate_store(data_cfg: DataConfig, vocab_size: int, log=print):
    """(where this data config's store is or will be, the units, notes, label, the given tokenizer or None), from
    file metadata alone."""
    cache_dir = default_cache_dir(data_cfg)
    _check_cache_dir(cache_dir)
    units, notes, label = list_units(data_cfg)
    given = _given_tokenizer(data_cfg, vocab_size, log) if data_cfg.tokenizer else None
    spec = {"given": tokenizer_fingerprint(given)} if given else {"train_vocab": vocab_size}
    return cache_dir / "stores" / store.store_key(units, _store_settings(data_cfg), spec), units, notes, label, given


def prepare_store(data_cfg: DataConfig, vocab_size: int, log=print, workers: int = 0) -> store.TokenStore:
    """The prepared token store for this data config: found from file metadata when it exists, else written
    (resuming an unfinished one). `workers` tokenizing processes; 0 is one per usable core."""
    path, units, notes, label, given = locate_store(data_cfg, vocab_size, log)
    pretokenized = [u.path for u in units if u.kind == "tokens"]
    if pretokenized and given is None:
        raise DataError(f"{pretokenized[0]} is pre-tokenized; set data.tokenizer to the tokenizer.json that made it "
                        f"(its ids and EOS are used as they are)")
    found = store.TokenStore.open(path)
    if found is not None:
        problem = found.check()
        if problem is None:
            log(f"tokens: prepared store {path} ({found.tokens('train'):,} train / {found.tokens('val'):,} val "
                f"tokens)")
            return found
        log(f"tokens: the prepared store {path} is damaged ({problem}); rebuilding what is missing")
    path.mkdir(parents=True, exist_ok=True)
    for note in notes:
        log(f"corpus: {note}")
    tok = given or _trained_tokenizer(path, data_cfg, units, vocab_size, log)
    if given is not None:
        with atomic_path(path / "tokenizer.json") as tmp:
            tok.save(str(tmp))
    workers = workers or data_cfg.prepare_workers or usable_cores()
    log(f"tokens: preparing {path} with {workers} worker process(es)...")
    meta = {"key": path.name, "label": label, "notes": notes, "settings": _store_settings(data_cfg),
            "tokenizer": data_cfg.tokenizer or "byte-level BPE trained on the corpus",
            "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "sources": [str(Path(s).expanduser().resolve()) for s in data_cfg.sources]}
    written = prepare.write_store(path, data_cfg, units, tok, workers, meta, log)
    reused = f", {written.manifest['reused_shards']} shard(s) kept from an unfinished run" \
        if written.manifest["reused_shards"] else ""
    log(f"tokens: prepared in {written.manifest['build_s']:.1f} s{reused}")
    return written


def prepare_sources(data_cfg: DataConfig, vocab_size: int, log=print) -> PreparedData:
    """The prepared store of data.sources (prepare_store), opened for training: tokenizer, memory-mapped splits,
    fingerprints."""
    st = prepare_store(data_cfg, vocab_size, log)
    m = st.manifest
    tok = Tokenizer.from_file(str(st.path / "tokenizer.json"))
    train, val = st.split("train"), st.split("val")
    kind = "files" if not data_cfg.sources else "documents"
    description = (f"{m['label']}: {m['num_documents']:,} {kind}, {m['num_bytes'] / 1e6:.1f} MB -> "
                   f"{_millions(len(train))} train / {_millions(len(val))} val tokens")
    counts = m["split_documents"]
    return PreparedData(train_tokens=train, val_tokens=val, tokenizer=tok, eos_id=m["eos_id"],
                        corpus_fingerprint=m["corpus_fingerprint"], tokenizer_fingerprint=m["tokenizer_fingerprint"],
                        num_documents=(counts["train"], counts["val"]), description=description)
