"""Where the text comes from: Python's own standard library, or the user's files, directories, JSONL (plain, .gz,
.zst), parquet and `datasets` directories (data/formats.py reads the record formats).

Every document has a `name` that is stable across machines (a path relative to the stdlib root or to
the source's parent, "file.jsonl:LINE" for JSONL records, "file.parquet:ROW", "dataset/split:ROW"). The
train/validation split, the corpus fingerprint and the document order are all functions of names and contents
only, never of the order in which files were listed or where they live on disk.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from chipwise.config import DataConfig
from chipwise.data import formats, pretokenized
from chipwise.errors import DataError

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str  # stable identity: decides the split and enters the fingerprint
    text: str
    order: tuple = ()  # sort key ("path order"); JSONL line numbers sort numerically, not as strings


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]
    fingerprint: str
    label: str  # "Python 3.11 stdlib" or "2 sources"
    num_documents: int  # before the split (a lone document is cut in two by it)
    num_bytes: int
    skipped: int = 0  # files left out because they are not UTF-8 text
    notes: list[str] = field(default_factory=list)


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (a NUL byte also marks it binary)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's stdlib root and its *.py files (third-party packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass(frozen=True)
class Unit:
    """One file (or one `datasets` directory) of the corpus, listed but not read: its documents come from
    `documents()`, a stream. `files` are what it is read from, for recognising a prepared store by metadata."""
    name: str  # the documents' name, or their prefix ("file.jsonl" for "file.jsonl:LINE")
    path: Path
    kind: str  # "text" (a file in a directory: skipped if not text), "explicit" (named in data.sources: must be
    # text), "records" (JSONL / parquet), "dataset" (save_to_disk), "tokens" (pre-tokenized: data/pretokenized.py;
    # no documents: the store writer copies its ids)
    source: int  # index into data.sources (-1: the stdlib)
    files: tuple[Path, ...]

    def documents(self, text_field: str) -> Iterator[Document] | None:
        """The unit's documents, read as they are consumed; None for a non-text file inside a directory."""
        if self.kind == "records":
            return (Document(f"{self.name}:{n}", text, (self.name, n))
                    for n, text in formats.records(self.path, text_field) if text)
        if self.kind == "dataset":
            return _dataset_documents(self.path, text_field)
        if self.kind == "tokens":
            return iter(())
        text = _read_text(self.path)
        if text is None:
            if self.kind == "explicit":
                raise DataError(f"data source {self.path} is not UTF-8 text; convert it or remove it from "
                                f"data.sources")
            return None
        return iter([Document(self.name, text, (self.name,))] if text else [])

    def sort_key(self) -> tuple:
        # Path order by name; two units of one name (two folders called "data") by size, not by where they are.
        return self.name, sum(f.stat().st_size for f in self.files)


def _file_unit(path: Path, name: str, source: int, explicit: bool) -> Unit:
    # Pre-tokenized only when named in data.sources: a .bin file found in a folder is just another file.
    kind = ("records" if formats.record_suffix(path) else "tokens" if explicit and pretokenized.is_pretokenized(path)
            else "explicit" if explicit else "text")
    return Unit(name, path, kind, source, (path,))


def _walk_text_files(directory: Path) -> tuple[list[Path], list[str]]:
    """The files under `directory` and notes on what was left out. Symlinked folders are followed (data is
    often assembled from links), after the folder's own tree, so a folder reachable both directly and through
    a link keeps its direct name whatever the listing order. Each real folder is read once: a link back up the
    tree (a loop) or to a folder already read is skipped with a note, never walked again."""
    files, notes, visited = [], [], set()
    pending = [directory]  # the source, then each symlinked folder found in it, in the order found

    def seen_before(path: Path) -> bool:
        real = os.path.realpath(path)
        if real in visited:
            notes.append(f"skipped {directory.name}/{path.relative_to(directory).as_posix()}: it leads to "
                         f"{real}, a folder already read (a link loop, or a second route to one folder)")
            return True
        visited.add(real)
        return False

    while pending:
        top = pending.pop(0)
        if seen_before(top):
            continue
        links = []
        for dirpath, dirnames, filenames in os.walk(top):  # not followlinks: links are queued, checked first
            kept = []
            for d in sorted(dirnames):
                sub = Path(dirpath, d)
                if d.startswith("."):
                    continue
                if sub.is_symlink():
                    links.append(sub)
                elif not seen_before(sub):
                    kept.append(d)
            dirnames[:] = kept
            files += [Path(dirpath, f) for f in sorted(filenames) if Path(dirpath, f).is_file()]
        pending += links
    return files, notes


def _dataset_documents(path: Path, text_field: str) -> Iterator[Document]:
    """A `datasets` save_to_disk directory: "DIR:ROW" (a Dataset) or "DIR/SPLIT:ROW" (a DatasetDict)."""
    name, found = path.resolve().name, False
    for split, row, text in formats.dataset_records(path, text_field):
        where = f"{name}/{split}" if split else name
        if text:
            found = True
            yield Document(f"{where}:{row}", text, (where, row))
    if not found:
        raise DataError(f"dataset {path} holds no text in column '{text_field}'; point data.sources at one that does")


def _selected(rel: str, include: list[str], exclude: list[str]) -> bool:
    """Whether a file at `rel` (relative to its source directory) passes data.include / data.exclude. Patterns
    are fnmatch globs on the relative path, where * also crosses folders ("*.py" is every .py file below)."""
    if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, p) for p in exclude)


