"""`chipwise bench --serve`: measure chipwise's own serving engine on this machine and fit the serving model's
constants for it (plan/serving.py), as `chipwise bench` does for training.

Measured at the engine (serve/engine.py, no HTTP), on random-weight models: the time to first token of a prompt of
I tokens (its prefill, one chunk, into an idle engine) and the time per decode step with every slot busy. Fitted,
by least squares on relative errors over the calibration shapes only (ServingAssumptions):
  - prefill_efficiency: share of the measured GEMM peak the prefill reaches;
  - decode_bandwidth_efficiency: share of the measured streaming bandwidth a decode step's reads reach;
  - request_overhead_s and decode_step_overhead_s: fixed host time per request and per decode step.
The held-out shapes (other widths, prompt lengths and slot counts) are then predicted with the planner's own
formulas and the fitted constants, and their errors stored in the profile's "serving" section.

The engine's decode attends over its whole KV cache (static shapes), so a step's context is the cache length; its
weights and cache are fp32 on CPUs, as `chipwise serve` runs them.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from chipwise.catalog import Accelerator
from chipwise.config import ModelConfig
from chipwise.plan import assumptions as A

log = logging.getLogger("chipwise.bench")

# Random-weight models the engine serves here: widths 256-512, depths 2-4, so that a prefill is tens to hundreds of
# milliseconds of compute and a decode step a few milliseconds of weight reads on a small CPU.
MODELS = {
    "a": dict(num_layers=4, d_model=256, num_heads=4, num_kv_heads=2, d_ff=704, vocab_size=4096),
    "b": dict(num_layers=2, d_model=512, num_heads=8, num_kv_heads=4, d_ff=1408, vocab_size=4096),
    "c": dict(num_layers=3, d_model=384, num_heads=6, num_kv_heads=2, d_ff=1024, vocab_size=4096),
}
MAX_SEQ, CHUNK = 512, 256  # the engines' context and prefill chunk: every prompt here is one chunk


@dataclass(frozen=True)
class Shape:
    """One engine: a model, its decode slots, and the prompt lengths whose time to first token is measured."""
    model: str
    slots: int
    input_lens: tuple[int, ...]


# Fitted on these; held out: model c (a width and depth none of them has), prompts of 32 and 128 tokens, and 2
# and 4 busy slots (fitted at 1, 4 and 8 on other models).
CALIBRATION = (Shape("a", 1, (64, 256)), Shape("a", 8, (64,)), Shape("b", 1, (64,)), Shape("b", 4, (64, 256)))
HELD_OUT = (Shape("c", 2, (32, 128)), Shape("a", 4, (32, 128)))


def _tokenizer(vocab: int):
    """A word-level tokenizer of the model's vocabulary: the engine decodes each reply token to text."""
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))


class EngineTimer:
    """chipwise's serving engine on one random-weight model, compiled (warm_up) and driven step by step from this
    thread; keeps the fastest time to first token per prompt length and the fastest decode step seen."""

    def __init__(self, shape: Shape, models: dict[str, dict] = MODELS, dtype_name: str = "float32"):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from chipwise import prng
        from chipwise.model import Transformer
        from chipwise.serve.engine import Engine
        from chipwise.serve.model_source import ServedModel

        from chipwise.sharding import platform_rules

        self.shape = shape
        # Layers unrolled or stacked as `chipwise serve` runs them on this platform (unrolled on CPUs).
        scan = platform_rules(jax.devices()[0].platform)["scan_layers"]
        self.cfg = ModelConfig(**models[shape.model], max_seq_len=MAX_SEQ, scan_layers=scan)
        graphdef, state = nnx.split(Transformer(self.cfg, nnx.Rngs(params=prng.key(0))))
        served = ServedModel("bench", graphdef, nnx.to_pure_dict(state), _tokenizer(self.cfg.vocab_size), (),
                             None, {})
        self.engine = Engine(served, slots=shape.slots, max_seq_len=MAX_SEQ, prefill_chunk=CHUNK,
                             dtype=jnp.dtype(dtype_name))
        self.rng = np.random.default_rng(0)
        # Compile and warm what is measured (the prompts' prefill buckets and the greedy decode step) by running it
        # once, untimed: warm_up() would also compile every other bucket and the sampling step, which this skips.
        self.measure()
        self.ttft = {n: math.inf for n in shape.input_lens}
        self.tpot = math.inf

    def _request(self, length: int, max_tokens: int, on_event=lambda e: None):
        from chipwise.serve.engine import Request, SamplingParams

        prompt = self.rng.integers(1, self.cfg.vocab_size, length).tolist()
        return Request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), on_event)

    def time_to_first_token(self, length: int) -> float:
        first: list[float] = []
        request = self._request(length, 2, lambda e: first or first.append(time.perf_counter()))
        start = time.perf_counter()
        self.engine.submit(request)
        while not first:
            self.engine.step()
        while request.finish_reason is None:  # let it end, freeing its slot
            self.engine.step()
        self.ttft[length] = min(self.ttft[length], first[0] - start)
        return first[0] - start

    def decode_step(self, steps: int = 8) -> float:
        """Every slot decoding: the mean of `steps` consecutive steps (each one step of the engine's loop)."""
        requests = [self._request(16, MAX_SEQ - 32) for _ in range(self.shape.slots)]
        for r in requests:
            self.engine.submit(r)
        while any(not r.output_ids for r in requests):
            self.engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            self.engine.step()
        took = (time.perf_counter() - start) / steps
        for r in requests:
            self.engine.cancel(r)
        self.engine.step()  # frees the cancelled slots
        self.tpot = min(self.tpot, took)
        return took

    def measure(self) -> None:
        self.ttft = getattr(self, "ttft", {n: math.inf for n in self.shape.input_lens})
        self.tpot = getattr(self, "tpot", math.inf)
        for n in self.shape.input_lens:
            self.time_to_first_token(n)
        self.decode_step()


