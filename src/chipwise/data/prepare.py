"""Writing the token store (data/store.py): documents streamed in path order, tokenized by worker processes, written
shard by shard. Memory stays bounded whatever the corpus size: the main process holds the shards being filled and
those waiting for a worker (at most two per worker), and each worker one shard.

A killed preparation resumes: every finished shard has its record beside it, and a rerun reads past the documents
of finished shards (reading is cheap next to tokenizing) and tokenizes only the rest. Shard boundaries are a
function of the document stream alone (a shard closes once it holds SHARD_CHARS characters), so a resumed
preparation cuts the same shards as an uninterrupted one and ends with the same tokens.

Workers are separate interpreters (spawn: safe after JAX has started threads, and each gets the C library's
default allocator, which the tokenizers library's threads need; see host_memory.py). Each tokenizes with one
thread, as many workers as cores, so the cores are not oversubscribed. A worker dies with its parent, even one
killed by SIGKILL, rather than wait on its queue forever.
"""

from __future__ import annotations

import hashlib
import heapq
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from chipwise.data import packing, pretokenized, store
from chipwise.data.cache import atomic_path
from chipwise.data.corpus import CorpusHasher, Document, DocumentStream, Unit, hash_unit, load_corpus
from chipwise.data.tokenizer import MAX_TRAIN_CHARS, eos_id
from chipwise.errors import DataError
from chipwise.host_memory import should_offload
from chipwise.launch import parent_death_signal

SHARD_CHARS = 32 * 2**20  # characters of text per shard: about 8M tokens, a few seconds of one worker's time

_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_json: str, parent_pid: int) -> None:
    global _worker_tok
    arm = parent_death_signal(parent_pid)  # a worker dies with its parent, even a SIGKILLed one (launch.py)
    if arm is not None:
        arm()
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when the tokenizers library first starts its pool, after this
    _worker_tok = Tokenizer.from_str(tokenizer_json)


