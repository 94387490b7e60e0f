"""Record formats corpora ship in: JSONL (plain, gzip, zstd), parquet, and Hugging Face `datasets` saved to disk.

Each reader yields (record number, text) for one file or dataset, streaming (JSONL a line at a time, parquet and
arrow a record batch at a time), and turns what is wrong with the input into one DataError line naming the file:
a truncated archive, a record without the text field, a parquet file without the column. pyarrow reads parquet
and arrow; zstandard reads .zst; gzip is Python's own.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path
from typing import Iterator

from chipwise.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
RECORD_SUFFIXES = JSONL_SUFFIXES + (".parquet",)
PARQUET_BATCH_ROWS = 4096  # rows per record batch: bounded memory whatever the file's size


def record_suffix(path: Path) -> str | None:
    """The record format `path` is in, by its name (".jsonl.gz", ".parquet", ...), or None for plain text."""
    name = path.name.lower()
    return next((s for s in RECORD_SUFFIXES if name.endswith(s)), None)


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def records(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(record number from 1, text) of a JSONL or parquet file."""
    if record_suffix(path) == ".parquet":
        yield from _parquet_records(path, text_field)
    else:
        yield from _jsonl_records(path, text_field)


def _open_jsonl(path: Path):
    """The file as a binary stream of lines, decompressed as its name says."""
    suffix = record_suffix(path)
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")
    if suffix in (".jsonl.zst", ".jsonl.zstd"):
        return contextlib.closing(_zstd_lines(path))
    return path.open("rb")


def _zstd_lines(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a .zst file, decompressed a chunk at a time. zstandard's stream reader ends quietly on a cut
    file, so the frame's end is checked here: a file that stops inside a frame is damaged."""
    import zstandard

    with path.open("rb") as f:
        decompressor, pending = zstandard.ZstdDecompressor().decompressobj(), b""
        while data := f.read(chunk):
            pending += decompressor.decompress(data)
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
            if decompressor.eof and (rest := decompressor.unused_data):  # another frame follows
                decompressor = zstandard.ZstdDecompressor().decompressobj()
                pending += decompressor.decompress(rest)
        if not decompressor.eof:
            raise EOFError("the file ends inside a zstd frame")
        if pending:
            yield pending


def _damage_errors() -> tuple[type[Exception], ...]:
    """What a truncated or corrupt archive raises: gzip's EOFError / BadGzipFile (an OSError), zstandard's own."""
    import zstandard

    return EOFError, OSError, zstandard.ZstdError


def _jsonl_records(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    lineno = 0
    try:
        with _open_jsonl(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise DataError(f"{path}:{lineno} is not valid JSON; "
                                    f"fix that line or remove {path} from data.sources") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno} has no string field '{text_field}'; "
                                    f"set data.text_field to the field holding the text")
                yield lineno, text
    except _damage_errors() as e:
        raise DataError(f"{path} is damaged after line {lineno} ({type(e).__name__}: {e}); "
                        f"recompress it or remove it from data.sources") from None


def _parquet_records(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A plain file, read as the batches need it: pyarrow's default pre-buffering kept what it had read, and the
    # process's memory grew with the file (616 -> 856 MB from a 200 MB to a 1 GB file; docs/benchmarks.md).
    with pa.OSFile(str(path)) as source:
        try:
            parquet = pq.ParquetFile(source, pre_buffer=False)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
            raise DataError(f"{path} is not a readable parquet file ({e}); fix it or remove it from data.sources") \
                from None
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise DataError(f"{path} has no column '{text_field}' (it has: {', '.join(columns)}); "
                            f"set data.text_field to the column holding the text")
        yield from _batches(path, parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]),
                            text_field)


def _batches(path: Path, batches, text_field: str, start: int = 0) -> Iterator[tuple[int, str]]:
    row = start
    for batch in batches:
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise DataError(f"{path} row {row}: '{text_field}' is {type(text).__name__}, not text; "
                                f"set data.text_field to a string column")
            yield row, text


def dataset_records(path: Path, text_field: str) -> Iterator[tuple[str, int, str]]:
    """(split, row from 1, text) of a `datasets` save_to_disk directory: its arrow files in the order state.json
    lists them; every split of a DatasetDict (chipwise makes its own validation split). Read locally only."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        for split in splits:
            for row, text in _dataset_split(path / split, text_field):
                yield split, row, text
        return
    for row, text in _dataset_split(path, text_field):
        yield "", row, text


def _dataset_split(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    import pyarrow as pa

    try:
        files = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a dataset saved by datasets' save_to_disk ({type(e).__name__}: {e}); "
                        f"point data.sources at such a directory") from None
    row = 0
    for name in files:
        arrow = path / name
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(arrow)))
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{arrow} is not a readable arrow file ({e}); save the dataset again") from None
        if text_field not in reader.schema.names:
            raise DataError(f"{arrow} has no column '{text_field}' (it has: {', '.join(reader.schema.names)}); "
                            f"set data.text_field to the column holding the text")
        batches = (batch.select([text_field]) for batch in reader)
        for row, text in _batches(arrow, batches, text_field, start=row):
            yield row, text
