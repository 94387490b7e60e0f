"""Corpus formats (data/formats.py): JSONL plain, .gz and .zst, parquet and `datasets` save_to_disk directories give
the documents the plain JSONL path gives; directory include / exclude globs; damaged or mismatched inputs get one
line naming the file."""

import gzip
import re
import json

import pytest

from chipwise.cli import main
from chipwise.config import DataConfig
from chipwise.data.corpus import load_corpus
from chipwise.errors import DataError
from conftest import require

pa = require("pyarrow")
pq = require("pyarrow.parquet")
zstandard = require("zstandard")

TEXTS = ["def f(x):\n    return x\n", "ünïcödé → 字 and more", "", "a third document\n" * 50, "last"]


def config(tmp_path, *sources, **kw):
    return DataConfig(sources=[str(s) for s in sources], cache_dir=str(tmp_path / "cache"), **kw)


def jsonl_bytes(field="text"):
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(TEXTS)).encode()


def in_order(corpus):
    return [d.text for d in sorted(corpus.train + corpus.val, key=lambda d: d.order)]


def written(tmp_path, kind: str):
    """TEXTS in one format, under tmp_path; returns what to put in data.sources."""
    if kind == "jsonl":
        (path := tmp_path / "c.jsonl").write_bytes(jsonl_bytes())
    elif kind == "jsonl.gz":
        (path := tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes()))
    elif kind == "jsonl.zst":
        (path := tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes()))
    elif kind == "parquet":
        # two row groups and more rows than one record batch would need: the reader must walk them all
        pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), path := tmp_path / "c.parquet",
                       row_group_size=2)
    else:
        datasets = require("datasets")
        data = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
        if kind == "datasets-dict":
            data = datasets.DatasetDict({"train": data.select(range(3)), "validation": data.select(range(3, 5))})
        data.save_to_disk(str(path := tmp_path / "saved"))
    return path


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet", "datasets", "datasets-dict"])
def test_each_format_gives_the_documents_of_plain_jsonl(tmp_path, kind):
    plain = load_corpus(config(tmp_path, written(tmp_path, "jsonl")))
    other = load_corpus(config(tmp_path, written(tmp_path, kind)))
    assert in_order(other) == in_order(plain) == [t for t in TEXTS if t]  # the same text, in the same order
    assert other.num_bytes == plain.num_bytes and other.fingerprint != plain.fingerprint  # names differ


def test_include_and_exclude_select_files_of_a_directory(tmp_path):
    root = tmp_path / "repo"
    for rel, text in {"a.py": "alpha", "pkg/b.py": "beta", "pkg/c.txt": "gamma", "pkg/test_d.py": "delta"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    def texts(**kw):
        corpus = load_corpus(config(tmp_path, root, **kw))
        return sorted(d.text for d in corpus.train + corpus.val)

    assert texts() == ["alpha", "beta", "delta", "gamma"]
    assert texts(include=["*.py"]) == ["alpha", "beta", "delta"]
    assert texts(include=["*.py"], exclude=["*test_*"]) == ["alpha", "beta"]
    with pytest.raises(DataError, match="that data.include / data.exclude select"):
        load_corpus(config(tmp_path, root, include=["*.rs"]))


def test_damaged_and_mismatched_inputs_name_the_file(tmp_path):
    truncated_gz = tmp_path / "cut.jsonl.gz"
    truncated_gz.write_bytes(gzip.compress(jsonl_bytes() * 20)[:-40])
    truncated_zst = tmp_path / "cut.jsonl.zst"
    truncated_zst.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes() * 20)[:-40])
    no_column = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": TEXTS}), no_column)
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("just text")
    for path, message in ((truncated_gz, "is damaged after line"), (truncated_zst, "is damaged after line"),
                          (no_column, "has no column 'text' (it has: content)"),
                          (not_parquet, "is not a readable parquet file")):
        with pytest.raises(DataError, match=re.escape(message)) as err:
            load_corpus(config(tmp_path, path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_bad_source_is_one_line_from_the_command_line(tmp_path, capsys):
    no_column = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": TEXTS}), no_column)
    code = main(["train", "--set", f"data.sources=[{no_column}]", "--set", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(no_column) in err and "data.text_field" in err
    assert not (tmp_path / "run").exists()  # a rejected command creates nothing