# ------------------------------------------------------------------------------------------------ the model
# On XLA:CPU a decode step reads the weights and then multiplies (no overlap), so the fitted model adds the terms
# (ServingAssumptions.overlap False) and every constant enters linearly: time = sum(coefficient x feature).
# Coefficients: 1 / prefill_efficiency, 1 / decode_compute_efficiency, request_overhead_s, decode_step_overhead_s,
# sequence_overhead_s (per slot, in a prefill). A per-slot cost in the decode step as well was tried: the fit set it
# to 0, the decode matmuls' own share (a few rows each) covers it. The reads are not fitted: these models' weights
# (16-32 MB) sit partly in the CPU's caches, which the fit then credited with reads at up to 7x the DRAM bandwidth
# or none at all, while a planned model's weights stream from DRAM. Reads run at the bandwidth measured over 256
# MiB (decode_bandwidth_efficiency 1).
FEATURES = ("prefill_compute_s", "decode_compute_s", "request", "step", "sequences")
@dataclass(frozen=True)
class Point:
    """One measurement and the serving model's terms for it at unit efficiencies (plan/serving.py's own)."""
    kind: str  # "ttft" (a prompt's prefill, one request, into an engine of `slots`) or "tpot" (`slots` decoding)
    model: str
    slots: int
    input_len: int  # prompt tokens (ttft); 0 for a decode step
    measured_s: float
    memory_s: float  # the weights and KV cache read at the measured bandwidth
    features: tuple[float, ...]  # FEATURES


def point(acc: Accelerator, name: str, cfg: ModelConfig, kind: str, slots: int, input_len: int,
          measured: float) -> Point:
    from chipwise.plan.serving import _Chip

    unit = A.ServingAssumptions(1.0, 1.0, 0.0, overlap=False)
    chip = _Chip(acc, cfg, 1, "fp32", unit)
    if kind == "ttft":
        memory, f = chip.weights_read_s(), (chip.prefill_compute_s(1, input_len), 0.0, 1.0, 0.0, float(slots))
    else:
        d = chip.decode_step(slots, MAX_SEQ)  # the engine reads its whole cache each step
        memory, f = d["decode_weights_s"] + d["decode_kv_s"], (0.0, d["decode_compute_s"], 0.0, 1.0, 0.0)
    return Point(kind, name, slots, input_len, measured, memory, f)


def constants(coef) -> A.ServingAssumptions:
    # A compute term the fit leaves at zero costs nothing measurable here: a share so high its term vanishes.
    inv = [1 / float(c) if c > 0 else 1e9 for c in coef[:2]]
    return A.ServingAssumptions(1.0, inv[0], float(coef[2]), float(coef[3]), float(coef[4]), inv[1], overlap=False)


def predict(p: Point, c: A.ServingAssumptions) -> float:
    """The serving planner's formulas for the engine (no overlap): TTFT and the decode step."""
    coef = (1 / c.prefill_efficiency, 1 / c.decode_compute_efficiency, c.request_overhead_s,
            c.decode_step_overhead_s, c.sequence_overhead_s)
    return p.memory_s / c.decode_bandwidth_efficiency + float(np.dot(coef, p.features))


