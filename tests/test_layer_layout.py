"""Scanned and unrolled layer layouts in real runs: a checkpoint keeps its layout, and runs saved before layers were
scanned (no model.scan_layers in their config) still sample, export and resume."""

import shutil

import pytest
import yaml

from chipwise.cli import main
from chipwise.run_dir import RunDir
from conftest import TINY_MODEL, set_args

pytestmark = pytest.mark.slow


def args(run, corpus, *extra):
    return set_args(*TINY_MODEL, "model.num_layers=2", "train.log_every=1", "train.eval_every=1000",
                    "train.checkpoint_every=3", "hardware.peak_tflops=1", f"data.sources=[{corpus}]", f"run_dir={run}",
                    *extra)


@pytest.fixture(scope="module")
def unrolled_run(tmp_path_factory, corpus):
    """A run of 3 steps with unrolled layers; each test works on its own copy."""
    root = tmp_path_factory.mktemp("unrolled")
    with pytest.MonkeyPatch.context() as env:  # before conftest's per-test cache is set: one of its own
        env.setenv("CHIPWISE_CACHE", str(root / "cache"))
        assert main(["train", *args(root / "run", corpus, "train.steps=3", "model.scan_layers=false")]) == 0
    return root / "run"


def test_a_checkpoint_keeps_its_layer_layout(tmp_path, unrolled_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(unrolled_run, run)
    ckpt = RunDir(run).checkpoints(keep=3)
    assert ckpt.read_meta(3)["param_layout"] == "unrolled-layers-v1"  # the layout is recorded with the save
    ckpt.close()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.steps=6", "--set", "model.scan_layers=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unrolled layers" in err and "model.scan_layers=false" in err and "\n" not in err


def test_a_run_saved_before_scanned_layers_still_samples_exports_and_resumes(tmp_path, unrolled_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(unrolled_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["model"]["scan_layers"]  # as an older chipwise wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert RunDir(run).read_config().model.scan_layers is False
    assert main(["sample", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.steps=6"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out


def test_the_platform_decides_the_layout_and_the_run_records_it(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", *args(run, corpus, "train.steps=3")]) == 0
    assert RunDir(run).read_config().model.scan_layers is False  # PLATFORM_RULES: unrolled on CPUs


def test_scanned_runs_export_and_start_again_from_their_export_in_either_layout(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", *args(run, corpus, "train.steps=3", "model.scan_layers=true")]) == 0
    assert RunDir(run).read_config().model.scan_layers is True
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    for layout in ("true", "false"):  # HF files are per layer; either layout starts from them
        again = tmp_path / f"again-{layout}"
        assert main(["train", "--init-from", str(tmp_path / "hf"),
                     *args(again, corpus, "train.steps=3", f"model.scan_layers={layout}")]) == 0
        assert RunDir(again).read_config().model.scan_layers is (layout == "true")
