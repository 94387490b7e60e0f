"""Data pipeline: corpus and split, tokenizer, packing and its cache, Grain batches."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from chipwise.config import DataConfig
from chipwise.data import EOS_TOKEN, default_cache_dir, eval_batches, make_train_iterator, prepare_data
from chipwise.data.corpus import load_corpus, stdlib_files
from chipwise.data.loader import TokenWindows
from chipwise.data.packing import pack_documents, token_dtype
from chipwise.data.tokenizer import load_tokenizer, train_tokenizer
from chipwise.errors import DataError

SAMPLE = "def naïve(x):\n\treturn '日本語' + x  # 🙂 ünïcödé\n"


def _write_corpus(root: Path, n: int = 40) -> Path:
    d = root / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("hidden, never read")
    for i in range(n):
        (d / ("sub" if i % 3 else "") / f"doc{i:02d}.txt").write_text(f"# document {i}\n" + SAMPLE * (i % 5 + 1))
    (d / "image.bin").write_bytes(bytes(range(256)))  # not text: skipped
    return d


def _cfg(tmp_path: Path, sources, **kw) -> DataConfig:
    return DataConfig(sources=[str(s) for s in sources], cache_dir=str(tmp_path / "cache"), **kw)


def _names(docs):
    return sorted(d.name for d in docs)


# --- corpus and split ---------------------------------------------------------------------------


def test_split_is_by_name_hash_and_independent_of_listing_order_and_location(tmp_path):
    d = _write_corpus(tmp_path)
    extra = tmp_path / "extra.txt"
    extra.write_text("one more document\n")
    a = load_corpus(_cfg(tmp_path, [d, extra], val_fraction=0.25))
    b = load_corpus(_cfg(tmp_path, [extra, d], val_fraction=0.25))
    assert _names(a.val) == _names(b.val) and a.fingerprint == b.fingerprint
    assert [x.name for x in a.train] == [x.name for x in b.train]  # same path order either way
    expect = sorted(x.name for x in a.train + a.val
                    if int(hashlib.sha256(x.name.encode()).hexdigest()[:16], 16) / 2**64 < 0.25)
    assert _names(a.val) == expect and 0 < len(a.val) < 41
    assert "corpus/.git/HEAD" not in _names(a.train + a.val) and len(a.train + a.val) == 41
    # The same files elsewhere on disk (another machine) split the same way.
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(d, moved)
    c = load_corpus(_cfg(tmp_path, [moved, extra], val_fraction=0.25))
    assert _names(c.val) == _names(a.val) and c.fingerprint == a.fingerprint


def test_fingerprint_follows_content_and_max_documents(tmp_path):
    d = _write_corpus(tmp_path, n=6)
    base = load_corpus(_cfg(tmp_path, [d]))
    assert load_corpus(_cfg(tmp_path, [d], max_documents=3)).fingerprint != base.fingerprint
    first3 = load_corpus(_cfg(tmp_path, [d], max_documents=3))
    assert len(first3.train) + len(first3.val) == 3
    (d / "doc00.txt").write_text("changed")
    assert load_corpus(_cfg(tmp_path, [d])).fingerprint != base.fingerprint


def test_tiny_corpora_get_both_splits(tmp_path):
    for i in range(2):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}")
    two = load_corpus(_cfg(tmp_path, [tmp_path / "f0.txt", tmp_path / "f1.txt"], val_fraction=0.01))
    assert len(two.train) == 1 and len(two.val) == 1
    (tmp_path / "one.txt").write_text("abcdefgh")
    one = load_corpus(_cfg(tmp_path, [tmp_path / "one.txt"], val_fraction=0.25))
    assert one.train[0].text == "abcdef" and one.val[0].text == "gh"


def test_stdlib_discovery_finds_modules_and_excludes_third_party():
    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert "os.py" in rel and "json/__init__.py" in rel
    assert not [r for r in rel if "site-packages" in r or "dist-packages" in r or "__pycache__" in r]
    assert rel == sorted(rel)


def test_jsonl_records_and_one_line_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "first"}\n\n{"body": "second", "id": 2}\n')
    corpus = load_corpus(_cfg(tmp_path, [good], text_field="body"))
    assert _names(corpus.train + corpus.val) == ["good.jsonl:1", "good.jsonl:3"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError) as e:
        load_corpus(_cfg(tmp_path, [bad]))
    assert "bad.jsonl:3" in str(e.value) and "\n" not in str(e.value)

    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 .*data\.text_field"):
        load_corpus(_cfg(tmp_path, [bad]))


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(_cfg(tmp_path, [tmp_path / "missing.txt"]))
    empty = tmp_path / "binary_only"
    empty.mkdir()
    (empty / "x.bin").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="holds no UTF-8 text"):
        load_corpus(_cfg(tmp_path, [empty]))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        load_corpus(_cfg(tmp_path, [tmp_path / "blank.txt"]))


# --- tokenizer and packing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    corpus = load_corpus(_cfg(tmp_path_factory.mktemp("c"), [_write_corpus(tmp_path_factory.mktemp("d"))]))
    return train_tokenizer(corpus.train, 300)


def test_tokenizer_round_trips_any_text_and_eos_is_id_0(small_tok):
    assert small_tok.token_to_id(EOS_TOKEN) == 0 and small_tok.get_vocab_size() <= 300
    for text in [SAMPLE, "  leading spaces\r\n", "Ελληνικά кириллица عربى ✓", "never seen: ∮ζ€"]:
        assert small_tok.decode(small_tok.encode(text).ids) == text


def test_loaded_tokenizer_is_checked(tmp_path, small_tok):
    (tmp_path / "garbage.json").write_text("{not a tokenizer")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path / "garbage.json"))
    no_eos = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match=r"no <\|endoftext\|> token"):
        load_tokenizer(str(tmp_path / "no_eos.json"))
    small_tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "t.txt").write_text(SAMPLE * 20)
    cfg = _cfg(tmp_path, [tmp_path / "t.txt"], tokenizer=str(tmp_path / "tok.json"))
    with pytest.raises(DataError, match=f"at least {small_tok.get_vocab_size()}"):
        prepare_data(cfg, 260, log=lambda m: None)


def test_packing_puts_eos_after_every_document(tmp_path, small_tok):
    corpus = load_corpus(_cfg(tmp_path, [_write_corpus(tmp_path, n=7)]))
    docs = corpus.train + corpus.val
    packed = pack_documents(docs, small_tok)
    assert packed.dtype == np.uint16
    ends = np.flatnonzero(packed == 0)
    assert len(ends) == len(docs) and ends[-1] == len(packed) - 1
    pieces = np.split(packed, ends + 1)[:-1]
    assert [small_tok.decode(p[:-1].tolist()) for p in pieces] == [d.text for d in docs]
    # A document that quotes the EOS string is still one document.
    quoting = [docs[0].__class__("q", f"before {EOS_TOKEN} after")]
    assert (pack_documents(quoting, small_tok) == 0).sum() == 1


def test_token_dtype_widens_past_65536_ids():
    big = Tokenizer(models.WordLevel({str(i): i for i in range(70_000)}, unk_token="0"))
    assert token_dtype(big) == np.uint32


def test_prepare_data_writes_a_store_and_finds_it_again_without_reading_text(tmp_path, monkeypatch):
    from chipwise.data import corpus

    cfg = _cfg(tmp_path, [_write_corpus(tmp_path)])
    logs: list[str] = []
    first = prepare_data(cfg, 300, log=logs.append)
    assert not any("prepared store" in m for m in logs)
    files = sorted((tmp_path / "cache").rglob("*"))
    mtimes = {f: f.stat().st_mtime_ns for f in files if f.is_file()}
    # manifest, tokenizer, a shard and its record per split, and no temp files left behind
    assert sorted(f.name for f in mtimes) == ["manifest.json", "tokenizer.json", "train-00000.json",
                                               "train-00000.npy", "val-00000.json", "val-00000.npy"]

    logs.clear()
    monkeypatch.setattr(corpus, "_read_text", lambda path: pytest.fail(f"{path} was read again"))
    second = prepare_data(cfg, 300, log=logs.append)
    assert sum("prepared store" in m for m in logs) == 1, logs
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes
    assert isinstance(second.train_tokens, np.memmap) and second.train_tokens.dtype == np.uint16
    assert np.array_equal(first.train_tokens, second.train_tokens)
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint and second.eos_id == 0
    assert (second.train_tokens == 0).sum() == second.num_documents[0]
    assert "MB ->" in second.description and "\n" not in second.description
    monkeypatch.undo()
    assert second.corpus_fingerprint == load_corpus(cfg).fingerprint  # the in-memory path's, streamed

    # Another split is another store: nothing trained on one split is reused for the other.
    prepare_data(_cfg(tmp_path, cfg.sources, val_fraction=0.2), 300, log=lambda m: None)
    assert len([f for f in (tmp_path / "cache").rglob("*") if f.is_file()]) == 12
    # A file touched since is a changed corpus: prepared again.
    (Path(cfg.sources[0]) / "doc00.txt").write_text("# document 0, edited\n")
    logs.clear()
    third = prepare_data(cfg, 300, log=logs.append)
    assert not any("prepared store" in m for m in logs) and third.corpus_fingerprint != first.corpus_fingerprint


def test_default_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CHIPWISE_CACHE", raising=False)
    assert default_cache_dir() == tmp_path / "xdg" / "chipwise"
    monkeypatch.setenv("CHIPWISE_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"


# --- batches ------------------------------------------------------------------------------------

TOKENS = np.arange(16 * 8 + 1, dtype=np.uint16)  # exactly 16 windows of seq_len 8


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_windows_are_overlapping_input_target_slices():
    w = TokenWindows(TOKENS, 8)
    assert len(w) == 16 and w[3]["tokens"].dtype == np.int32
    assert w[3]["tokens"].tolist() == list(range(24, 33))
    with pytest.raises(DataError, match="fewer than train.seq_len"):
        TokenWindows(TOKENS[:8], 8)


def test_each_epoch_is_a_new_permutation_and_order_depends_only_on_seed():
    it = make_train_iterator(TOKENS, 8, 16, seed=0)  # one step = one epoch
    epochs = [b[:, 0] // 8 for b in _take(it, 3)]
    assert all(sorted(e.tolist()) == list(range(16)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    same = [b[:, 0] // 8 for b in _take(make_train_iterator(TOKENS, 8, 16, seed=0, worker_threads=0), 3)]
    assert all(np.array_equal(a, b) for a, b in zip(epochs, same))
    other = _take(make_train_iterator(TOKENS, 8, 16, seed=1), 1)[0][:, 0] // 8
    assert not np.array_equal(other, epochs[0]) and not np.array_equal(other, epochs[1])


def test_process_shards_concatenate_to_the_single_process_batch():
    single = _take(make_train_iterator(TOKENS, 8, 12, seed=5), 5)  # 12 does not divide 16: crosses epochs
    for count in (2, 4):
        parts = [_take(make_train_iterator(TOKENS, 8, 12, 5, p, count), 5) for p in range(count)]
        for step in range(5):
            assert np.array_equal(np.concatenate([p[step] for p in parts]), single[step])
            assert parts[0][step].shape == (12 // count, 9)
    with pytest.raises(DataError, match="multiple of the number of processes"):
        make_train_iterator(TOKENS, 8, 12, 0, 0, 5)


def test_one_sequence_per_process_is_a_batch_like_any_other():
    """train.batch_size 1 (and one row per process) used to overflow grain's length of the endless stream."""
    ones = _take(make_train_iterator(TOKENS, 8, 1, seed=5), 20)
    assert all(b.shape == (1, 9) for b in ones)
    assert np.array_equal(np.concatenate(ones), np.concatenate(_take(make_train_iterator(TOKENS, 8, 4, seed=5), 5)))
    halves = [_take(make_train_iterator(TOKENS, 8, 2, 5, p, 2), 10) for p in range(2)]
    assert np.array_equal(np.concatenate([np.concatenate(s) for s in zip(*halves)]), np.concatenate(ones))