def _user_units(sources: list[str], include: list[str] = (), exclude: list[str] = ()
                ) -> tuple[list[Unit], list[str]]:
    """Every unit of data.sources, in path order, and notes on what the walk left out. Nothing is read but
    directory listings and file metadata."""
    units, seen, notes = [], set(), []
    for index, source in enumerate(sources):
        path = Path(source).expanduser()
        if formats.is_saved_dataset(path):
            files = tuple(sorted(f for f in path.rglob("*") if f.is_file()))
            units.append(Unit(path.resolve().name, path, "dataset", index, files))
        elif path.is_dir():
            # Names are relative to the directory's parent, so "data/a.txt" stays "data/a.txt" on any machine.
            files, walk_notes = _walk_text_files(path)
            notes += walk_notes
            chosen = 0
            for f in files:
                if f.resolve() in seen or not _selected(f.relative_to(path).as_posix(), include, exclude):
                    continue
                seen.add(f.resolve())
                units.append(_file_unit(f, f"{path.resolve().name}/{f.relative_to(path).as_posix()}", index, False))
                chosen += 1
            if not chosen:
                _empty_directory(source, include or exclude)
        elif path.is_file():
            if path.resolve() in seen:
                continue  # listed twice: read once
            seen.add(path.resolve())
            units.append(_file_unit(path, path.name, index, True))
        else:
            raise DataError(f"data source {source} does not exist; fix the path in data.sources "
                            f"(or leave data.sources empty to train on Python's standard library)")
    return sorted(units, key=Unit.sort_key), notes


def _empty_directory(source: str, filtered) -> None:
    chosen = " that data.include / data.exclude select" if filtered else ""
    raise DataError(f"data source directory {source} holds no UTF-8 text{chosen}; "
                    f"point data.sources at a directory with text files")


def list_units(cfg: DataConfig) -> tuple[list[Unit], list[str], str]:
    """(units in path order, notes, label) of the configured corpus, without reading any text."""
    if cfg.sources:
        units, notes = _user_units(cfg.sources, cfg.include, cfg.exclude)
        return units, notes, f"{len(cfg.sources)} source{'s' * (len(cfg.sources) > 1)}"
    root, files = stdlib_files()
    units = [Unit(f.relative_to(root).as_posix(), f, "text", -1, (f,)) for f in files]
    return units, [], f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib"


class DocumentStream:
    """The corpus's documents in path order, read one unit at a time (memory holds one document, or one parquet
    record batch); `skipped` counts the non-text files left out. A directory in data.sources none of whose files
    turned out to be text is an error, raised once the stream reaches its end."""

    def __init__(self, cfg: DataConfig, units: list[Unit]):
        self.cfg, self.units, self.skipped = cfg, units, 0

    def __iter__(self) -> Iterator[Document]:
        limit, count, found = self.cfg.max_documents, 0, set()
        for unit in self.units:
            docs = unit.documents(self.cfg.text_field)
            if docs is None:
                self.skipped += 1
                continue
            for doc in docs:
                found.add(unit.source)
                yield doc
                count += 1
                if 0 < limit <= count:
                    return
        for index in sorted({u.source for u in self.units if u.kind == "text" and u.source >= 0} - found):
            _empty_directory(self.cfg.sources[index], self.cfg.include or self.cfg.exclude)


def hash_unit(name: str) -> float:
    """A number in [0, 1) from the name alone: the same on every run and machine."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Validation gets the documents whose name hashes below val_fraction; both sides end up non-empty."""
    if len(docs) == 1:
        # One document: its last val_fraction of characters is the validation text.
        (doc,) = docs
        if len(doc.text) < 2:
            raise DataError("the corpus holds a single character; add more text to data.sources")
        cut = min(max(round(len(doc.text) * (1 - val_fraction)), 1), len(doc.text) - 1)
        return [Document(doc.name, doc.text[:cut], doc.order)], [Document(doc.name, doc.text[cut:], doc.order)]
    val = [d for d in docs if hash_unit(d.name) < val_fraction]
    train = [d for d in docs if hash_unit(d.name) >= val_fraction]
    # Tiny corpora: move the document whose hash is nearest the boundary, which is order-independent.
    if not val:
        moved = min(train, key=lambda d: (hash_unit(d.name), d.order))
        train.remove(moved)
        val.append(moved)
    elif not train:
        moved = max(val, key=lambda d: (hash_unit(d.name), d.order))
        val.remove(moved)
        train.append(moved)
    return train, val


class CorpusHasher:
    """The corpus fingerprint, fed one document at a time in path order: sha256 over names and content hashes,
    and text_field. The cache key of the corpus, and what a checkpoint's resume compares."""

    def __init__(self, text_field: str):
        self._h = hashlib.sha256(f"chipwise-corpus-v1\0{text_field}\0".encode())

    def update(self, doc: Document) -> None:
        self.update_digest(doc.name, hashlib.sha256(doc.text.encode()).hexdigest())

    def update_digest(self, name: str, digest: str) -> None:
        self._h.update(f"{name}\0{digest}\n".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def fingerprint(docs: list[Document], text_field: str) -> str:
    hasher = CorpusHasher(text_field)
    for d in docs:
        hasher.update(d)
    return hasher.hexdigest()


def load_corpus(cfg: DataConfig) -> Corpus:
    """The whole corpus in memory, split and fingerprinted (small corpora, tests; data/store.py streams)."""
    units, notes, label = list_units(cfg)
    stream = DocumentStream(cfg, units)
    docs = list(stream)
    if not docs:
        raise DataError("the corpus is empty: no text found in data.sources; add text files or JSONL records")
    if stream.skipped:
        notes = notes + [f"skipped {stream.skipped} file(s) that are not UTF-8 text"]
    train, val = split_documents(docs, cfg.val_fraction)
    return Corpus(train=train, val=val, fingerprint=fingerprint(docs, cfg.text_field), label=label,
                  num_documents=len(docs), num_bytes=sum(len(d.text.encode()) for d in docs),
                  skipped=stream.skipped, notes=notes)
