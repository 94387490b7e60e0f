"""`chipwise bench`: measure this machine's chip and write the calibration profile the planner uses for it.

Three measurements, each feeding one part of the step-time model (perf.py):
  1. GEMM throughput over a sweep of shapes -> the peak, the large-shape efficiency and the dimension at which a
     GEMM runs at half speed (eff(m,k,n) = E * m/(m+h) * k/(k+h) * n/(n+h), fitted in log space);
  2. streaming bandwidth (an element-wise pass over a large array) -> the memory-bound parts;
  3. real chipwise train steps on a dozen small models -> how much longer (or shorter) each modelled part really
     takes (GEMMs, attention, element-wise, loss: `*_scale`) and the fixed costs per layer and per step, by
     non-negative least squares on relative errors.
A profile is JSON: the fitted figures, every raw measurement, the machine, and the date.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from chipwise.catalog import Accelerator
from chipwise.plan import assumptions as A
from chipwise.config import ModelConfig
from chipwise.errors import ConfigError
from chipwise.process import usable_cores

log = logging.getLogger("chipwise.bench")

PROFILE_VERSION = 2  # 2: loss and per-layer dispatch fitted apart (version-1 profiles must be measured again)
# What a calibration fits, by non-negative least squares on real train steps: a scale for each modelled compute
# part (ChipModel.<part>_scale), seconds per layer run (layer_overhead_s) and per step (step_overhead_s). On this
# project's CPU VM, 26 measured shapes chose these: with GEMMs and attention under one scale, or the loss under
# the element-wise one, held-out errors reached 19-23%; with all four apart, 11-15% (docs/planner.md). The fitted
# GEMM and element-wise scales trade off against each other (both grow with tokens x width), so read their sum,
# not each one.
SCALED_PARTS = ("matmul", "attention", "elementwise", "loss")
# GEMM shapes (m, k, n) swept: the token counts and widths small models multiply on one chip.
MATMUL_SHAPES = [(m, k, n) for m in (256, 1024, 4096) for k in (64, 256, 1024) for n in (64, 256, 1024)]
# Models whose real train steps calibrate the scales and overheads: (model fields, seq_len, batch). Small on
# purpose (a CPU runs each in 10-110 ms); together they span depths 1-6, widths 32-192, sequences 64-256,
# batches 2-8 and vocabularies 512-8192, so that each fitted figure is pinned by runs that differ in it.
CALIBRATION_RUNS = [
    (dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=176, vocab_size=512), 64, 4),
    (dict(num_layers=2, d_model=128, num_heads=4, num_kv_heads=2, d_ff=352, vocab_size=1024), 128, 4),
    (dict(num_layers=3, d_model=96, num_heads=4, num_kv_heads=4, d_ff=256, vocab_size=2048), 64, 8),
    (dict(num_layers=2, d_model=192, num_heads=6, num_kv_heads=2, d_ff=512, vocab_size=1024), 256, 2),
    (dict(num_layers=2, d_model=64, num_heads=2, num_kv_heads=2, d_ff=176, vocab_size=512), 256, 4),  # attention
    (dict(num_layers=1, d_model=96, num_heads=3, num_kv_heads=1, d_ff=256, vocab_size=8192), 128, 4),  # the head
    (dict(num_layers=4, d_model=96, num_heads=3, num_kv_heads=1, d_ff=256, vocab_size=1024), 128, 4),  # depth
    (dict(num_layers=4, d_model=32, num_heads=2, num_kv_heads=2, d_ff=80, vocab_size=8192), 128, 4),  # loss
    (dict(num_layers=5, d_model=32, num_heads=2, num_kv_heads=1, d_ff=80, vocab_size=2048), 128, 2),  # dispatch
    (dict(num_layers=5, d_model=192, num_heads=6, num_kv_heads=2, d_ff=512, vocab_size=2048), 64, 2),
    (dict(num_layers=6, d_model=64, num_heads=2, num_kv_heads=2, d_ff=176, vocab_size=512), 256, 2),
    (dict(num_layers=4, d_model=192, num_heads=6, num_kv_heads=2, d_ff=512, vocab_size=2048), 256, 2),  # largest
]
VALIDATION_RUNS = [
    (dict(num_layers=3, d_model=128, num_heads=4, num_kv_heads=2, d_ff=352, vocab_size=2048), 128, 4),
    (dict(num_layers=2, d_model=160, num_heads=5, num_kv_heads=5, d_ff=448, vocab_size=1024), 64, 8),
    (dict(num_layers=4, d_model=64, num_heads=2, num_kv_heads=1, d_ff=192, vocab_size=4096), 256, 2),
    (dict(num_layers=3, d_model=192, num_heads=6, num_kv_heads=1, d_ff=512, vocab_size=8192), 128, 2),
    (dict(num_layers=3, d_model=48, num_heads=3, num_kv_heads=1, d_ff=128, vocab_size=4096), 256, 2),
    (dict(num_layers=5, d_model=96, num_heads=3, num_kv_heads=1, d_ff=256, vocab_size=1024), 64, 8),
]


def cpu_model() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what Python's platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_id(device) -> str:
    """What a profile is valid for: the device kind, and on CPUs the processor model and core count."""
    if device.platform != "cpu":
        return device.device_kind
    return f"cpu: {cpu_model()} x{usable_cores()}"


def default_dir() -> Path:
    from chipwise.data.cache import default_cache_dir

    return default_cache_dir() / "calibration"


def profile_path(acc_id: str, directory: str | Path | None = None) -> Path:
    if str(directory or "").endswith(".json"):
        return Path(directory)
    return Path(directory or default_dir()) / f"{acc_id}.json"


def load_profile(path: str | Path) -> dict:
    path = Path(path)
    try:
        profile = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read calibration profile {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"calibration profile {path} is not valid JSON ({e.msg}); rerun `chipwise bench`") from None
    if (not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION
            or not ("chip_model" in profile or "serving" in profile)):
        raise ConfigError(f"calibration profile {path} is not a version-{PROFILE_VERSION} chipwise profile; "
                          "rerun `chipwise bench`")
    profile["path"] = str(path)
    return profile


def find_profile(acc: Accelerator, directory: str | Path | None = None, need: str = "chip_model") -> dict | None:
    """The profile for this chip, if one was measured; a CPU profile only if it was measured on this CPU. `need`:
    the section wanted ("chip_model": training, written by `chipwise bench`; "serving": by `bench --serve`)."""
    path = profile_path(acc.id, directory)
    if not path.exists():
        return None
    profile = load_profile(path)
    if need not in profile:
        return None
    if acc.platform == "cpu" and profile.get("machine") != machine_id(jax.devices("cpu")[0]):
        log.warning("ignoring %s: measured on %s, not this machine", path, profile.get("machine"))
        return None
    return profile


def calibrated_chip(acc: Accelerator, directory: str | None = None) -> tuple[Accelerator, A.ServingAssumptions | None]:
    """The chip as `chipwise bench --serve` measured it, with its fitted constants; else as the catalog has it. Only
    CPUs are looked up (a profile is valid on the processor it was measured on)."""
    if acc.platform != "cpu":
        return acc, None
    profile = find_profile(acc, directory, need="serving")
    if profile is None:
        return acc, None
    s = profile["serving"]
    measured = replace(acc, bf16_tflops=s["peak_tflops"], fp32_tflops=s["peak_tflops"], hbm_tbps=s["memory_tbps"],
                       hbm_gib=s["memory_gib"])
    return measured, A.ServingAssumptions(**s["constants"])


# ------------------------------------------------------------------------------------------- measuring


def _best_time(fn, *args, seconds: float, min_runs: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def measure_matmul(m: int, k: int, n: int, dtype, device, seconds: float = 0.15) -> float:
    """TFLOP/s of one [m,k] x [k,n] GEMM on `device` (best of repeated runs)."""
    a = jax.device_put(jnp.ones((m, k), dtype), device)
    b = jax.device_put(jnp.ones((k, n), dtype), device)
    return 2 * m * k * n / _best_time(jax.jit(jnp.matmul), a, b, seconds=seconds) / 1e12


def measure_bandwidth(dtype, device, megabytes: int = 16, runs: int = 20) -> float:
    """TB/s of an element-wise pass (read an array, write it back in place) over `megabytes` of data.

    The buffer is donated, as the train step's are: a fresh output each call would time the OS zeroing new pages.
    """
    n = megabytes * 2**20 // jnp.dtype(dtype).itemsize
    step = jax.jit(lambda v: v * 0.5 + 1.0, donate_argnums=0)
    x = step(jax.device_put(jnp.ones((n,), dtype), device))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        x = step(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n * jnp.dtype(dtype).itemsize / min(times) / 1e12


class TrainStepTimer:
    """chipwise's real (jitted, donated) train step for one model on one device, with random tokens, compiled
    once and warmed up; `run(n)` times n steps and keeps the fastest seen so far."""

    def __init__(self, model: ModelConfig, seq_len: int, batch: int, device, dtype_name: str):
        from chipwise.config import MeshConfig, from_dict
        from chipwise.sharding import make_mesh, use_mesh
        from chipwise.train.compiled_step import build_train_step

        cfg = from_dict({"model": asdict(model), "train": {"batch_size": batch, "seq_len": seq_len,
                                                           "dtype": dtype_name}})
        step = build_train_step(cfg, make_mesh(MeshConfig(), [device]), device.platform).compile()
        with use_mesh(step.mesh, step.rules):
            self.state = step.steps.init()
            rows = np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq_len + 1), dtype=np.int32)
            self.tokens = jax.device_put(rows, step.steps.batch_sharding)
        self.clean = np.float32(0.0)  # the step's fault-injection input: no fault
        self.step = step.train
        self.best = float("inf")
        self.run(2)  # warm-up: first calls touch fresh memory
        self.best = float("inf")

    def run(self, n: int) -> float:
        for _ in range(n):
            t = time.perf_counter()
            self.state, metrics = self.step(self.state, self.tokens, self.clean)
            jax.block_until_ready(metrics)
            self.best = min(self.best, time.perf_counter() - t)
        return self.best


def fastest_steps(timers: list[TrainStepTimer], rounds: int = 4, per_round: int = 3) -> list[float]:
    """The fastest step of each timer over `rounds` round-robin passes. Interleaving spreads every model's
    samples over the whole measurement, so a busy spell of the machine (or of a neighbour on a shared host)
    cannot slow one model's samples and not another's; the minimum discards the spells themselves."""
    for _ in range(rounds):
        for timer in timers:
            timer.run(per_round)
    return [timer.best for timer in timers]


def build_timers(shapes: list[tuple[ModelConfig, int, int]], device, dtype_name: str) -> list[TrainStepTimer]:
    """A TrainStepTimer for each (model, seq_len, batch), compiled on as many threads as there are cores (XLA
    compiles outside Python's lock, so the compilations overlap). Nothing is timed here."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(len(shapes), usable_cores()))) as pool:
        return list(pool.map(lambda shape: TrainStepTimer(*shape, device, dtype_name), shapes))


# ------------------------------------------------------------------------------------------- fitting


def fit_matmul(samples: list[tuple[int, int, int, float]]) -> tuple[float, float, float]:
    """(peak TFLOP/s, large-shape efficiency E, half-speed dimension h) from (m, k, n, TFLOP/s) samples.

    The peak is the best GEMM observed (a measured peak, never a catalog one); E and h minimise the squared
    log error of E * peak * prod(x / (x + h)) over a grid of h (E then has a closed form).
    """
    peak = max(s[3] for s in samples)
    best = None
    for h in [0.0] + list(np.geomspace(1, 4096, 200)):
        shape = np.array([sum(math.log(x / (x + h)) if h else 0.0 for x in s[:3]) for s in samples])
        target = np.log([s[3] / peak for s in samples])
        log_e = float(np.mean(target - shape))
        err = float(np.sum((target - shape - log_e) ** 2))
        if best is None or err < best[0]:
            best = (err, math.exp(log_e), h)
    return peak, best[1], best[2]


def fit_step(parts: list[list[float]], measured: list[float]) -> tuple[list[float], float]:
    """A coefficient for each feature of a run (a modelled part's seconds, or a count such as its layers) and a
    fixed overhead: measured ~= sum(coef_i * part_i) + overhead.

    Non-negative least squares on relative errors (each run weighs the same, whatever its length), solved by
    trying every subset of free coefficients (a handful of unknowns). Returns ([scale per part], overhead_s).
    """
    a = np.array([list(p) + [1.0] for p in parts]) / np.array(measured)[:, None]
    b = np.ones(len(measured))
    n = a.shape[1]
    best = None
    for mask in range(1, 2**n):
        cols = [i for i in range(n) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if (coef < 0).any():
            continue
        err = float(np.sum((a[:, cols] @ coef - b) ** 2))
        if best is None or err < best[0]:
            full = np.zeros(n)
            full[cols] = coef
            best = (err, full)
    coef = best[1]
    return [float(c) for c in coef[:-1]], float(coef[-1])


def calibrate(acc: Accelerator, device=None, runs=CALIBRATION_RUNS, validation_runs=VALIDATION_RUNS,
              quick: bool = False) -> dict:
    """Measure `device` (default: this process's first device) and return a calibration profile for `acc`.

    The validation runs are timed in the same interleaved pass as the calibration runs (so a change in the
    machine's speed during the measurement affects both alike) but never fitted; the profile's "validation"
    lists their measured and predicted step times."""
    from chipwise.plan.perf import Layout, chip_model, estimate

    device = device or jax.devices()[0]
    dtype_name = "float32" if device.platform == "cpu" else "bfloat16"
    dtype = jnp.dtype(dtype_name)
    seconds = 0.05 if quick else 0.15
    samples = []
    for m, k, n in MATMUL_SHAPES:
        samples.append((m, k, n, measure_matmul(m, k, n, dtype, device, seconds)))
    peak, eff, half = fit_matmul(samples)
    if acc.bf16_tflops and device.platform != "cpu":  # keep the catalog peak; efficiency is relative to it
        eff, peak = eff * peak / (acc.bf16_tflops / acc.devices_per_chip), acc.bf16_tflops / acc.devices_per_chip
    bandwidth = measure_bandwidth(dtype, device)
    log.info("GEMM peak %.3g TFLOP/s, efficiency %.2f, half-speed dimension %.0f; bandwidth %.3g TB/s",
             peak, eff, half, bandwidth)
    fields = dict(peak_tflops=peak, matmul_efficiency=eff, matmul_half_dim=half, attention_efficiency=eff,
                  tile=1, hbm_tbps=bandwidth, memory_efficiency=1.0,
                  flash_attention=device.platform != "cpu", compute_bytes=dtype.itemsize,
                  step_overhead_s=0.0, layer_overhead_s=0.0, **{f"{p}_scale": 1.0 for p in SCALED_PARTS})
    profile = {"version": PROFILE_VERSION, "accelerator": acc.id, "machine": machine_id(device),
               "measured_on": _dt.date.today().isoformat(), "dtype": dtype_name, "chip_model": fields}
    base = chip_model(acc, profile)
    everything = list(runs) + list(validation_runs)
    models = [ModelConfig(**{**fields_, "max_seq_len": seq_len}) for fields_, seq_len, _ in everything]
    timers = build_timers([(model, seq_len, batch) for model, (_, seq_len, batch) in zip(models, everything)],
                          device, dtype_name)
    measured_all = fastest_steps(timers, rounds=3 if quick else 6)
    measured, validation_measured = measured_all[:len(runs)], measured_all[len(runs):]
    modelled, records = [], []
    for model, (fields_, seq_len, batch), t in zip(models[:len(runs)], runs, measured):
        est = estimate(model, seq_len, batch, base, Layout())
        modelled.append([est.parts[p] for p in SCALED_PARTS] + [model.num_layers])
        records.append({"model": fields_, "seq_len": seq_len, "batch": batch, "measured_s": t,
                        "modelled_uncalibrated_s": est.step_time_s})
        log.info("train step %s seq %d batch %d: %.1f ms measured, %.1f ms modelled before calibration",
                 fields_, seq_len, batch, t * 1e3, est.step_time_s * 1e3)
    coefs, overhead = fit_step(modelled, measured)
    *scales, per_layer = coefs
    fields.update({f"{p}_scale": v for p, v in zip(SCALED_PARTS, scales)}, layer_overhead_s=per_layer,
                  step_overhead_s=overhead)
    profile["measurements"] = {"matmul": [{"m": m, "k": k, "n": n, "tflops": v} for m, k, n, v in samples],
                               "bandwidth_tbps": bandwidth, "train_steps": records}
    fitted = chip_model(acc, profile)
    profile["validation"] = []
    for model, (fields_, seq_len, batch), t in zip(models[len(runs):], validation_runs, validation_measured):
        predicted = estimate(model, seq_len, batch, fitted, Layout()).step_time_s
        profile["validation"].append({"model": fields_, "seq_len": seq_len, "batch": batch, "measured_s": t,
                                      "predicted_s": predicted, "error": predicted / t - 1})
    return profile


def save_profile(profile: dict, path: Path) -> Path:
    from chipwise.data.cache import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({k: v for k, v in profile.items() if k != "path"}, indent=1))
    return path
