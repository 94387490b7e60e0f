"""benchmarks/train_step.py end to end at toy size, and the PyTorch twin of the model in benchmarks/torch_llama.py."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
TOY = ["--preset", "tiny", "--set", "model.num_layers=1", "--batch-size", "2", "--seq-len", "32",
       "--steps", "2", "--warmup", "1"]


def run_script(*args, timeout=180):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it (conftest simulates eight for this process)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def tokens_per_s(stdout: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"^\s+tokens/s\s+([\d,.]+)", stdout, re.M)]


@pytest.fixture(scope="module")
def toy_run():
    """One toy run for the tests below; it also times PyTorch eager where torch is installed."""
    return run_script(*TOY, "--markdown", "--compare-torch", "--torch-modes", "eager",
                      "--torch-threads", "1")  # one thread: OpenMP crawls when other tests share the cores


@pytest.mark.xdist_group("benchmark_toy_run")  # one worker runs the script once
def test_benchmark_prints_throughput_and_mfu_with_its_peak(toy_run):
    assert toy_run.returncode == 0, toy_run.stderr
    out = toy_run.stdout
    rates = tokens_per_s(out)
    assert rates and all(r > 0 for r in rates), out
    peak_kinds = "derived from the instruction set|measured here|catalog|user-given"
    assert re.search(rf"MFU\s+[\d.]+% of [\d.]+ TFLOP/s per device \(({peak_kinds})", out), out
    assert "6N+causal attn" in out  # the FLOPs convention
    assert re.search(r"^\| chipwise \(JAX, float32, (reference|cpu_fused) attention\) \| [\d,]+ \|", out, re.M), out
    assert "Machine: " in out


@pytest.mark.parametrize("args, message", [
    (["--preset", "no-such-model"], "unknown model preset 'no-such-model'"),
    (["--preset", "tiny", "--seq-len", "4096"], "exceeds model.max_seq_len"),
    (["--preset", "tiny", "--batch-size", "0"], "--batch-size must be positive"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    proc = run_script(*args, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


# ---- the PyTorch model (torch is the optional `bench` extra) ----------------------------------------------------

def torch_llama():
    require("torch", "pip install -e '.[bench]' or '.[dev]' (`make test` does)")
    spec = importlib.util.spec_from_file_location("torch_llama", ROOT / "benchmarks" / "torch_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", [
    dict(preset="tiny"),
    dict(preset="tiny", num_kv_heads=1),
    dict(preset="tiny", num_kv_heads=4, ffn="gelu", tie_embeddings=False),
])
def test_torch_model_matches_chipwise_parameter_count_and_initial_loss(variant):
    tl = torch_llama()
    import torch

    from chipwise import flops
    from chipwise.config import from_dict

    cfg = from_dict({"model": variant}).model
    torch.manual_seed(0)
    model = tl.Llama(cfg)
    assert model.num_params() == flops.param_count(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 1.0


@pytest.mark.parametrize("variant", [dict(), dict(num_kv_heads=1, ffn="gelu", tie_embeddings=False)])
def test_torch_model_computes_what_chipwise_computes(small_model_cfg, variant):
    """Same weights in, same logits out: the architectures agree (rotary pairing, GQA grouping, norms, head)."""
    tl = torch_llama()
    import torch
    from flax import nnx

    from chipwise.config import ModelConfig
    from chipwise.model import Transformer

    cfg = ModelConfig(**{**small_model_cfg.__dict__, **variant})
    jax_model = Transformer(cfg, nnx.Rngs(params=0))
    model = tl.Llama(cfg)
    model.load_chipwise(nnx.to_pure_dict(nnx.state(jax_model)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24), dtype=np.int32)
    with torch.no_grad():
        ours = model(torch.from_numpy(tokens.astype(np.int64))).numpy()
    np.testing.assert_allclose(ours, np.asarray(jax_model(tokens)), rtol=1e-4, atol=1e-4)


@pytest.mark.xdist_group("benchmark_toy_run")  # one worker runs the script once
def test_benchmark_compares_with_torch_eager(toy_run):
    torch_llama()  # skips without torch
    assert toy_run.returncode == 0, toy_run.stderr
    rates = tokens_per_s(toy_run.stdout)
    assert len(rates) == 2 and min(rates) > 0, toy_run.stdout
    assert re.search(r"^\| PyTorch eager \(fp32\) \| [\d,]+ \|", toy_run.stdout, re.M), toy_run.stdout


@pytest.mark.parametrize("width", [128, 384, 768])
def test_gemm_compare_times_exactly_the_steps_matrix_multiplies(width):
    """benchmarks/gemm_compare.py's GEMMs of a step add up to the step's matmul FLOPs (6 x tokens x matmul weights:
    forward, input and weight gradients of every projection and the LM head), so its totals are the step's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gemm_compare import step_gemms
    from width_sweep import width_overrides

    from chipwise.config import load_config
    from chipwise.flops import matmul_params

    tokens = 2048
    cfg = load_config(None, width_overrides(width, 256))
    counted = sum(2 * m * k * n * count for _, _, m, k, n, count in step_gemms(width, tokens))
    assert counted == 6 * tokens * matmul_params(cfg.model)
