"""The whole trainer through its command line, on a tiny model and a tiny corpus of real Python files."""

import json

import pytest

from chipwise.cli import main

pytestmark = pytest.mark.slow

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device",
            "mfu", "step_time_s"}


def train_args(run_dir, corpus, steps=6, *extra):
    settings = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
                "model.d_ff=64", "model.vocab_size=320", "model.max_seq_len=64", "train.seq_len=32",
                "train.batch_size=8", f"train.steps={steps}", "train.log_every=2", "train.eval_every=3",
                "train.checkpoint_every=3", "train.eval_batches=1", "train.warmup_steps=1",
                f"data.sources=[{corpus}]", f"run_dir={run_dir}", *extra]
    return [x for s in settings for x in ("--set", s)]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_sample_and_run_dir_safety(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *train_args(run, corpus)]) == 0
    out = capsys.readouterr().out
    assert "chipwise run summary" in out and "MFU" in out
    assert "derived from the instruction set" in out or "measured here" in out  # the peak says what it is

    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all(REQUIRED <= r.keys() for r in train)
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in train)
    assert [r["step"] for r in val] == [0, 3, 6]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 6 * 8 * 32
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert "FLOPs 6N+causal" in summary["mfu_basis"] and "measured" in summary["mfu_basis"]
    assert summary["usd_per_million_tokens"] is None  # a CPU has no catalog price: unknown, not invented
    info = json.loads((run / "run_info.json").read_text())
    assert info["mesh"] == {"pipeline": 1, "data": 8, "fsdp": 1, "context": 1, "tensor": 1}
    assert info["attention"] == "cpu_fused"

    # Starting again over the same directory is refused, and nothing is touched.
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", *train_args(run, corpus)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before

    # Resume continues from the last checkpoint (step 6) to a longer horizon, with a price now known.
    assert main(["train", "--resume", str(run), "--set", "train.steps=8", "--set", "hardware.price_per_hour=2.5",
                 "--set", "hardware.power_watts=100"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 6" in out
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 8 * 8 * 32 and summary["invocations"] == 2  # the whole run, both invocations
    expected = 2.5 / 3600 / summary["tokens_per_s"] * 1e6
    assert summary["usd_per_million_tokens"] == pytest.approx(expected)
    assert summary["kwh_per_million_tokens"] == pytest.approx(0.1 / 3600 / summary["tokens_per_s"] * 1e6)

    assert main(["sample", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--top-k", "5",
                 "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, corpus, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["train", "--overwrite", *train_args(precious, corpus)]) == 2
    assert "not a chipwise run directory" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_empty_data_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *train_args(tmp_path / "run", empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_the_python_api_trains_exactly_like_the_command(tmp_path, corpus):
    """`Trainer(cfg).run()` from Python, under JAX's own default PRNG, gives the parameters `chipwise train`
    gives: nothing depends on how the process was started."""
    import jax
    import numpy as np

    from chipwise import prng
    from chipwise.config import load_config
    from chipwise.run_dir import RunDir
    from chipwise.train.loop import Trainer
    from chipwise.train.step import abstract_state

    assert main(["train", *train_args(tmp_path / "cli", corpus, 3)]) == 0
    default = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "threefry2x32")  # what a fresh Python process has
    try:
        settings = train_args(tmp_path / "api", corpus, 3)[1::2]
        Trainer(load_config(None, settings)).run()
    finally:
        jax.config.update("jax_default_prng_impl", default)
    cli, api = (RunDir(tmp_path / name) for name in ("cli", "api"))
    cfg = cli.read_config()
    cli_params, _ = cli.latest_params(cfg)
    api_params, _ = api.latest_params(api.read_config())
    assert jax.tree.structure(cli_params) == jax.tree.structure(api_params)
    for a, b in zip(jax.tree.leaves(cli_params), jax.tree.leaves(api_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The run's PRNG state is the named implementation's key data, whatever JAX's default (threefry's key data
    # has another shape, so a key made without naming the implementation fails here).
    assert prng.IMPL != jax.config.jax_default_prng_impl
    state, _ = abstract_state(cfg)
    assert state["rng"].shape == jax.random.key_data(jax.random.key(0, impl=prng.IMPL)).shape
    assert state["rng"].shape != jax.random.key_data(jax.random.key(0, impl="threefry2x32")).shape


def test_a_refused_command_creates_nothing(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *train_args(run, corpus), "--set", "mesh.data=3"]) == 2  # 8 devices here
    assert "mesh" in capsys.readouterr().err
    assert not run.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *train_args(run, empty)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not run.exists()


def test_output_to_a_pipe_is_not_wrapped(tmp_path, corpus, capsys):
    assert main(["train", *train_args(tmp_path / "run", corpus, 2)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (devices,) = [line for line in lines if line.strip().startswith("devices")]
    assert "attention cpu_fused" in devices  # the header's longest line, whole
    (step,) = [line for line in lines if line.strip().startswith("step") and "tok/s" in line]
    assert "data wait" in step
