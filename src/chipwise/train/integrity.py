"""Checksums of checkpoint files: written by every process for what it wrote, checked in parallel on restore.

A step directory holds one manifest per saving process:

    STEP/chipwise_checksums.json            process 0: the shared files (Orbax's metadata, the OCDBT root, meta/)
                                            and its own subtrees; also the format and the number of processes
    STEP/chipwise_checksums.process_N.json  process N > 0: its own subtrees (`state/ocdbt.process_N/`,
                                            `state/array_metadatas/process_N`)

A file belongs to process N when a component of its path is `process_N` or ends in `.process_N` (how Orbax names
each process's part with OCDBT), and to process 0 otherwise. Each file is recorded with its size and its xxh3_128
digest, computed over 64 MiB chunks in a thread pool (one chunk: the digest of the file; several: the digest of
the chunks' digests), so that one large file (OCDBT packs many arrays into few files) is hashed by several
threads at once. A fast non-cryptographic hash is enough to find damage (truncation, flipped bits, lost files),
which is all this is for; it is not a defence against tampering.

In a bucket (gs://, s3://) nothing is read back: the store keeps its own checksum of every object (S3's ETag,
GCS's crc32c), which a listing returns, so the manifests record each object's size and that checksum
(`"hash": "object"`), and a restore lists the step and compares. An object truncated, replaced or lost is found at
the cost of a listing, however large the checkpoint.

Checkpoints written before this scheme hold a single `chipwise_checksums.json` with the sha256 of every file; they
are still checked (by sha256). A restore by Q processes splits the manifests between them (process q checks
manifests q, q+Q, ...: with as many processes as saved it, each checks what it wrote), and the verdicts are then
shared so that every process takes the same decision.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from chipwise import storage

MANIFEST = "chipwise_checksums.json"
HASH = "xxh3_128"
OBJECT_HASH = "object"  # a bucket's own per-object checksum (S3 ETag, GCS crc32c), read from a listing
FORMAT = 2
CHUNK = 64 << 20  # bytes per hashed piece: the unit of parallel work
BLOCK = 8 << 20  # bytes per read
UNVERIFIED = "(no checksums)"  # a verdict: the checkpoint has no checksums at all

_PROCESS_PART = re.compile(r"(?:^|\.)process_(\d+)$")
_TMP = re.compile(r"\.orbax-checkpoint-tmp.*$")
_local = threading.local()


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def manifest_name(process: int) -> str:
    return MANIFEST if process == 0 else f"chipwise_checksums.process_{process}.json"


def _named_owner(name: str) -> int | None:
    for part in name.split("/"):
        if m := _PROCESS_PART.search(part):
            return int(m[1])
    return None


def owner(name: str) -> int:
    """The process that wrote `name` (a path relative to the step directory)."""
    named = _named_owner(name)
    return 0 if named is None else named


def published(name: str) -> str:
    """`name` as it reads once Orbax has renamed its temporary directories (each item is written into
    `ITEM.orbax-checkpoint-tmp` until the finalize, inside the step's own temporary directory)."""
    return "/".join(_TMP.sub("", part) for part in name.split("/"))


def item_files(step_dir: Path, process: int | None = None, explicit: bool = False) -> dict[str, str]:
    """{published name: path relative to `step_dir`} of the files of the saved items (state/, meta/), sorted; only
    those of `process` if given (with `explicit`, only those inside a `process_N` part, not the shared files).
    Orbax rewrites its own step-level files (_CHECKPOINT_METADATA, commit_success.txt) as it publishes the step,
    after the checksums: left out. Other processes' subtrees are not walked (they may still be being written)."""
    found = {}
    for rel, dirs, files in _walk(step_dir):
        if rel == ".":
            continue
        if process is not None:
            dirs[:] = [d for d in dirs if (m := _PROCESS_PART.search(published(d))) is None or int(m[1]) == process]
        for name in files:
            path = f"{rel}/{name}"
            named = _named_owner(published(path))
            if process is None or named == process or (named is None and process == 0 and not explicit):
                found[published(path)] = path
    return dict(sorted(found.items()))


def _walk(step_dir):
    """os.walk over `step_dir` (a local directory or a bucket's prefix), each directory relative to it."""
    if not storage.is_remote(step_dir):
        for root, dirs, files in os.walk(step_dir):
            yield Path(root).relative_to(step_dir).as_posix(), dirs, files
        return
    fs, where = storage.filesystem(step_dir)
    fs.invalidate_cache(where)
    for root, dirs, files in fs.walk(where):
        yield root[len(where):].strip("/") or ".", dirs, files


def _object_digests(root, files: dict[str, str]) -> dict[str, list]:
    """{name: [size, the store's checksum]} of objects under `root`, from one listing."""
    fs, where = storage.filesystem(root)
    fs.invalidate_cache(where)
    listed = fs.find(where, detail=True)
    out = {}
    for name, rel in files.items():
        info = listed.get(f"{where}/{rel}")
        if info is None:
            raise FileNotFoundError(f"{rel} is missing")
        out[name] = [int(info["size"]), str(info.get("ETag") or info.get("crc32c") or info.get("md5Hash"))]
    return out


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(32, cores + 4)  # reads wait on the disk, hashing needs the cores


def _buffer() -> memoryview:
    if getattr(_local, "buf", None) is None:
        _local.buf = memoryview(bytearray(BLOCK))
    return _local.buf


def _hash_piece(path: Path, start: int, length: int, evict: bool = False) -> bytes:
    h, buf, left = xxhash.xxh3_128(), _buffer(), length
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while left > 0:
            n = f.readinto(buf[:min(left, BLOCK)])  # both release the GIL: threads run in parallel
            if not n:
                break
            h.update(buf[:n])
            left -= n
        if evict and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), start, length, os.POSIX_FADV_DONTNEED)
    return h.digest()