def fit(points: list[Point]) -> A.ServingAssumptions:
    """Non-negative least squares on relative errors (each measurement weighs the same, whatever its length), by
    trying every subset of free coefficients (five unknowns), the reads fixed at the measured bandwidth."""
    measured = np.array([p.measured_s for p in points])
    a = np.array([p.features for p in points]) / measured[:, None]
    b = 1 - np.array([p.memory_s for p in points]) / measured
    best = None
    for mask in range(1, 2 ** a.shape[1]):
        cols = [i for i in range(a.shape[1]) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if (coef < 0).any():
            continue
        err = float(np.sum((a[:, cols] @ coef - b) ** 2))
        if best is None or err < best[0]:
            full = np.zeros(a.shape[1])
            full[cols] = coef
            best = (err, full)
    return constants(best[1])


def points_for(acc: Accelerator, timers: list[EngineTimer]) -> list[Point]:
    out = []
    for t in timers:
        out += [point(acc, t.shape.model, t.cfg, "ttft", t.shape.slots, n, m) for n, m in t.ttft.items()]
        out.append(point(acc, t.shape.model, t.cfg, "tpot", t.shape.slots, 0, t.tpot))
    return out


# ------------------------------------------------------------------------------------------------ bench and profile

PEAK_SHAPES = ((256, 256, 1024), (1024, 512, 512), (1024, 1024, 1024))  # GEMMs of the prefills measured here


def host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def calibrate_serving(acc: Accelerator, device=None, rounds: int = 4, calibration=CALIBRATION,
                      held_out=HELD_OUT, models: dict[str, dict] = MODELS) -> dict:
    """Measure this machine's serving engine and return the profile's "serving" section (fitted constants, every
    measurement, and the held-out shapes' predictions and errors)."""
    import jax
    import jax.numpy as jnp

    from chipwise.plan.calibration import measure_bandwidth, measure_matmul

    device = device or jax.devices()[0]
    started = time.perf_counter()
    timers = [EngineTimer(s, models) for s in (*calibration, *held_out)]
    log.info("compiled %d engines in %.0f s", len(timers), time.perf_counter() - started)
    peak = bandwidth = 0.0
    for _ in range(rounds):  # interleaved, as for training: a busy spell of the machine lands on every shape alike,
        # and on the peak and bandwidth too (the best of each round's is kept, as for the engine's times)
        peak = max(peak, *(measure_matmul(m, k, n, jnp.float32, device, 0.05) for m, k, n in PEAK_SHAPES))
        bandwidth = max(bandwidth, measure_bandwidth(jnp.float32, device, megabytes=256, runs=4))
        for t in timers:
            t.measure()
    measured = replace(acc, bf16_tflops=peak, fp32_tflops=peak, hbm_tbps=bandwidth, hbm_gib=host_memory_gib())
    fitted_on = points_for(measured, timers[:len(calibration)])
    fitted = fit(fitted_on)
    held = points_for(measured, timers[len(calibration):])
    def row(p: Point) -> dict:
        predicted = predict(p, fitted)
        return {"kind": p.kind, "model": p.model, "slots": p.slots, "input_len": p.input_len,
                "measured_s": p.measured_s, "predicted_s": predicted, "error": predicted / p.measured_s - 1}

    return {"weights_dtype": "fp32", "peak_tflops": peak, "memory_tbps": bandwidth, "memory_gib": measured.hbm_gib,
            "max_seq_len": MAX_SEQ, "prefill_chunk": CHUNK, "constants": asdict(fitted), "models": models,
            "measurements": [row(p) for p in fitted_on], "validation": [row(p) for p in held]}


def write_serving(path: Path, acc: Accelerator, device, section: dict) -> dict:
    """The serving section into the chip's profile: beside a training calibration measured on this machine, or in a
    profile of its own."""
    from chipwise.plan.calibration import PROFILE_VERSION, load_profile, machine_id, save_profile

    machine = machine_id(device)
    profile = None
    if path.exists():
        try:
            profile = load_profile(path)
        except Exception:  # unreadable or another version: replaced, as a fresh `chipwise bench` would
            profile = None
    if profile is None or profile.get("machine") != machine or profile.get("accelerator") != acc.id:
        profile = {"version": PROFILE_VERSION, "accelerator": acc.id, "machine": machine}
    profile["serving"] = {**section, "measured_on": _dt.date.today().isoformat()}
    save_profile(profile, path)
    return profile


def print_serving(acc: Accelerator, path: Path, section: dict) -> None:
    c = section["constants"]
    print(f"{acc.id} serving engine (measured, fp32 weights; engines of {MAX_SEQ} tokens, prefill chunk {CHUNK}):")
    print(f"  GEMM peak {section['peak_tflops'] * 1e3:,.1f} GFLOP/s; streaming bandwidth (256 MiB) "
          f"{section['memory_tbps'] * 1e3:,.1f} GB/s")
    print(f"  fitted: prefill matmuls at {c['prefill_efficiency']:.2f} of the peak, decode matmuls at "
          f"{c['decode_compute_efficiency']:.2f} (reads at the bandwidth); "
          f"{c['request_overhead_s'] * 1e3:.2f} ms per request, {c['decode_step_overhead_s'] * 1e3:.2f} ms per decode "
          f"step, {c['sequence_overhead_s'] * 1e3:.2f} ms per sequence in flight")
    for title, rows in (("fitted", section["measurements"]), ("held out", section["validation"])):
        for r in rows:
            what = f"TTFT {r['input_len']} tokens" if r["kind"] == "ttft" else f"TPOT {r['slots']} slots busy"
            print(f"  {title} model {r['model']} {what}: predicted {r['predicted_s'] * 1e3:.2f} ms, measured "
                  f"{r['measured_s'] * 1e3:.2f} ms ({r['error']:+.0%})")
    print(f"profile written to {path}; `chipwise plan --serve --accelerator {acc.id} --weights-dtype fp32` now uses it")
