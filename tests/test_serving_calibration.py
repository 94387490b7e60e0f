"""`chipwise bench --serve`: the serving planner's constants fitted on chipwise's own serving engine, written into the
calibration profile, and used by `plan --serve` on this machine. The fit and the planner's use of a profile are
checked without timing; one test (marked `timing`, run alone by `make test`) measures tiny engines for real."""

import json
from dataclasses import replace

import jax
import pytest

from chipwise import catalog
from chipwise.cli import main
from chipwise.config import ModelConfig
from chipwise.plan import assumptions as A
from chipwise.plan import serving_calibration as S
from chipwise.plan.calibration import PROFILE_VERSION, calibrated_chip, machine_id

KNOWN = A.ServingAssumptions(1.0, 0.45, 2e-3, 5e-4, 8e-4, 0.12, overlap=False)
CPU = replace(catalog.get("cpu"), bf16_tflops=0.2, fp32_tflops=0.2, hbm_tbps=0.04, hbm_gib=16.0)


def synthetic(shapes, constants=KNOWN):
    """Points whose measured times are the model's own at `constants` (no timing)."""
    out = []
    for s in shapes:
        cfg = ModelConfig(**S.MODELS[s.model], max_seq_len=S.MAX_SEQ, scan_layers=False)
        for kind, n in [("ttft", n) for n in s.input_lens] + [("tpot", 0)]:
            p = S.point(CPU, s.model, cfg, kind, s.slots, n, 1.0)
            out.append(replace(p, measured_s=S.predict(p, constants)))
    return out


def test_the_fit_recovers_known_constants_and_predicts_held_out_shapes():
    fitted = S.fit(synthetic(S.CALIBRATION))
    for field in ("decode_bandwidth_efficiency", "prefill_efficiency", "request_overhead_s",
                  "decode_step_overhead_s", "sequence_overhead_s", "decode_compute_efficiency"):
        assert getattr(fitted, field) == pytest.approx(getattr(KNOWN, field), rel=1e-6), field
    for p in synthetic(S.HELD_OUT):
        assert S.predict(p, fitted) == pytest.approx(p.measured_s, rel=1e-6)
    # Held out: a width and prompt lengths and slot counts the fit never saw.
    fitted_on = {(s.model, s.slots) for s in S.CALIBRATION} | {n for s in S.CALIBRATION for n in s.input_lens}
    assert all((s.model, s.slots) not in fitted_on for s in S.HELD_OUT)
    assert any(n not in fitted_on for s in S.HELD_OUT for n in s.input_lens)


def test_plan_serve_uses_the_profile_of_this_machine(tmp_path, capsys):
    """A profile's serving section replaces the CPU's catalog figures (none) and the platform's constants: the
    planner's TTFT and TPOT are the fitted formulas'."""
    section = {"weights_dtype": "fp32", "peak_tflops": CPU.bf16_tflops, "memory_tbps": CPU.hbm_tbps,
               "memory_gib": CPU.hbm_gib, "constants": KNOWN.__dict__}
    profile = {"version": PROFILE_VERSION, "accelerator": "cpu", "machine": machine_id(jax.devices("cpu")[0]),
               "serving": section}
    (tmp_path / "cpu.json").write_text(json.dumps(profile))
    args = ["plan", "--serve", "--model", "tiny", "--accelerator", "cpu", "--chips", "1", "--input-len", "64",
            "--output-len", "64", "--weights-dtype", "fp32", "--calibration", str(tmp_path), "--json"]
    assert main(args + ["--batch", "1"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    from chipwise.plan.serving import _Chip
    from chipwise.presets import PRESETS

    chip = _Chip(CPU, ModelConfig(**PRESETS["tiny"]), 1, "fp32", KNOWN)
    expected = chip.prefill(1, 64) + KNOWN.request_overhead_s + KNOWN.sequence_overhead_s
    assert row["ttft_s"] == pytest.approx(expected)
    assert row["tpot_s"] == pytest.approx(chip.decode_step(1, 64 + 32)["decode_step_s"])
    # Without a profile the CPU has no peak: the planner says how to get one.
    assert main(args[:-3] + ["--calibration", str(tmp_path / "none"), "--batch", "1"]) == 2
    assert "chipwise bench --serve" in capsys.readouterr().err


@pytest.mark.timing
@pytest.mark.slow
def test_bench_serve_measures_the_engine_and_predicts_held_out_shapes(tmp_path, capsys):
    """Tiny engines for real: the profile is written beside nothing else, held-out shapes are predicted from the
    calibration shapes alone, and `plan --serve` then plans with the measured chip. At these sizes a prefill is a
    few milliseconds and this shared VM's noise is of that order, so the bound here is loose; docs/planner.md has
    the default shapes' errors (`chipwise bench --serve`)."""
    models = {"a": dict(num_layers=2, d_model=64, num_heads=2, num_kv_heads=1, d_ff=176, vocab_size=512),
              "b": dict(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, d_ff=352, vocab_size=512),
              "c": dict(num_layers=3, d_model=96, num_heads=3, num_kv_heads=1, d_ff=256, vocab_size=512)}
    acc = catalog.get("cpu")
    section = S.calibrate_serving(acc, rounds=3, models=models)
    path = tmp_path / "cpu.json"
    S.write_serving(path, acc, jax.devices()[0], section)
    S.print_serving(acc, path, section)
    with capsys.disabled():
        print("\n" + capsys.readouterr().out)
    stored = json.loads(path.read_text())["serving"]
    assert len(stored["validation"]) == sum(len(s.input_lens) + 1 for s in S.HELD_OUT)
    # A prompt shorter than every calibration prompt (32 tokens: 1-2 ms, mostly the engine's fixed host time) is
    # extrapolated: since the engine's prefill lost its per-slot copies its error ranged 0-53% over four runs here.
    shortest = min(n for s in S.CALIBRATION for n in s.input_lens)
    assert all(abs(r["error"]) <= (0.75 if r["kind"] == "ttft" and r["input_len"] < shortest else 0.5)
               for r in stored["validation"]), stored["validation"]
    measured, constants = calibrated_chip(acc, str(tmp_path))
    assert constants is not None and measured.hbm_tbps == stored["memory_tbps"]
    assert main(["plan", "--serve", "--model", "tiny", "--accelerator", "cpu", "--chips", "1", "--input-len", "64",
                 "--output-len", "64", "--weights-dtype", "fp32", "--batch", "2", "--calibration", str(tmp_path),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ttft_s"] > 0
