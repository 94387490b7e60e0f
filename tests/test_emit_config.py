"""`chipwise plan --emit-config`: the planner's layout as a config that `chipwise train` runs as it is."""

import jax
import pytest
import yaml

from chipwise.cli import main
from conftest import one_line_error, set_args

# The CPU has no published peak or bandwidth: give the planner figures to plan 8 simulated devices with.
CPU_FIGURES = ["--catalog-set", "cpu.bf16_tflops=0.1", "--catalog-set", "cpu.hbm_tbps=0.02",
               "--catalog-set", "cpu.scaleout_gbps_per_chip=100"]


def plan_args(model, out, *extra):
    return ["plan", "--model", str(model), "--accelerator", "cpu", "--chips", "8", "--seq-len", "32",
            "--global-batch", "16", *CPU_FIGURES, "--emit-config", str(out), *extra]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("num_layers: 2\nd_model: 32\nnum_heads: 2\nnum_kv_heads: 1\nd_ff: 64\nvocab_size: 320\n"
                    "max_seq_len: 64\n")
    return path


@pytest.mark.parametrize("mesh, train", [
    ("data=2,fsdp=4", {"grad_accum": 2, "pipeline_microbatches": 0}),  # the micro-batches accumulate gradients
    ("pipeline=2,data=2,fsdp=2", {"grad_accum": 1, "pipeline_microbatches": 2}),  # ...or fill the pipeline
])
def test_the_emitted_config_trains_as_it_is(tmp_path, model_file, corpus, capsys, mesh, train):
    assert len(jax.devices()) == 8
    out = tmp_path / "planned.yaml"
    assert main(plan_args(model_file, out, "--mesh", mesh, "--microbatches", "2", "--remat", "full",
                          "--tokens", "2048")) == 0
    assert f"written to {out}" in capsys.readouterr().err
    values = yaml.safe_load(out.read_text())
    sizes = dict(item.split("=") for item in mesh.split(","))
    assert values["mesh"] == {"pipeline": 1, "context": 1, "tensor": 1} | {k: int(v) for k, v in sizes.items()}
    assert values["train"] | train == values["train"] and values["train"]["remat"] == "full"
    assert values["train"]["batch_size"] == 16 and values["train"]["seq_len"] == 32
    assert values["train"]["steps"] == 4  # 2,048 tokens at 16 x 32 a step
    assert values["model"]["num_layers"] == 2 and values["model"]["d_model"] == 32
    run = tmp_path / "run"
    assert main(["train", "--config", str(out),
                 *set_args(f"data.sources=[{corpus}]", f"run_dir={run}", "train.eval_batches=1",
                           "train.warmup_steps=1")]) == 0
    info = yaml.safe_load((run / "config.yaml").read_text())
    assert info["mesh"] == values["mesh"] and info["train"] | train == info["train"]
    assert (run / "metrics.jsonl").read_text().count('"step": 4') >= 1


def test_an_existing_file_is_never_overwritten(tmp_path, model_file, capsys):
    out = tmp_path / "mine.yaml"
    out.write_text("precious: true\n")
    assert main(plan_args(model_file, out)) == 2
    assert "already exists" in one_line_error(capsys)
    assert out.read_text() == "precious: true\n"


@pytest.mark.parametrize("case, extra, message", [
    ("no folder", [], "does not exist; create it first"),
])
def test_a_plan_the_trainer_cannot_run_writes_nothing(tmp_path, model_file, capsys, case, extra, message):
    out = tmp_path / ("missing" if case == "no folder" else ".") / "planned.yaml"
    assert main(plan_args(model_file, out, *extra)) == 2
    assert message in one_line_error(capsys)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml"]
