"""The token store (data/store.py, data/prepare.py): sharded, written by worker processes, resumable, recognised
from file metadata; pre-tokenized sources; `chipwise data prepare / inspect`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error

from chipwise.cli import main
from chipwise.config import DataConfig
from chipwise.data import prepare, prepare_data, prepare_store
from chipwise.data.corpus import load_corpus
from chipwise.data.packing import pack_documents
from chipwise.data.store import ShardedTokens
from chipwise.errors import DataError

SHARD = 6000  # characters a shard: the 14-module corpus becomes several shards a split


def _cfg(corpus, tmp_path, **kw) -> DataConfig:
    return DataConfig(sources=[str(corpus)], cache_dir=str(tmp_path / "cache"), val_fraction=0.3, **kw)


def _plain(cfg: DataConfig, tok) -> dict[str, np.ndarray]:
    """The in-memory path: every document of each split packed in path order."""
    corpus = load_corpus(cfg)
    return {"train": pack_documents(corpus.train, tok), "val": pack_documents(corpus.val, tok)}


def test_a_sharded_store_holds_the_in_memory_paths_tokens(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "SHARD_CHARS", SHARD)
    cfg = _cfg(corpus, tmp_path)
    st = prepare_store(cfg, 300, log=lambda _: None, workers=2)
    shards = st.manifest["splits"]["train"]
    assert len(shards) >= 4 and st.manifest["workers"] == 2
    data = prepare_data(cfg, 300, log=lambda _: None)
    want = _plain(cfg, data.tokenizer)
    assert isinstance(data.train_tokens, ShardedTokens)
    np.testing.assert_array_equal(np.asarray(data.train_tokens), want["train"])
    np.testing.assert_array_equal(np.asarray(data.val_tokens), want["val"])
    # Slices across shard boundaries are the concatenation's.
    edge = int(data.train_tokens.starts[1])
    for a, b in [(edge - 3, edge + 5), (0, edge), (edge - 1, int(data.train_tokens.starts[3]) + 2), (5, 5)]:
        np.testing.assert_array_equal(data.train_tokens[a:b], want["train"][a:b])
    assert data.corpus_fingerprint == load_corpus(cfg).fingerprint
    assert data.num_documents == (len(load_corpus(cfg).train), len(load_corpus(cfg).val))


def test_a_killed_preparation_resumes_to_the_same_store(corpus, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from chipwise.config import DataConfig
        from chipwise.data import prepare, prepare_store
        prepare.SHARD_CHARS = {SHARD}
        collect, done = prepare.ShardWriter._collect, []
        def collect_then_die(self, *args):
            collect(self, *args)
            done.append(1)
            if len(done) == {{kill_after}}:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no manifest
        prepare.ShardWriter._collect = collect_then_die
        prepare_store(DataConfig(sources=[{str(corpus)!r}], cache_dir={{cache!r}}, val_fraction=0.3), 300,
                      log=print, workers=1)
    """)

    def run(cache: Path, kill_after: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        return subprocess.run([sys.executable, "-c", script.format(kill_after=kill_after, cache=str(cache))],
                              env=env, capture_output=True, text=True, timeout=300)

    killed = run(tmp_path / "cache", kill_after=3)
    assert killed.returncode == -9, killed.stderr
    store_dir = next((tmp_path / "cache" / "stores").iterdir())
    assert not (store_dir / "manifest.json").exists() and len(list(store_dir.glob("*-0*.json"))) >= 2
    resumed = run(tmp_path / "cache", kill_after=0)
    assert resumed.returncode == 0, resumed.stderr
    assert "shard(s) kept from an unfinished run" in resumed.stdout
    straight = run(tmp_path / "straight", kill_after=0)
    assert straight.returncode == 0, straight.stderr

    def shards(cache: Path) -> dict:
        manifest = json.loads(next((cache / "stores").glob("*/manifest.json")).read_text())
        return {s: [(r["tokens"], r["sha256"]) for r in manifest["splits"][s]] for s in ("train", "val")}

    assert shards(tmp_path / "cache") == shards(tmp_path / "straight")
    assert len(shards(tmp_path / "cache")["train"]) >= 4


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_pretokenized_sources_are_used_as_they_are(corpus, tmp_path, suffix):
    tok = prepare_data(_cfg(corpus, tmp_path), 300, log=lambda _: None).tokenizer
    tok_file = tmp_path / "tok.json"
    tok.save(str(tok_file))
    ids = _plain(_cfg(corpus, tmp_path), tok)["train"]
    source = tmp_path / f"train{suffix}"
    if suffix == ".bin":
        ids.astype(np.uint16).tofile(source)  # nanoGPT's layout
    else:
        np.save(source, ids.astype(np.int32))
    cfg = DataConfig(sources=[str(source)], tokenizer=str(tok_file), cache_dir=str(tmp_path / "c2"), val_fraction=0.1)
    data = prepare_data(cfg, 300, log=lambda _: None)
    train, val = np.asarray(data.train_tokens), np.asarray(data.val_tokens)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    # Cut just after the first EOS at or past the 90% mark, unless that EOS ends the file (which documents land
    # in this corpus's train split depends on its path): then just after the last EOS before the mark. Either way
    # no document is cut in two and validation holds at least one whole document.
    mark, cut, ends = round(0.9 * len(ids)), len(train), np.flatnonzero(ids == data.eos_id) + 1
    after = [e for e in ends if e > mark and e < len(ids)]
    assert cut == (after[0] if after else max(e for e in ends if e <= mark))
    assert train[-1] == data.eos_id and val[-1] == ids[-1] and len(val) > 1
    assert data.num_documents == (int((train == data.eos_id).sum()), int((val == data.eos_id).sum()))


def test_pretokenized_sources_bad_input(tmp_path, small_tok_file, capsys):
    big = tmp_path / "big.npy"
    np.save(big, np.array([1, 2, 0, 299, 300, 0], np.int64))
    cfg = DataConfig(sources=[str(big)], tokenizer=str(small_tok_file), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"big.npy holds token id 300, outside the tokenizer's 300 ids"):
        prepare_data(cfg, 300, log=lambda _: None)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="odd.bin has an odd number of bytes"):
        prepare_data(DataConfig(sources=[str(odd)], tokenizer=str(small_tok_file), cache_dir=str(tmp_path / "c")),
                     300, log=lambda _: None)
    matrix = tmp_path / "matrix.npy"
    np.save(matrix, np.zeros((2, 3), np.int32))
    with pytest.raises(DataError, match="must be a 1-D array of integer token ids"):
        prepare_data(DataConfig(sources=[str(matrix)], tokenizer=str(small_tok_file), cache_dir=str(tmp_path / "c")),
                     300, log=lambda _: None)
    # Without the tokenizer that made it: refused before anything is created.
    (tmp_path / "cfg.yaml").write_text(f"model: {{preset: tiny}}\ndata: {{sources: ['{big}'], "
                                       f"cache_dir: '{tmp_path / 'fresh'}'}}\n")
    assert main(["data", "prepare", "--config", str(tmp_path / "cfg.yaml")]) == 2
    assert "set data.tokenizer" in one_line_error(capsys) and not (tmp_path / "fresh").exists()


