import subprocess
import sys

import pytest

from chipwise.config import load_config
from chipwise.errors import ConfigError
from chipwise.presets import PRESETS


def test_presets_and_overrides():
    cfg = load_config(None, ["model.preset=llama3-8b", "train.steps=7", "train.lr=6e-4", "data.sources=[a.txt, b]",
                             "hardware.price_per_hour=2"])
    assert (cfg.model.num_layers, cfg.model.num_kv_heads, cfg.model.vocab_size) == (32, 8, 128256)
    assert cfg.train.lr == 6e-4 and cfg.train.steps == 7 and cfg.data.sources == ["a.txt", "b"] and cfg.hardware.price_per_hour == 2.0
    for name in ("tiny", "125m", "350m", "1b", "llama2-7b", "llama2-70b", "llama3-8b", "llama3-70b",
                 "llama3-405b", "gpt3-175b"):
        assert name in PRESETS
        load_config(None, [f"model.preset={name}", "train.seq_len=128"])  # every preset validates


def test_yaml_file_with_preset_and_field_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny, num_layers: 2}\ntrain: {steps: 3}\n")
    cfg = load_config(str(path), ["model.d_ff=512"])
    assert cfg.model.num_layers == 2 and cfg.model.d_ff == 512 and cfg.model.d_model == PRESETS["tiny"]["d_model"]


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=1"], "unknown config key 'train.stepz'"),
    (["train.steps=abc"], "train.steps must be int"),
    (["train.lr=fast"], "train.lr must be float"),
    (["model.num_heads=7"], "must divide model.d_model"),
    (["model.num_kv_heads=3"], "model.num_kv_heads (3) must divide model.num_heads"),
    (["train.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train.batch_size=10", "train.grad_accum=4"], "must be divisible by train.grad_accum"),
    (["mesh.data=0"], "mesh.data must be a positive size or -1"),
    (["model.ffn=relu"], "model.ffn must be one of"),
    (["model.preset=gpt5"], "unknown model preset"),
    (["train.steps"], "--set expects key=value"),
    (["hardware.price_per_hour=-1"], "must be positive"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "chipwise", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "train.stepz=1"], "unknown config key"),
    (["train", "--set", "mesh.data=3"], "needs 3 devices"),
    (["train", "--set", "train.batch_size=12", "--set", "mesh.data=8"], "divisible by the data-parallel size"),
    (["train", "--set", "data.sources=[/nonexistent/corpus]"], "/nonexistent/corpus"),
    (["train", "--frobnicate"], "unrecognized arguments"),
    (["sample", "--run", "/nonexistent", "--prompt", "x"], "not a chipwise run directory"),
])
def test_cli_errors_exit_2_without_traceback(tmp_path, args, message):
    if args[0] == "train" and "--frobnicate" not in args:
        args = [*args, "--set", f"run_dir={tmp_path / 'run'}"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
