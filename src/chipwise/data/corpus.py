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

from chipwise.config import DataConfig
from chipwise.data import formats
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


def _stdlib_documents() -> tuple[list[Document], int]:
    root, files = stdlib_files()
    docs, skipped = [], 0
    for path in files:
        text = _read_text(path)
        if text is None:
            skipped += 1  # a few test files are deliberately in other encodings
            continue
        rel = path.relative_to(root).as_posix()
        docs.append(Document(rel, text, (rel,)))
    return docs, skipped


def _file_documents(path: Path, name: str, text_field: str, explicit: bool) -> list[Document] | None:
    """Documents of one file; None for a non-text file found inside a directory (skipped, counted)."""
    if formats.record_suffix(path):  # JSONL (plain, .gz, .zst) or parquet: a document per non-empty record
        return [Document(f"{name}:{n}", text, (name, n)) for n, text in formats.records(path, text_field) if text]
    text = _read_text(path)
    if text is None:
        if explicit:
            raise DataError(f"data source {path} is not UTF-8 text; convert it or remove it from data.sources")
        return None
    return [Document(name, text, (name,))] if text else []


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


def _dataset_documents(path: Path, text_field: str) -> list[Document]:
    """A `datasets` save_to_disk directory: "DIR:ROW" (a Dataset) or "DIR/SPLIT:ROW" (a DatasetDict)."""
    name = path.resolve().name
    docs = []
    for split, row, text in formats.dataset_records(path, text_field):
        where = f"{name}/{split}" if split else name
        if text:
            docs.append(Document(f"{where}:{row}", text, (where, row)))
    if not docs:
        raise DataError(f"dataset {path} holds no text in column '{text_field}'; point data.sources at one that does")
    return docs


def _selected(rel: str, include: list[str], exclude: list[str]) -> bool:
    """Whether a file at `rel` (relative to its source directory) passes data.include / data.exclude. Patterns
    are fnmatch globs on the relative path, where * also crosses folders ("*.py" is every .py file below)."""
    if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, p) for p in exclude)


def _user_documents(sources: list[str], text_field: str, include: list[str] = (), exclude: list[str] = ()
                    ) -> tuple[list[Document], int, list[str]]:
    docs, seen, skipped, notes = [], set(), 0, []
    for source in sources:
        path = Path(source).expanduser()
        if formats.is_saved_dataset(path):
            docs += _dataset_documents(path, text_field)
        elif path.is_dir():
            # Names are relative to the directory's parent, so "data/a.txt" stays "data/a.txt" on any machine.
            found = 0
            files, walk_notes = _walk_text_files(path)
            notes += walk_notes
            for f in files:
                if f.resolve() in seen or not _selected(f.relative_to(path).as_posix(), include, exclude):
                    continue
                seen.add(f.resolve())
                name = f"{path.resolve().name}/{f.relative_to(path).as_posix()}"
                got = _file_documents(f, name, text_field, explicit=False)
                if got is None:
                    skipped += 1
                    continue
                found += len(got)
                docs += got
            if not found:
                chosen = " that data.include / data.exclude select" if include or exclude else ""
                raise DataError(f"data source directory {source} holds no UTF-8 text{chosen}; "
                                f"point data.sources at a directory with text files")
        elif path.is_file():
            if path.resolve() in seen:
                continue  # listed twice: read once
            seen.add(path.resolve())
            docs += _file_documents(path, path.name, text_field, explicit=True)
        else:
            raise DataError(f"data source {source} does not exist; fix the path in data.sources "
                            f"(or leave data.sources empty to train on Python's standard library)")
    return docs, skipped, notes


def _hash_unit(name: str) -> float:
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
    val = [d for d in docs if _hash_unit(d.name) < val_fraction]
    train = [d for d in docs if _hash_unit(d.name) >= val_fraction]
    # Tiny corpora: move the document whose hash is nearest the boundary, which is order-independent.
    if not val:
        moved = min(train, key=lambda d: (_hash_unit(d.name), d.order))
        train.remove(moved)
        val.append(moved)
    elif not train:
        moved = max(val, key=lambda d: (_hash_unit(d.name), d.order))
        val.remove(moved)
        train.append(moved)
    return train, val


def fingerprint(docs: list[Document], text_field: str) -> str:
    """sha256 over names and content hashes (in path order) and text_field: the cache key of the corpus."""
    h = hashlib.sha256(f"chipwise-corpus-v1\0{text_field}\0".encode())
    for d in docs:
        h.update(f"{d.name}\0{hashlib.sha256(d.text.encode()).hexdigest()}\n".encode())
    return h.hexdigest()


def load_corpus(cfg: DataConfig) -> Corpus:
    walk_notes = []
    if cfg.sources:
        docs, skipped, walk_notes = _user_documents(cfg.sources, cfg.text_field, cfg.include, cfg.exclude)
        label = f"{len(cfg.sources)} source{'s' * (len(cfg.sources) > 1)}"
    else:
        docs, skipped = _stdlib_documents()
        label = f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib"
    # Path order, whatever order the sources were listed in; text breaks ties between equal names.
    docs.sort(key=lambda d: (d.order, d.text))
    if cfg.max_documents > 0:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise DataError("the corpus is empty: no text found in data.sources; add text files or JSONL records")
    notes = walk_notes + ([f"skipped {skipped} file(s) that are not UTF-8 text"] if skipped else [])
    train, val = split_documents(docs, cfg.val_fraction)
    return Corpus(train=train, val=val, fingerprint=fingerprint(docs, cfg.text_field), label=label,
                  num_documents=len(docs), num_bytes=sum(len(d.text.encode()) for d in docs),
                  skipped=skipped, notes=notes)