@pytest.fixture
def small_tok_file(tmp_path, corpus):
    tok = prepare_data(DataConfig(sources=[str(corpus)], cache_dir=str(tmp_path / "tokcache")), 300,
                       log=lambda _: None).tokenizer
    path = tmp_path / "small_tok.json"
    tok.save(str(path))
    return path


def test_data_prepare_and_inspect_commands(corpus, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{preset: tiny, vocab_size: 300}}\ndata: {{sources: ['{corpus}'], "
                   f"cache_dir: '{tmp_path / 'cache'}'}}\n")
    assert main(["data", "inspect", "--config", str(cfg)]) == 2
    assert "not prepared yet" in one_line_error(capsys)
    assert main(["data", "prepare", "--config", str(cfg), "--set", "data.prepare_workers=1"]) == 0
    out = capsys.readouterr().out
    assert "tokens: preparing" in out and "train " in out
    assert main(["data", "inspect", "--config", str(cfg)]) == 0
    shown = capsys.readouterr().out
    store_dir = next((tmp_path / "cache" / "stores").iterdir())
    assert main(["data", "inspect", str(store_dir)]) == 0
    assert capsys.readouterr().out == shown
    assert f"store      {store_dir}" in shown and "14 documents" in shown and "shard(s)" in shown
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no complete token store" in one_line_error(capsys)
    assert main(["data", "prepare", "--config", str(cfg), "--set", "data.prepare_workers=-1"]) == 2
    assert "data.prepare_workers must be 0" in one_line_error(capsys)


def test_split_point_keeps_whole_documents_and_never_a_lone_eos():
    from chipwise.data.pretokenized import split_point

    only_final = np.array([5, 6, 0, 7, 8, 9, 9, 9, 9, 0], np.uint16)  # mark 9: the one EOS past it ends the file
    assert split_point(only_final, 0.1, 0) == 3  # back to just after the EOS before the mark
    assert split_point(np.array([5, 0, 7, 8, 9, 0, 9, 9, 9, 0]), 0.6, 0) == 6  # forward from mark 4
    assert split_point(np.array([5, 6, 7, 8]), 0.25, 0) == 3  # no EOS at all: the mark