def _write_shard(path: Path, tokens: np.ndarray, documents: int) -> dict:
    """The shard's .npy, then its record: a record on disk means its shard is whole."""
    with atomic_path(path.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    record = {"name": path.name, "tokens": int(len(tokens)), "documents": documents,
              "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    store.write_json(path.with_suffix(".json"), record)
    return record


def _tokenize_shard(path: Path, texts: list[str]) -> dict:
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    return _write_shard(path, packing.pack_documents(docs, _worker_tok), len(texts))


def training_sample(train_docs, max_chars: int = MAX_TRAIN_CHARS) -> list[Document]:
    """tokenizer.training_sample over a stream of training documents, in one pass with bounded memory: the
    documents first in name-hash order until max_chars is reached (all of them, in path order, when they fit)."""
    heap, kept_chars, all_chars = [], 0, 0  # a max-heap on the hash: the largest goes first when not needed
    for order, doc in enumerate(train_docs):
        heapq.heappush(heap, (_neg(hashlib.sha256(doc.name.encode()).digest()), order, doc))
        kept_chars += len(doc.text)
        all_chars += len(doc.text)
        # The shortest prefix in hash order that reaches max_chars stays; a document past it is not needed.
        while kept_chars - len(heap[0][2].text) >= max_chars:
            kept_chars -= len(heapq.heappop(heap)[2].text)
    in_path_order = all_chars <= max_chars
    kept = sorted(heap, key=(lambda e: e[1]) if in_path_order else (lambda e: _neg(e[0])))
    return [e[2] for e in kept]


def _neg(key: bytes) -> bytes:
    return bytes(255 - b for b in key)


class ShardWriter:
    """Cuts each split's document stream into shards and hands them to the workers; finished shards are skipped."""

    def __init__(self, path: Path, tok: Tokenizer, workers: int):
        self.path, self.workers = path, workers
        self.pending, self.records, self.reused = deque(), {s: [] for s in store.SPLITS}, 0
        self.buffers = {s: [] for s in store.SPLITS}
        self.chars = {s: 0 for s in store.SPLITS}
        self.index = {s: 0 for s in store.SPLITS}
        self.tok, self.pool = tok, None  # the pool starts with the first shard that needs it

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(self.tok.to_str(), os.getpid()))
        return self.pool

    def add(self, split: str, text: str) -> None:
        self.buffers[split].append(text)
        self.chars[split] += len(text)
        if self.chars[split] >= SHARD_CHARS:
            self.flush(split)

    def flush(self, split: str, last: bool = False) -> None:
        texts, chars = self.buffers[split], self.chars[split]
        self.buffers[split], self.chars[split] = [], 0
        name = self._next_shard(split, "documents", len(texts))
        if name is None:
            return
        if last and self.pool is None and not should_offload(chars):
            # A small corpus's only shard: starting worker interpreters would cost more than tokenizing it here.
            docs = [Document(str(i), t) for i, t in enumerate(texts)]
            self.records[split].append(_write_shard(self.path / name, packing.pack_documents(docs, self.tok),
                                                    len(texts)))
            return
        while len(self.pending) >= 2 * self.workers:  # bounded: wait for the oldest shard before reading on
            self._collect(*self.pending.popleft())
        future = self._pool().submit(_tokenize_shard, self.path / name, texts)
        self.pending.append((split, len(self.records[split]), future))
        self.records[split].append(None)  # filled in, in order, when the worker is done

    def add_tokens(self, split: str, tokens: np.ndarray, eos: int) -> None:
        """Pre-tokenized ids, copied into shards of their own (SHARD_CHARS ids each) after the split's text."""
        if self.buffers[split]:
            self.flush(split)
        for start in range(0, len(tokens), SHARD_CHARS):
            part = np.asarray(tokens[start:start + SHARD_CHARS]).astype(packing.token_dtype(self.tok))
            name = self._next_shard(split, "tokens", len(part))
            if name is not None:
                self.records[split].append(_write_shard(self.path / name, part, int(np.count_nonzero(part == eos))))

    def _next_shard(self, split: str, field: str, expected: int) -> str | None:
        """The split's next shard name, or None when an unfinished run already wrote it (its record is kept)."""
        name = store.shard_name(split, self.index[split])
        self.index[split] += 1
        done = store.read_json(self.path / f"{name}.json")
        if done is not None and (self.path / f"{name}.npy").is_file() and done.get(field) == expected:
            self.records[split].append(done)
            self.reused += 1
            return None
        return name

    def _collect(self, split: str, slot: int, future) -> None:
        self.records[split][slot] = future.result()

    def finish(self) -> dict[str, list[dict]]:
        for split in store.SPLITS:
            if self.buffers[split] or not self.records[split]:
                self.flush(split, last=True)
        while self.pending:
            self._collect(*self.pending.popleft())
        if self.pool is not None:
            self.pool.shutdown()
        return self.records

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def write_store(path: Path, cfg, units: list[Unit], tok: Tokenizer, workers: int, meta: dict, log) -> store.TokenStore:
    """Stream the corpus into shards under `path` and write the manifest last."""
    start = time.perf_counter()
    stream = DocumentStream(cfg, units)
    hasher, counts, nbytes = CorpusHasher(cfg.text_field), {s: 0 for s in store.SPLITS}, 0
    writer = ShardWriter(path, tok, workers)
    try:
        for doc in stream:
            hasher.update(doc)
            split = "val" if hash_unit(doc.name) < cfg.val_fraction else "train"
            counts[split] += 1
            nbytes += len(doc.text.encode())
            writer.add(split, doc.text)
        for unit in (u for u in units if u.kind == "tokens"):
            nbytes += unit.path.stat().st_size
            for split, n in _copy_pretokenized(writer, unit, tok, hasher, cfg.val_fraction).items():
                counts[split] += n
        records = writer.finish()
    except BaseException:
        writer.abort()
        raise
    total = sum(counts.values())
    pretokenized_only = any(u.kind == "tokens" for u in units)
    if total == 0 and not pretokenized_only:
        raise DataError("the corpus is empty: no text found in data.sources; add text files or JSONL records")
    if not pretokenized_only and (total == 1 or not counts["train"] or not counts["val"]):
        # Too few documents for the hash split to give both sides one: the in-memory split's rules decide (a lone
        # document is cut by characters, else the document nearest the boundary moves). Small by construction.
        records = _write_small(path, cfg, tok)
        counts = {s: sum(r["documents"] for r in records[s]) for s in store.SPLITS}
    notes = meta.pop("notes") + ([f"skipped {stream.skipped} file(s) that are not UTF-8 text"] if stream.skipped
                                 else [])
    manifest = {"format": store.FORMAT, **meta, "notes": notes, "corpus_fingerprint": hasher.hexdigest(),
                "num_documents": total, "num_bytes": nbytes, "split_documents": counts,
                "dtype": np.dtype(packing.token_dtype(tok)).name, "eos_id": eos_id(tok),
                "vocab_size": tok.get_vocab_size(), "splits": records, "workers": workers,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "build_s": round(time.perf_counter() - start, 3), "reused_shards": writer.reused}
    store.write_json(path / "manifest.json", manifest)
    return store.TokenStore(path, manifest)


def _copy_pretokenized(writer: ShardWriter, unit: Unit, tok: Tokenizer, hasher: CorpusHasher,
                       val_fraction: float) -> dict[str, int]:
    """A .bin / .npy source into the store: checked against the tokenizer, split by position; its documents
    (EOS-separated) counted per split."""
    tokens, eos = pretokenized.open_tokens(unit.path), eos_id(tok)
    hasher.update_digest(unit.name, pretokenized.check_and_hash(unit.path, tokens, tok.get_vocab_size()))
    if len(tokens) < 2:
        raise DataError(f"{unit.path} holds {len(tokens)} token(s); a pre-tokenized source needs at least 2 (one "
                        f"for each split)")
    cut = pretokenized.split_point(tokens, val_fraction, eos)
    parts = {"train": tokens[:cut], "val": tokens[cut:]}
    for split, part in parts.items():
        writer.add_tokens(split, part, eos)
    return {split: max(1, sum(int(np.count_nonzero(c == eos)) for c in pretokenized.chunks(part)))
            for split, part in parts.items()}


def _write_small(path: Path, cfg, tok: Tokenizer) -> dict[str, list[dict]]:
    corpus = load_corpus(cfg)
    return {split: [_write_shard(path / store.shard_name(split, 0), packing.pack_documents(docs, tok), len(docs))]
            for split, docs in (("train", corpus.train), ("val", corpus.val))}