def test_iterator_state_resumes_exactly():
    it = make_train_iterator(TOKENS, 8, 4, seed=3)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    fresh = make_train_iterator(TOKENS, 8, 4, seed=3)
    fresh.set_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(_take(fresh, 6), expected))
    # The state is a step count, so it also resumes with another number of processes.
    half = make_train_iterator(TOKENS, 8, 4, 3, 1, 2)
    half.set_state(state)
    assert np.array_equal(next(half)["tokens"], expected[0][2:])
    with pytest.raises(DataError, match="cannot resume"):
        make_train_iterator(TOKENS, 8, 4, seed=4).set_state(state)


def test_eval_batches_spread_over_the_whole_split_in_order():
    batches = eval_batches(TOKENS, 8, 4, 3)
    assert len(batches) == 3 and batches[0]["tokens"].shape == (4, 9)
    starts = np.concatenate([b["tokens"][:, 0] for b in batches])
    windows = (len(TOKENS) - 1) // 8
    assert starts[0] == 0 and starts[-1] == (windows - 1) * 8  # first and last window of the split
    assert np.all(np.diff(starts) > 0) and np.array_equal(batches[0]["tokens"], eval_batches(TOKENS, 8, 4, 3)[0]["tokens"])
    small = eval_batches(TOKENS[:25], 8, 4, 3)  # 3 windows: one full-shape batch cycling through them
    assert len(small) == 1 and small[0]["tokens"][:, 0].tolist() == [0, 8, 16, 0]
    with pytest.raises(DataError, match="validation split"):
        eval_batches(TOKENS[:5], 8, 4, 1)
