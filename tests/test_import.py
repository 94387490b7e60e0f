"""`chipwise import`: a run directory at step 0 from a Hugging Face Llama checkpoint or a GGUF file, which sample,
export, report and `train --resume` accept; and continued pre-training of a real model (SmolLM2-135M) from it."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from chipwise.cli import main
from chipwise.config import ModelConfig
from chipwise.data.corpus import Document
from chipwise.data.tokenizer import train_tokenizer
from chipwise.hf import read_checkpoint
from chipwise.hf.checkpoint import write_checkpoint
from chipwise.model import Transformer
from chipwise.run_dir import RunDir
from conftest import one_line_error, require, run_and_export_logits, set_args

pytestmark = pytest.mark.slow

MODEL = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, vocab_size=320, max_seq_len=64)


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus) -> Path:
    """A tiny Hugging Face Llama checkpoint: random weights (norm scales too), a tokenizer of the corpus."""
    out = tmp_path_factory.mktemp("source")
    docs = [Document(p.name, p.read_text()) for p in sorted(corpus.iterdir())]
    tok_file = out.parent / f"{out.name}-tokenizer.json"
    train_tokenizer(docs, MODEL.vocab_size).save(str(tok_file))
    params = nnx.to_pure_dict(nnx.state(Transformer(MODEL, nnx.Rngs(params=0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
    write_checkpoint(out, MODEL, params, tok_file)
    return out


def run_settings(tmp: Path, corpus: Path, *extra: str) -> list[str]:
    return set_args("train.seq_len=32", "train.batch_size=8", "train.eval_batches=1", "train.log_every=1",
                    "train.eval_every=2", f"data.sources=[{corpus}]", f"data.cache_dir={tmp / 'cache'}", *extra)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curves(run: Path) -> tuple[list, list]:
    """(step, train loss) of every step and (step, validation loss) of every evaluation."""
    rs = records(run)
    return ([(r["step"], r["loss"]) for r in rs if "loss" in r and "event" not in r],
            [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r])


def test_imported_run_is_sampled_exported_and_reported(tmp_path, corpus, source, capsys):
    run = tmp_path / "run"
    assert main(["import", str(source), "--out", str(run), *run_settings(tmp_path, corpus)]) == 0
    out = capsys.readouterr().out
    assert f"train it with: chipwise train --resume {run}" in out and "warning" not in out
    cfg = RunDir(run).read_config()
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.model.vocab_size) == (2, 32, 320)  # the checkpoint's
    # continued pre-training's settings (config_checks.py), not a from-scratch run's
    assert cfg.train.lr == 1e-4 and cfg.train.warmup_steps == cfg.train.steps // 10
    assert cfg.train.init_from == str(source) and cfg.data.tokenizer == str(source / "tokenizer.json")
    assert (run / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    assert json.loads((run / "tokenizer_meta.json").read_text())["special_tokens"]["eos_token"] == "<|endoftext|>"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["0"]
    val = [r for r in records(run) if "val_loss" in r]
    assert [r["step"] for r in val] == [0] and 0 < val[0]["val_loss"] < 2 * np.log(MODEL.vocab_size)

    assert main(["sample", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    hf = tmp_path / "hf"
    assert main(["export", "--run", str(run), "--out", str(hf)]) == 0
    _, exported = read_checkpoint(hf)
    _, original = read_checkpoint(source)
    jax.tree.map(np.testing.assert_array_equal, exported, original)  # bit for bit: fp32 in, fp32 out
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()


def test_resumed_import_trains_exactly_as_init_from(tmp_path, corpus, source, capsys):
    same = ["train.lr=3e-4", "train.warmup_steps=1"]
    imported, direct = tmp_path / "imported", tmp_path / "direct"
    assert main(["import", str(source), "--out", str(imported), *run_settings(tmp_path, corpus, *same)]) == 0
    # the step budget is given when training starts, as a run made by `train` is resumed with a new one
    assert main(["train", "--resume", str(imported), "--set", "train.steps=3"]) == 0
    assert "resumed from step 0" in capsys.readouterr().out
    assert main(["train", "--init-from", str(source),
                 *run_settings(tmp_path, corpus, *same, "train.steps=3", f"run_dir={direct}")]) == 0
    train_a, val_a = curves(imported)
    train_b, val_b = curves(direct)
    assert [s for s, _ in train_a] == [1, 2, 3] and [s for s, _ in val_a] == [0, 2, 3]
    assert train_a == train_b and val_a == val_b
    assert {"step": 0, "event": "resumed"}.items() <= [r for r in records(imported) if "event" in r][0].items()
    a, b = RunDir(imported), RunDir(direct)
    jax.tree.map(np.testing.assert_array_equal, a.latest_params(a.read_config())[0],
                 b.latest_params(b.read_config())[0])
    assert a.read_summary()["first_val_loss"] == b.read_summary()["first_val_loss"]


def test_an_import_resumes_after_its_source_is_gone(tmp_path, corpus, source, capsys):
    """The run's config names the source's tokenizer.json (for a GGUF file, a conversion in ~/.cache); once that is
    deleted the run resumes with its own copy, and its config then names that copy."""
    moved = tmp_path / "source"
    shutil.copytree(source, moved)
    run = tmp_path / "run"
    assert main(["import", str(moved), "--out", str(run), *run_settings(tmp_path, corpus)]) == 0
    shutil.rmtree(moved)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.steps=1"]) == 0
    assert f"data.tokenizer {moved / 'tokenizer.json'} is gone; using the run's own copy" in capsys.readouterr().err
    assert RunDir(run).read_config().data.tokenizer == str(RunDir(run).tokenizer_file)


def test_import_stores_params_in_the_training_dtype(tmp_path, corpus, source):
    import orbax.checkpoint as ocp

    run = tmp_path / "run"
    assert main(["import", str(source), "--out", str(run),
                 *run_settings(tmp_path, corpus, "train.param_dtype=bfloat16")]) == 0
    saved = ocp.StandardCheckpointer().metadata(run / "checkpoints" / "0" / "state").item_metadata
    dtypes = {str(x.dtype) for x in jax.tree.leaves(saved["params"])}
    assert dtypes == {"bfloat16"}
    assert main(["train", "--resume", str(run), "--set", "train.steps=1"]) == 0


def test_a_rollback_to_step_0_returns_to_the_imported_weights(tmp_path, corpus, source):
    """Non-finite steps straight after an import roll back to its step-0 checkpoint: the imported weights, never a
    random initialisation (whose near-uniform predictions score about ln(vocab))."""
    loud = tmp_path / "loud"  # weights whose loss is far from a random initialisation's
    loud.mkdir()
    _, params = read_checkpoint(source)
    write_checkpoint(loud, MODEL, jax.tree.map(lambda x: 4 * x, params), source / "tokenizer.json")
    run = tmp_path / "run"
    nan_first = ("train.inject_nan_batches=[0]", "train.max_bad_steps=1")
    assert main(["import", str(loud), "--out", str(run), *run_settings(tmp_path, corpus, *nan_first)]) == 0
    (loud / "model.safetensors").unlink()  # the imported run holds the weights itself
    assert main(["train", "--resume", str(run), "--set", "train.steps=1"]) == 0
    assert [r["step"] for r in records(run) if r.get("event") == "rollback"] == [0]
    (_, imported), (_, loss) = curves(run)[1][0], curves(run)[0][-1]  # step 0's, and step 1's after the rollback
    assert imported > 2 * np.log(MODEL.vocab_size) and abs(loss - imported) < 0.2 * imported, (loss, imported)


def test_import_refuses_a_used_out_and_a_bad_source(tmp_path, corpus, source, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in used.iterdir()}
    assert main(["import", str(source), "--out", str(used), *run_settings(tmp_path, corpus)]) == 2
    assert "--out" in one_line_error(capsys) and {p.name: p.stat().st_mtime_ns for p in used.iterdir()} == before
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    assert main(["import", str(source), "--out", str(a_file)]) == 2
    assert "is a file" in one_line_error(capsys) and a_file.read_text() == "mine"

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    for bad, says in [(tmp_path / "nowhere", "config.json"), (junk, "not a readable GGUF file"),
                      (corpus, "config.json")]:
        out = tmp_path / "new"
        assert main(["import", str(bad), "--out", str(out), *run_settings(tmp_path, corpus)]) == 2
        assert says in one_line_error(capsys) and not out.exists()
    # the model is the checkpoint's
    assert main(["import", str(source), "--out", str(out), *run_settings(tmp_path, corpus, "model.d_model=64")]) == 2
    assert "model.d_model is 64" in one_line_error(capsys) and not out.exists()


# ---- a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, conftest.gguf_path) ------------------------------------------
# Continued pre-training on the first 200 files of the default corpus (this Python's standard library), kept cheap
# for two CPU cores: batches of 2 sequences of 64 tokens, fp32 (the CPU's default), 4 fixed validation batches.
# 10 steps took the validation loss from 2.9273 to 2.8622, over three times the 0.02 checked (20 steps: 2.8365).
CPT = ["train.batch_size=2", "train.seq_len=64", "train.eval_batches=4", "train.steps=10", "train.log_every=5",
       "data.max_documents=200"]


def chipwise_on_one_device(cache: Path, *args: str) -> str:
    """The `chipwise` command as a user runs it on this machine: one CPU device (the eight simulated ones of the
    tests would each take a share of a batch of two); the cache is `cache` (conftest.gguf_cache: the GGUF file's
    conversion is test_gguf.py's)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "CHIPWISE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "chipwise", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"chipwise {' '.join(args)}: {done.stderr[-3000:]} {done.stdout[-2000:]}"
    return done.stdout


@pytest.mark.xdist_group("gguf")  # with test_gguf.py: one download, and one 135M model on the cores at a time
def test_continued_pretraining_of_smollm2_lowers_its_validation_loss(gguf_path, gguf_cache, tmp_path):
    require("torch")
    require("transformers")
    run, hf, took = tmp_path / "run", tmp_path / "hf", {}

    t0 = time.perf_counter()
    chipwise_on_one_device(gguf_cache, "import", str(gguf_path), "--out", str(run), *set_args(*CPT))
    took["import"] = time.perf_counter() - t0
    (_, before), = curves(run)[1]
    # a random initialisation predicts near-uniformly, ln(49152) = 10.8; a trained model is far below
    assert before < 3.5 < np.log(49152) - 7

    t0 = time.perf_counter()
    chipwise_on_one_device(gguf_cache, "train", "--resume", str(run))
    took["train 10 steps"] = time.perf_counter() - t0
    train, val = curves(run)
    assert [s for s, _ in train] == [5, 10] and [s for s, _ in val] == [0, 10]
    after = val[-1][1]
    assert after < before - 0.02, (before, after)

    t0 = time.perf_counter()
    chipwise_on_one_device(gguf_cache, "export", "--run", str(run), "--out", str(hf))
    took["export"] = time.perf_counter() - t0
    ids = Tokenizer.from_file(str(run / "tokenizer.json")).encode("def fibonacci(n):\n    return").ids
    ours, theirs = run_and_export_logits(run, hf, ids)
    assert np.abs(theirs - ours).max() < 1e-3
    print(f"validation loss {before:.4f} -> {after:.4f}; seconds: {took}")