def digest_files(root: Path, files: dict[str, str] | list[str], evict: bool = False) -> dict[str, list]:
    """{name: [size, xxh3_128 hex]} of files under `root` (a list of paths relative to it, or {name: path}),
    hashed in 64 MiB pieces by a thread pool.

    `evict` (a save's own files, written and synced by Orbax): each piece is dropped from the page cache once
    hashed. A checkpoint is read back only by a rare restore, so its pages would only push out what is used (the
    memory-mapped corpus); and a save soon after can reuse the pages just freed, where otherwise the cache grows
    into free memory. On a VM whose host takes back free guest memory, filling pages it has taken back made writes
    run at a tenth of the disk's speed; pages freed long enough before a save have been taken back too, so that
    happens anyway after an idle spell (docs/reliability.md, docs/benchmarks.md)."""
    files = files if isinstance(files, dict) else {name: name for name in files}
    if storage.is_remote(root):
        return _object_digests(root, files)
    sizes = {name: (root / path).stat().st_size for name, path in files.items()}
    pieces = [(name, start) for name in files for start in range(0, max(sizes[name], 1), CHUNK)]
    with ThreadPoolExecutor(_workers()) as pool:
        parts = list(pool.map(lambda p: _hash_piece(root / files[p[0]], p[1], min(CHUNK, sizes[p[0]] - p[1]),
                                                    evict), pieces))
    out, i = {}, 0
    for name in files:
        n = max(1, -(-sizes[name] // CHUNK))
        digest = parts[i].hex() if n == 1 else xxhash.xxh3_128(b"".join(parts[i:i + n])).hexdigest()
        out[name], i = [sizes[name], digest], i + n
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(step_dir: Path, process: int, files: dict[str, list], processes: int | None = None,
                   hashed_by: int | None = None) -> None:
    """`files` of `process` (digest_files); process 0's manifest also gives the number of saving `processes`.
    `hashed_by`: the process that hashed them, where another process stood in (a note for whoever looks)."""
    kind = OBJECT_HASH if storage.is_remote(step_dir) else HASH
    record = {"format": FORMAT, "hash": kind, "chunk_bytes": CHUNK, "process": process,
              "hashed_by": process if hashed_by is None else hashed_by}
    if processes is not None:
        record["processes"] = processes
    storage.write_whole(step_dir / manifest_name(process), json.dumps({**record, "files": files}, indent=0,
                                                                     sort_keys=True))


def _compare(step_dir: Path, recorded: dict, kind: str) -> str | None:
    """The first file (in name order) that is missing or differs from its record, as a message; None if none."""
    names = sorted(recorded)
    if kind == OBJECT_HASH:
        try:
            actual = _object_digests(step_dir, {n: n for n in names})
        except FileNotFoundError as e:
            return str(e)
        return next((f"{n} does not match its checksum ({actual[n][0]:,} bytes, {recorded[n][0]:,} when saved)"
                     for n in names if actual[n] != list(recorded[n])), None)
    for name in names:
        try:
            size = (step_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if kind == HASH and size != recorded[name][0]:
            return f"{name} does not match its checksum ({size:,} bytes, {recorded[name][0]:,} when saved)"
    if kind == HASH:
        actual = {n: d for n, (_, d) in digest_files(step_dir, names).items()}
        want = {n: recorded[n][1] for n in names}
    else:
        with ThreadPoolExecutor(_workers()) as pool:
            actual = dict(zip(names, pool.map(lambda n: _sha256(step_dir / n), names)))
        want = recorded
    return next((f"{n} does not match its checksum" for n in names if actual[n] != want[n]), None)


def verify_part(step_dir: Path, index: int, count: int) -> str | None:
    """What is wrong with the part of `step_dir` that process `index` of `count` checks; None if it is intact,
    UNVERIFIED if the checkpoint has no checksums."""
    try:
        top = json.loads((step_dir / MANIFEST).read_text())
        if "sha256" in top:  # written by an older chipwise: one manifest, sha256 of every file
            kind, parts = "sha256", [{n: d for n, d in top["sha256"].items() if owner(n) % count == index}]
        else:
            if top.get("hash") not in (HASH, OBJECT_HASH):
                return f"{MANIFEST} uses an unknown checksum {top.get('hash')!r}"
            kind, parts = top["hash"], []
            for process in range(index, int(top["processes"]), count):
                if process == 0:
                    parts.append(top["files"])
                    continue
                try:
                    parts.append(json.loads((step_dir / manifest_name(process)).read_text())["files"])
                except FileNotFoundError:
                    return f"{manifest_name(process)} is missing"
    except FileNotFoundError:
        return UNVERIFIED
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable checksums: {one_line(e)}"
    try:
        return _compare(step_dir, {k: v for part in parts for k, v in part.items()}, kind)
    except (TypeError, ValueError, IndexError) as e:
        return f"unreadable checksums: {one_line(e)}"
    except OSError as e:
        return f"a file is unreadable ({one_line(e)})"


def gather_text(text: str, size: int = 1024) -> list[str]:
    """Every process's `text` (at most `size` bytes), in process order; a collective in a multi-process run."""
    import jax

    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    raw = np.zeros(size, np.uint8)
    data = text.encode()[:size]
    raw[:len(data)] = np.frombuffer(data, np.uint8)
    seen = np.asarray(multihost_utils.process_allgather(raw))
    return [bytes(row).rstrip(b"\x00").decode(errors="ignore") for row in seen.reshape(-1, size)]
