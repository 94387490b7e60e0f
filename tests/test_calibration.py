"""`chipwise bench` on this CPU, then `chipwise plan` with its profile, against real train steps it never saw.

Marked `timing`: `make test` runs it alone after the other tests (one CPU device), since it compares wall-clock
times and another test running beside it would land in one measurement but not the other.
"""

import json

import pytest

from chipwise import catalog
from chipwise.cli import main
from chipwise.config import ModelConfig
from chipwise.plan.calibration import CALIBRATION_RUNS, VALIDATION_RUNS, fit_matmul, fit_step
from chipwise.plan.perf import Layout, chip_model, estimate


def test_fits_recover_known_parameters():
    """The fitting code, on synthetic data made from known parameters (no timing involved)."""
    shapes = [(m, k, n) for m in (64, 512, 4096) for k in (64, 512) for n in (32, 1024)]
    samples = [(m, k, n, 2.0 * 0.8 * m / (m + 50) * k / (k + 50) * n / (n + 50)) for m, k, n in shapes]
    samples.append((10**9, 10**9, 10**9, 2.0 * 0.8))  # the peak itself
    peak, eff, half = fit_matmul(samples)
    assert peak == pytest.approx(1.6) and eff == pytest.approx(1.0, rel=0.02) and half == pytest.approx(50, rel=0.05)
    parts = [[1.0, 0.2, 0.1], [2.0, 0.1, 0.3], [4.0, 0.5, 0.2], [1.0, 1.0, 1.0], [3.0, 0.3, 0.9]]
    measured = [1.5 * a + 3.0 * b + 0.5 * c + 0.01 for a, b, c in parts]
    scales, overhead = fit_step(parts, measured)
    assert scales == pytest.approx([1.5, 3.0, 0.5], rel=1e-6) and overhead == pytest.approx(0.01, rel=1e-6)
    scales, overhead = fit_step(parts, [2.0 * a for a, b, c in parts])  # a negative fit is clipped to zero
    assert scales[0] == pytest.approx(2.0) and min(scales) >= 0 and overhead >= 0


@pytest.mark.timing
@pytest.mark.slow
def test_calibrated_plan_predicts_held_out_cpu_step_times(tmp_path, capsys):
    """`chipwise bench` times its calibration runs and six held-out shapes in one interleaved pass, fits on the
    former only, and records its predictions for the latter; `chipwise plan` with the profile gives the same
    predictions. The issue asks for at least three held-out configurations within 15% of the measured step
    time; six are held out and every one must land within 40%.

    The held-out shapes differ from every calibration run in depth, width, heads, vocabulary or batch. Why not
    all six within 15%: on this shared 2-vCPU VM a shape's step time moves by up to 16% between processes and
    by 5-10% between two copies of it in one process, and not by the same amount for every shape (its
    neighbours' load changes the cost of memory traffic more than that of arithmetic). Before the allocator fix
    (chipwise/host_memory.py) even three was out of reach: page faults made deep models up to 40% slower than the
    sum of their parts (docs/planner.md has every run)."""
    profile_file = tmp_path / "cpu.json"
    assert main(["bench", "--accelerator", "cpu", "--out", str(profile_file)]) == 0
    bench_output = capsys.readouterr().out
    with capsys.disabled():  # shown with -s (as `make test` runs it): docs/planner.md's figures come from here
        print("\n" + bench_output)
    profile = json.loads(profile_file.read_text())
    assert profile["accelerator"] == "cpu" and len(profile["measurements"]["train_steps"]) == len(CALIBRATION_RUNS)
    held = profile["validation"]
    assert [(r["model"], r["seq_len"], r["batch"]) for r in held] == [tuple(v) for v in VALIDATION_RUNS]
    assert not any(tuple(v) in [tuple(c) for c in CALIBRATION_RUNS] for v in VALIDATION_RUNS)

    for r in held:
        model = tmp_path / "model.yaml"
        model.write_text("\n".join(f"{k}: {v}" for k, v in (r["model"] | {"max_seq_len": r["seq_len"]}).items()))
        assert main(["plan", "--model", str(model), "--accelerator", "cpu", "--chips", "1", "--seq-len",
                     str(r["seq_len"]), "--global-batch", str(r["batch"]), "--mesh", "data=1", "--remat", "none",
                     "--microbatches", "1", "--calibration", str(profile_file), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert "calibrated" in row["peak_source"]
        assert row["step_time_s"] == pytest.approx(r["predicted_s"], rel=1e-9)
    report = "; ".join(f"{r['model']['num_layers']}x{r['model']['d_model']}: {r['error']:+.0%}" for r in held)
    assert len(held) >= 3 and sum(abs(r["error"]) <= 0.15 for r in held) >= 3, report
    assert all(abs(r["error"]) <= 0.40 for r in held), report


def test_a_profile_from_another_machine_is_not_used(tmp_path):
    from chipwise.plan.calibration import PROFILE_VERSION, find_profile

    fields = dict(peak_tflops=0.1, matmul_efficiency=0.5, matmul_half_dim=10.0, attention_efficiency=0.5, tile=1,
                  hbm_tbps=0.02, memory_efficiency=1.0, flash_attention=False, compute_bytes=4, step_overhead_s=0.001,
                  matmul_scale=1.5, attention_scale=1.0, elementwise_scale=1.0)
    (tmp_path / "cpu.json").write_text(json.dumps({"version": PROFILE_VERSION, "accelerator": "cpu",
                                                   "machine": "cpu: some other processor x64", "chip_model": fields}))
    assert find_profile(catalog.get("cpu"), tmp_path) is None
    (tmp_path / "cpu.json").write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        find_profile(catalog.get("cpu"), tmp_path)


def test_plan_on_an_uncalibrated_cpu_says_to_run_bench(tmp_path, capsys):
    args = ["plan", "--model", "tiny", "--accelerator", "cpu", "--chips", "1", "--seq-len", "256",
            "--global-batch", "8", "--calibration", str(tmp_path)]
    assert main(args) == 2
    assert "chipwise bench" in capsys.readouterr().err


def test_estimate_uses_a_profile(tmp_path):
    """A profile replaces the model's compute figures: twice the measured speed, half the compute time."""
    fields = dict(peak_tflops=0.1, matmul_efficiency=0.5, matmul_half_dim=10.0, attention_efficiency=0.5, tile=1,
                  hbm_tbps=0.02, memory_efficiency=1.0, flash_attention=False, compute_bytes=4, step_overhead_s=0.0,
                  matmul_scale=1.0, attention_scale=1.0, elementwise_scale=1.0)
    model = ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128, vocab_size=256)
    slow = estimate(model, 64, 4, chip_model(catalog.get("cpu"), {"chip_model": fields}), Layout())
    half = {"matmul_scale": 0.5, "attention_scale": 0.5, "elementwise_scale": 0.5, "loss_scale": 0.5}
    fast = estimate(model, 64, 4, chip_model(catalog.get("cpu"), {"chip_model": fields | half}), Layout())
    assert fast.step_time_s == pytest.approx(slow.step_time_s / 2)
    # A fixed cost per layer counts once per layer and micro-batch.
    per_layer = estimate(model, 64, 4, chip_model(catalog.get("cpu"), {"chip_model": fields | {
        "layer_overhead_s": 0.01}}), Layout(microbatches=2))
    two_mb = estimate(model, 64, 4, chip_model(catalog.get("cpu"), {"chip_model": fields}), Layout(microbatches=2))
    assert per_layer.step_time_s - two_mb.step_time_s == pytest.approx(2 * 2 * 0.01)
    assert per_layer.parts["dispatch"] == pytest.approx(0.04)
