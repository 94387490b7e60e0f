"""Export, import, provenance and the HTML report, end to end through the command line on one tiny trained run."""

import json
import re
import shutil
import subprocess
import sysconfig
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from chipwise.cli import main
from chipwise.hf import read_checkpoint
from chipwise.provenance import git_commit
from chipwise.run_dir import RunDir
from conftest import require, run_and_export_logits, unavailable

# One worker trains the shared run once (module fixture) instead of each xdist worker training its own.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ecosystem_run")]


MODEL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=64",
         "model.vocab_size=320", "model.max_seq_len=64"]


def settings(tmp: Path, corpus: Path, run_dir: Path, steps: int, *extra: str, model=MODEL) -> list[str]:
    items = [*model, "train.seq_len=32",
             "train.batch_size=8", f"train.steps={steps}", "train.log_every=2", "train.eval_every=2",
             "train.checkpoint_every=2", "train.eval_batches=1", "train.warmup_steps=1",
             "hardware.price_per_hour=2.0", "hardware.power_watts=300",
             f"data.sources=[{corpus}]", f"data.cache_dir={tmp / 'cache'}", f"run_dir={run_dir}", *extra]
    return [x for s in items for x in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eco")
    corpus = tmp / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "string.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                 "colorsys.py", "keyword.py", "queue.py", "sched.py", "abc.py"):
        shutil.copy(stdlib / name, corpus / name)
    run = tmp / "run"
    assert main(["train", *settings(tmp, corpus, run, steps=4)]) == 0
    return tmp, corpus, run


@pytest.fixture(scope="module")
def exported(trained):
    tmp, _, run = trained
    out = tmp / "hf"
    assert main(["export", "--run", str(run), "--out", str(out), "--max-shard-size", "30KB"]) == 0
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_export_loads_in_transformers_with_the_same_logits_and_tokens(trained, exported):
    require("torch")
    transformers = require("transformers")
    _, _, run = trained
    shards = sorted(p.name for p in exported.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (exported / "model.safetensors.index.json").is_file()  # 30KB forces shards
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2

    text = "def shorten(text, width):\n    return text[:width]  # naïve"
    ids = Tokenizer.from_file(str(run / "tokenizer.json")).encode(text).ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf_tok.encode(text) == ids and hf_tok.decode(ids) == text

    ours, theirs = run_and_export_logits(run, exported, ids)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4


def test_export_never_overwrites_without_asking(trained, exported, capsys):
    tmp, _, run = trained
    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "\n" not in err
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before

    # --overwrite replaces the checkpoint files (old shards too) and leaves the user's own files alone.
    again = tmp / "hf-again"
    shutil.copytree(exported, again)
    (again / "NOTES.md").write_text("mine")
    assert main(["export", "--run", str(run), "--out", str(again), "--overwrite"]) == 0
    assert not list(again.glob("model-*.safetensors")) and not (again / "model.safetensors.index.json").exists()
    assert (again / "model.safetensors").is_file() and (again / "NOTES.md").read_text() == "mine"


def test_gelu_run_export_is_a_one_line_error(tmp_path, trained, capsys):
    _, _, run = trained
    gelu = tmp_path / "gelu"
    gelu.mkdir()
    text = (run / "config.yaml").read_text().replace("ffn: swiglu", "ffn: gelu")
    (gelu / "config.yaml").write_text(text)
    assert main(["export", "--run", str(gelu), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.ffn" in err and "\n" not in err and not (tmp_path / "out").exists()


def test_import_round_trip_and_training_continues_from_it(trained, exported, capsys):
    tmp, corpus, run = trained
    cfg = RunDir(run).read_config()
    original, _ = RunDir(run).latest_params(cfg)
    model_cfg, imported = read_checkpoint(exported, cfg.model.max_seq_len, cfg.model.scan_layers)
    assert model_cfg == cfg.model
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), original, imported)

    # A model --set against the checkpoint is refused before any work.
    run2 = tmp / "from-hf"
    assert main(["train", "--init-from", str(exported), *settings(tmp, corpus, run2, 2, "model.d_model=64")]) == 2
    assert "model.d_model is 64" in capsys.readouterr().err and not run2.exists()

    # The config file's model section (here a preset of another shape) gives way to the checkpoint's.
    config_file = tmp / "other-model.yaml"
    config_file.write_text("model: tiny\n")
    args = ["--config", str(config_file), *settings(tmp, corpus, run2, 2, model=[])]
    assert main(["train", "--init-from", str(exported), *args]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {exported}" in out
    # The from-scratch learning rate is called out (warm-up 1 of 2 steps is fine).
    warnings = [line for line in out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "train.lr 0.003 is a from-scratch rate" in warnings[0], warnings
    cfg2 = RunDir(run2).read_config()
    assert cfg2.model == cfg.model and cfg2.train.init_from == str(exported)
    # Step 0 evaluates the imported weights on the same validation tokens: the first run's final loss.
    final = [r["val_loss"] for r in records(run) if "val_loss" in r][-1]
    start = [r["val_loss"] for r in records(run2) if "val_loss" in r][0]
    assert start == pytest.approx(final, rel=1e-5)

    assert main(["train", "--init-from", str(exported), "--resume", str(run2)]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_import_refuses_what_chipwise_cannot_represent(tmp_path, exported, trained, capsys):
    tmp, corpus, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    assert main(["train", "--init-from", str(bad), *settings(tmp, corpus, tmp_path / "r", 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mlp_bias" in err and "\n" not in err and not (tmp_path / "r").exists()


def test_run_info_records_provenance(trained):
    _, _, run = trained
    prov = json.loads((run / "run_info.json").read_text())["provenance"]
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "grain"):
        assert prov["packages"][name] == metadata.version(name)
    assert len(prov["device_list"]) == len(jax.devices()) and prov["chipwise"]
    git = prov["git"]
    assert (git["commit"] is None and git["note"]) or re.fullmatch(r"[0-9a-f]{40}", git["commit"])
    steps = {k for r in records(run) for k in r}
    assert {"checkpoint_s", "eval_s", "time", "data_wait_s"} <= steps


def test_git_commit_outside_a_checkout(tmp_path):
    got = git_commit(tmp_path)
    assert got["commit"] is None and got["note"]


def test_report_renders_in_headless_chromium(trained, tmp_path, capsys):
    tmp, _, run = trained
    other = tmp_path / "run-b"  # a second run (a copy) to compare on the same axes
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    out = tmp_path / "report"
    assert main(["report", str(run), str(other), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == {"loss.png", "throughput.png", "step_time.png", "cost.png"}
    assert "does not report" in page  # memory on CPUs: said, not drawn
    commit = json.loads((run / "run_info.json").read_text())["provenance"]["git"]["commit"]
    assert (commit or "unknown") in page and metadata.version("jax") in page and "run-b" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained

    assert main(["report", str(run), "--out", str(out)]) == 2  # not over an existing report without asking
    assert "not empty" in capsys.readouterr().err

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("Debian's chromium", "apt-get install chromium (.ci/run does)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--allow-file-access-from-files", "--virtual-time-budget=10000"]
    # A same-origin harness page frames the report and writes what the browser made of its images.
    harness = out.parent / "harness.html"
    harness.write_text("""<html><body><pre id='result'>pending</pre>
<iframe id='f' src='report/index.html' width='1200' height='800'></iframe>
<script>
document.getElementById('f').onload = function () {
  const imgs = Array.from(this.contentDocument.images);
  document.getElementById('result').textContent = 'IMAGES ' + JSON.stringify(
    imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]));
};
</script></body></html>""")
    dom = subprocess.run([*flags, "--dump-dom", harness.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"IMAGES (\[.*\])", dom.stdout)
    assert found, f"chromium did not report images: {dom.stdout[-500:]} {dom.stderr[-500:]}"
    loaded = json.loads(found.group(1))
    assert sorted(src for src, *_ in loaded) == sorted(images)
    assert all(done and width > 100 and height > 100 for _, done, width, height in loaded), loaded

    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # not a blank page
    assert (pixels.reshape(-1, 3).std(axis=1) > 0.1).mean() > 0.005  # some coloured pixels: the plotted lines


def test_special_tokens_and_chat_template_survive_import_train_and_export(trained, exported, tmp_path):
    """An instruct model must still end its turns and chat after continued training: what its checkpoint says of
    its tokens goes into the run, to serving and to the export."""
    from chipwise.serve.model_source import from_run

    tmp, corpus, _ = trained
    source = tmp_path / "instruct"
    shutil.copytree(exported, source)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    tok_cfg = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": template,
                                                              "pad_token": "<|endoftext|>"}))
    (source / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [0, 7],
                                                               "pad_token_id": 0}))
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(source), *settings(tmp, corpus, run, 1)]) == 0
    served = from_run(str(run))
    assert served.chat_template == template and served.eos_ids == (0, 7)
    out = tmp_path / "out"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 7]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [0, 7]
    kept = json.loads((out / "tokenizer_config.json").read_text())
    assert kept["chat_template"] == template and kept["pad_token"] == "<|endoftext|>"
    transformers = require("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n[assistant]"
