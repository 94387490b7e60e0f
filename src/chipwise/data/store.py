"""The prepared token store: a directory of token shards and the manifest that says what they hold.

    <cache>/stores/<key>/
        manifest.json        written last: the store is complete when it exists
        tokenizer.json       the tokenizer every shard was made with
        train-00000.npy ...  flat token ids (uint16 or uint32), documents back to back, EOS after each
        train-00000.json     the shard's own record (tokens, documents, sha256), written when the shard is done
        val-00000.npy ...

The key is a function of what the corpus is made of as the file system describes it (each file's path, size and
modification time), the data settings that change the tokens, and the tokenizer, so a prepared store is found at
start-up from a directory listing and `stat` calls: no text is read or hashed again.

Shards are plain .npy files, memory-mapped by the loader: a window is a slice, random access costs a page fault,
every process on a host shares the page cache, and nothing but numpy is needed to read them (docs/data.md says why
this and not ArrayRecord). A split is the concatenation of its shards in order (`ShardedTokens`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chipwise.data.cache import atomic_path
from chipwise.data.corpus import Unit
from chipwise.errors import DataError

FORMAT = "chipwise-token-store-v1"
SPLITS = ("train", "val")


def store_key(units: list[Unit], settings: dict, tokenizer_spec: dict) -> str:
    """What the tokens depend on, from file metadata alone (see the module docstring)."""
    h = hashlib.sha256(f"{FORMAT}\0{json.dumps(settings, sort_keys=True)}\0{json.dumps(tokenizer_spec)}".encode())
    for u in units:
        for f in u.files:
            st = f.stat()
            h.update(f"{u.name}\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def read_json(path: Path) -> dict | None:
    """A JSON record, or None if it is missing or damaged (then what it describes is redone)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ShardedTokens:
    """A split's shards as one read-only sequence of tokens: len(), slices that may cross shard boundaries, and
    np.asarray() (which copies everything: for tests and small splits)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if len(s)] or shards[:1]
        self.dtype = self.shards[0].dtype
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens takes contiguous slices only")
        start, stop, _ = index.indices(len(self))
        if stop <= start:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, at = [], start
        for i in range(first, len(self.shards)):
            if at >= stop:
                break
            lo = at - self.starts[i]
            take = min(stop, self.starts[i + 1]) - at
            parts.append(self.shards[i][lo:lo + take])
            at += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.shards)
        return whole if dtype is None else whole.astype(dtype)


def _open_shard(path: Path, record: dict, dtype: np.dtype) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"token shard {path} is unreadable ({(str(e).splitlines() or [type(e).__name__])[0]}); "
                        f"run `chipwise data prepare` again to rebuild it") from None
    if array.ndim != 1 or array.dtype != dtype or len(array) != record["tokens"]:
        raise DataError(f"token shard {path} holds {array.dtype} x {array.shape}, the manifest says "
                        f"{dtype} x ({record['tokens']},); run `chipwise data prepare` again to rebuild it")
    return array


@dataclass
class TokenStore:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path) -> TokenStore | None:
        """The complete store at `path`, or None where there is none (or it is unfinished)."""
        manifest = read_json(path / "manifest.json")
        if manifest is None or manifest.get("format") != FORMAT:
            return None
        return cls(path, manifest)

    def split(self, name: str):
        """The split's tokens: the memmap itself when it is one shard, else a ShardedTokens."""
        dtype = np.dtype(self.manifest["dtype"])
        shards = [_open_shard(self.path / f"{r['name']}.npy", r, dtype) for r in self.manifest["splits"][name]]
        return shards[0] if len(shards) == 1 else ShardedTokens(shards)

    def check(self) -> str | None:
        """None if every shard is there with the length and dtype its record says (headers only: cheap), else what
        is wrong. Then the manifest and the records of the bad shards are removed, so a rerun rebuilds those."""
        dtype, bad = np.dtype(self.manifest["dtype"]), []
        for split in SPLITS:
            for record in self.manifest["splits"][split]:
                try:
                    _open_shard(self.path / f"{record['name']}.npy", record, dtype)
                except DataError as e:
                    bad.append((record["name"], str(e).split(";")[0]))
        if not bad:
            return None
        for name, _ in bad:
            (self.path / f"{name}.json").unlink(missing_ok=True)
        (self.path / "manifest.json").unlink(missing_ok=True)
        return "; ".join(why for _, why in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")

    def tokens(self, split: str) -> int:
        return sum(r["tokens"] for r in self.manifest["splits"][split])

    def describe(self) -> list[str]:
        """What `chipwise data inspect` prints."""
        m = self.manifest
        lines = [f"store      {self.path}",
                 f"corpus     {m['label']}: {m['num_documents']:,} documents, {m['num_bytes'] / 1e6:,.1f} MB of text",
                 f"tokenizer  {m['tokenizer']} ({m['vocab_size']:,} tokens, EOS id {m['eos_id']}, sha256 "
                 f"{m['tokenizer_fingerprint'][:12]}); tokens stored as {m['dtype']}",
                 f"prepared   {m['created']} in {m['build_s']:,.1f} s with {m['workers']} worker process(es)"]
        for split in SPLITS:
            records = m["splits"][split]
            docs = sum(r["documents"] for r in records)
            lines.append(f"{split:<10} {self.tokens(split):,} tokens, {docs:,} documents, {len(records)} shard(s)")
        lines.append(f"fingerprint corpus {m['corpus_fingerprint'][:12]} (sha256 of names and texts)")
        lines += [f"note       {n}" for n in m.get("notes", [])]
        return lines
