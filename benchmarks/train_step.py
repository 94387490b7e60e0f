"""Throughput of chipwise's real train step, optionally against the same model in PyTorch (eager and compiled).

    python benchmarks/train_step.py --preset tiny --batch-size 16 --seq-len 256 [--steps 20] [--warmup 3]
        [--dtype auto|float32|bfloat16] [--set KEY=VALUE ...] [--compare-torch] [--markdown]

Like the `chipwise` command, it sets up the process with chipwise/process.py, which keeps freed host memory in the
process (chipwise/host_memory.py); run it with CHIPWISE_MALLOC=default to time the C library's default allocator.

The step is the trainer's own (`chipwise.train.compiled_step`: the registry's attention for this platform, the
trainer's compute dtype, `build_steps`) fed random tokens that already sit on the device, so data loading is not
timed. Compilation and `--warmup` steps are excluded. tokens/s is `--steps` steps dispatched back to back over their
total wall time (one block at the end); the median step time comes from a few more steps, each blocked on. Model
FLOPs and MFU follow `chipwise.flops` (its CONVENTION is printed) against the peak `chipwise.efficiency` resolves.

Bad arguments give one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from chipwise.cli import OneLineParser, run_guarded  # noqa: E402
from chipwise.errors import ChipwiseError  # noqa: E402

MEDIAN_STEPS = 5  # extra steps, each blocked on, for the median step time
DATA_SEED = 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train_step.py", description="Time chipwise's train step (and optionally PyTorch's).")
    p.add_argument("--preset", default="tiny", help="model preset (chipwise.presets), default tiny")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (global)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto is the trainer's choice (fp32 on CPU, bf16 on accelerators)")
    p.add_argument("--set", "--override", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any chipwise config override, e.g. --set model.num_layers=1 (repeatable)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also time the same model in PyTorch (eager and torch.compile): fp32 on a CPU, "
                        "on a GPU in chipwise's dtype (bf16 autocast)")
    p.add_argument("--torch-modes", default="eager,compile", metavar="MODES",
                   help="with --compare-torch: which PyTorch runs, comma-separated from eager,compile")
    p.add_argument("--torch-threads", type=int, default=0, metavar="N",
                   help="with --compare-torch: torch.set_num_threads(N); 0 (default) uses every core available")
    p.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    p.add_argument("--widths", default="", metavar="W,W,...",
                   help="a sweep over model widths (e.g. 128,384,768; benchmarks/width_sweep.py): heads of 64, d_ff "
                        "8/3 x width, vocab 8192, on top of the other arguments; ends with one table of all")
    return p


@dataclass
class Result:
    name: str
    tokens_per_step: int
    devices: int  # what per-device figures divide by
    flops_per_token: float
    peak_tflops_per_device: float | None
    peak_source: str
    steps: int
    total_s: float  # the timed steps, back to back
    step_times_s: list[float]  # separately blocked steps
    setup_s: float  # compilation and warm-up steps
    final_loss: float
    peak_memory_gib: float | None = None  # the accelerator's peak allocation during the run (None on a CPU)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step * self.steps / self.total_s

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_s / self.devices

    @property
    def tflops_per_device(self) -> float:
        return self.tokens_per_s_per_device * self.flops_per_token / 1e12

    @property
    def mfu(self) -> float | None:
        return self.tflops_per_device / self.peak_tflops_per_device if self.peak_tflops_per_device else None

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times_s)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _quiet_torch_logs() -> None:
    for noisy in ("torch._inductor", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _check_args(args) -> None:
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--steps", args.steps),
                        ("--warmup", args.warmup)):
        if value <= 0:
            why = " (the first step compiles)" if flag == "--warmup" else ""
            raise ChipwiseError(f"{flag} must be positive{why}, got {value}")
    if args.torch_threads < 0:
        raise ChipwiseError(f"--torch-threads must be 0 (all cores) or positive, got {args.torch_threads}")
    modes = [m.strip() for m in args.torch_modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"eager", "compile"})
    if unknown or not modes:
        raise ChipwiseError(f"--torch-modes takes eager and/or compile, comma-separated; got {args.torch_modes!r}")
    args.torch_modes = list(dict.fromkeys(modes))


def load_benchmark_config(args):
    from chipwise.config import apply_overrides, from_dict

    raw = {"model": {"preset": args.preset},
           "train": {"batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype}}
    return from_dict(apply_overrides(raw, args.overrides))


def random_tokens(cfg) -> np.ndarray:
    t = cfg.train
    rng = np.random.default_rng(DATA_SEED)
    return rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32)


# ---- chipwise ---------------------------------------------------------------------------------------------------

def bench_chipwise(cfg, ctx: dict, tokens_np: np.ndarray, warmup: int, steps: int) -> Result:
    import jax

    from chipwise.sharding import use_mesh

    step = ctx["step"].compile()
    compile_s = step.compile_s
    with use_mesh(step.mesh, step.rules):
        state = step.steps.init()
        # Every process makes the same global batch (fixed seed) and places its own shards.
        tokens = jax.make_array_from_callback(tokens_np.shape, step.steps.batch_sharding, lambda idx: tokens_np[idx])
        jax.block_until_ready((state, tokens))
        clean = np.float32(0.0)  # the step's fault-injection input: 0 means no injected NaN
        train = step.train

        t0 = time.perf_counter()
        for _ in range(warmup):
            state, metrics = train(state, tokens, clean)
        jax.block_until_ready((state, metrics))
        warmup_s = time.perf_counter() - t0

        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = train(state, tokens, clean)
        jax.block_until_ready((state, metrics))
        total_s = time.perf_counter() - t0
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps

        step_times = []
        for _ in range(min(steps, MEDIAN_STEPS)):
            t0 = time.perf_counter()
            state, metrics = train(state, tokens, clean)
            jax.block_until_ready((state, metrics))
            step_times.append(time.perf_counter() - t0)

    hw = ctx["hardware"]
    dtype = np.dtype(ctx["dtype"]).name
    stats = step.mesh.devices.flat[0].memory_stats() if hw.platform != "cpu" else None
    peak_gib = stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None
    print(f"  chipwise: compile {compile_s:.2f} s (lower + compile), warm-up {_n(warmup, 'step')} {warmup_s:.2f} s, "
          f"{faults:,.0f} page faults per timed step")
    tokens_per_step = tokens_np.shape[0] * (tokens_np.shape[1] - 1)
    return Result(f"chipwise (JAX, {dtype}, {ctx['attention'].name} attention)", tokens_per_step, hw.num_devices,
                  ctx["flops_per_token"], hw.peak.tflops_per_device, hw.peak.source, steps, total_s, step_times,
                  compile_s + warmup_s, float(metrics["loss"]), peak_gib)


# ---- PyTorch ----------------------------------------------------------------------------------------------------

def torch_threads(requested: int = 0) -> int:
    from chipwise.process import usable_cores  # the cores this process may use (containers, taskset)

    return requested if requested > 0 else usable_cores()


def bench_torch(cfg, ctx: dict, tokens_np: np.ndarray, warmup: int, steps: int, modes: list[str],
                requested_threads: int = 0) -> list[Result]:
    try:
        import torch
    except ImportError:
        print("  PyTorch: not installed, comparison skipped (pip install -e .[bench])")
        return []
    hw = ctx["hardware"]
    on_gpu = hw.platform == "gpu"
    if hw.platform not in ("cpu", "gpu") or (on_gpu and not torch.cuda.is_available()):
        print(f"  PyTorch: comparison skipped; JAX is on {hw.platform} and PyTorch has no such device here")
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax
    import jax.numpy as jnp
    import torch_llama

    from chipwise import efficiency, flops
    from chipwise.train.optimizer import learning_rate_schedule

    bf16 = np.dtype(ctx["dtype"]) == np.dtype(jnp.bfloat16)
    # On a GPU PyTorch computes as chipwise does: bf16 autocast over fp32 weights (or fp32). On a CPU it stays fp32.
    autocast = torch.bfloat16 if on_gpu and bf16 else None
    if not on_gpu:
        torch.set_num_threads(torch_threads(requested_threads))
        ctx["torch_threads"] = torch.get_num_threads()
        if np.dtype(ctx["dtype"]) != np.float32:
            print(f"  PyTorch runs fp32 while chipwise runs {np.dtype(ctx['dtype']).name}")
    device = torch.device("cuda" if on_gpu else "cpu")
    # The chipwise learning-rate schedule, tabulated for every step the benchmark runs.
    total_steps = warmup + steps + MEDIAN_STEPS
    lrs = np.asarray(jax.vmap(learning_rate_schedule(cfg.train))(jnp.arange(total_steps + 1)))

    def lr_at(step: int) -> float:
        return float(lrs[min(step, len(lrs) - 1)])

    tokens = torch.from_numpy(tokens_np.astype(np.int64)).to(device)
    # torch on a CPU computes in fp32: where chipwise does not, its peak is the fp32 one. On a GPU both use the
    # same dtype, so the same peak.
    base = hw.peak
    if not on_gpu and np.dtype(ctx["dtype"]) != np.float32:
        base = efficiency.resolve_hardware(jax.devices(), jnp.float32, cfg.hardware).peak
    # The CPU is one device to torch: its per-device peak is the whole chip's.
    peak = base.tflops_per_device * (1 if on_gpu else hw.devices_per_chip) if base.tflops_per_device else None
    results = []
    precision = "bf16 autocast" if autocast is not None else "fp32"
    where = ", CUDA" if on_gpu else ""
    runs = {"eager": (f"PyTorch eager ({precision}{where})", False),
            "compile": (f"PyTorch torch.compile (inductor, {precision}{where})", True)}
    for name, compiled in (runs[mode] for mode in modes):
        torch.manual_seed(cfg.train.seed)
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = torch_llama.Llama(cfg.model).to(device)
        if model.num_params() != flops.param_count(cfg.model):
            raise AssertionError(f"torch model has {model.num_params()} parameters, chipwise "
                                 f"{flops.param_count(cfg.model)}: the architectures differ")
        opt, sched = torch_llama.make_optimizer(model, cfg.train, lr_at)
        loss_fn = torch.compile(model) if compiled else model

        def step():
            return torch_llama.train_step(loss_fn, model, opt, sched, tokens, cfg.train.grad_clip, autocast)

        t0 = time.perf_counter()
        try:
            for _ in range(warmup):
                loss = step()
            loss.item()
        except Exception as e:  # noqa: BLE001 - inductor needs a C++ compiler; report and go on
            if not compiled and not isinstance(e, torch.OutOfMemoryError):
                raise
            print(f"  {name}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}), skipped")
            continue
        setup_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        total_s = time.perf_counter() - t0

        step_times = []
        for _ in range(min(steps, MEDIAN_STEPS)):
            t0 = time.perf_counter()
            loss = step()
            loss.item()
            step_times.append(time.perf_counter() - t0)
        what = "compile + warm-up" if compiled else "warm-up"
        threads = "" if on_gpu else f", {_n(torch.get_num_threads(), 'thread')}"
        print(f"  {name}: {what} {_n(warmup, 'step')} {setup_s:.2f} s{threads}")
        ctx["torch_ran"] = True
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
        results.append(Result(name, tokens.shape[0] * (tokens.shape[1] - 1), 1, ctx["flops_per_token"], peak,
                              base.source, steps, total_s, step_times, setup_s, float(loss), peak_gib))
        model = opt = loss_fn = None  # the next run (and JAX) gets the card
    if on_gpu:
        torch.cuda.empty_cache()  # what PyTorch cached goes back to the card, for JAX
    return results


# ---- reporting --------------------------------------------------------------------------------------------------

def print_result(r: Result) -> None:
    mfu = f"{r.mfu:.1%}" if r.mfu is not None else "unknown"
    peak = f"{r.peak_tflops_per_device:.4g} TFLOP/s per device" if r.peak_tflops_per_device else "no peak"
    print(f"\n{r.name}")
    print(f"  tokens/s          {r.tokens_per_s:,.0f}  ({r.steps} steps / {r.total_s:.3f} s total, "
          f"one block at the end)")
    print(f"  tokens/s/device   {r.tokens_per_s_per_device:,.0f}  ({r.devices} device(s))")
    print(f"  median step       {r.median_step_s * 1e3:,.1f} ms  ({len(r.step_times_s)} further steps, each blocked)")
    print(f"  model TFLOP/s/dev {r.tflops_per_device:.4f}  ({r.flops_per_token / 1e6:,.1f} MFLOP/token)")
    print(f"  MFU               {mfu} of {peak} ({r.peak_source})")
    print(f"  final loss        {r.final_loss:.4f}")
    if r.peak_memory_gib is not None:
        print(f"  device memory     {r.peak_memory_gib:,.1f} GiB at peak (the framework's own allocator statistics)")


def print_markdown(results: list[Result], cfg, ctx: dict, args) -> None:
    import jax

    from chipwise.host_memory import keep_freed_memory  # already applied by run_guarded: this reads it
    from chipwise.plan.calibration import cpu_model

    torch_version = ""
    if "torch_threads" in ctx:
        import torch

        torch_version = f", torch {torch.__version__} ({_n(ctx['torch_threads'], 'thread')})"
    elif ctx.get("torch_ran"):
        import torch

        torch_version = f", torch {torch.__version__}"
    hw = ctx["hardware"]
    memory = any(r.peak_memory_gib is not None for r in results)
    print("\n| implementation | tokens/s | tokens/s/device | model GFLOP/s/device | MFU | compile/warm-up s |"
          + (" peak device GiB |" if memory else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if memory else ""))
    for r in results:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "unknown"
        gib = "" if not memory else f" {r.peak_memory_gib:.1f} |" if r.peak_memory_gib is not None else " - |"
        print(f"| {r.name} | {r.tokens_per_s:,.0f} | {r.tokens_per_s_per_device:,.0f} | "
              f"{r.tflops_per_device * 1e3:,.1f} | {mfu} | {r.setup_s:.1f} |{gib}")
    described = {}
    for r in results:  # one peak for all rows, or one per dtype
        if r.peak_tflops_per_device:
            described.setdefault(f"{r.peak_tflops_per_device:.4g} TFLOP/s per device ({r.peak_source})", r.name)
        else:
            described.setdefault(f"no peak ({r.peak_source})", r.name)
    peaks = "; ".join(described) if len(described) == 1 else "; ".join(f"{p} for {n}" for p, n in described.items())
    device = "" if hw.platform == "cpu" else f", {hw.num_devices} x {hw.device_kind}"
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores{device}; jax {jax.__version__}{torch_version}. "
          f"Preset {args.preset}, batch {cfg.train.batch_size} x seq {cfg.train.seq_len}, {args.steps} timed steps "
          f"after {args.warmup} warm-up; MFU against {peaks}; FLOPs {ctx['flops_convention']}; host allocator: "
          f"{'freed memory kept' if keep_freed_memory() else 'C library defaults'}.")


# ---- main -------------------------------------------------------------------------------------------------------

def run(args) -> int:
    _check_args(args)
    if args.widths:
        from width_sweep import sweep  # benchmarks/width_sweep.py, beside this script

        return sweep(args, run_one)
    run_one(args)
    return 0


def run_one(args) -> list:
    cfg = load_benchmark_config(args)

    import jax

    from chipwise import efficiency, flops, host_memory
    from chipwise.sharding import make_mesh
    from chipwise.train.compiled_step import build_train_step

    m, t = cfg.model, cfg.train
    devices = jax.devices()
    mesh = make_mesh(cfg.mesh, devices)
    step = build_train_step(cfg, mesh, devices[0].platform)  # the trainer's own step; compiled when timed
    choice, dtype = step.attention, step.dtype
    hw = efficiency.resolve_hardware(devices, dtype, cfg.hardware)
    fpt = flops.training_flops_per_token(m, t.seq_len).total
    ctx = dict(step=step, attention=choice, dtype=dtype, hardware=hw, flops_per_token=fpt,
               flops_convention=flops.CONVENTION)

    print("chipwise train-step benchmark")
    print(f"  device     {hw.num_devices} x {hw.device_kind} ({hw.platform}), mesh {dict(mesh.shape)}")
    print(f"  model      preset {args.preset}, {flops.param_count(m) / 1e6:.2f}M params, "
          f"batch {t.batch_size} x seq {t.seq_len} = {t.batch_size * t.seq_len:,} tokens/step")
    print(f"  dtype      {np.dtype(dtype).name} (--dtype {args.dtype})")
    fallback = f" ({choice.fallback_reason})" if choice.fallback_reason else ""
    print(f"  attention  {choice.name}{fallback}")
    print(f"  peak       {hw.peak.describe()}")
    print(f"  FLOPs      {fpt / 1e6:,.1f} MFLOP/token, convention: {flops.CONVENTION}")
    print(f"  timing     warm-up steps excluded: {args.warmup}; tokens/s = {args.steps} steps over their total "
          f"wall time; median = {min(args.steps, MEDIAN_STEPS)} further steps, each blocked")
    print(f"  data       random int32 tokens (seed {DATA_SEED}) already on device")
    kept = host_memory.keep_freed_memory()
    print(f"  allocator  {'freed memory kept (chipwise.host_memory)' if kept else 'C library defaults'}"
          f" ({host_memory.ENV}=default for the defaults)")

    tokens = random_tokens(cfg)
    def torch_runs() -> list:
        return bench_torch(cfg, ctx, tokens, args.warmup, args.steps, args.torch_modes, args.torch_threads) \
            if args.compare_torch else []

    # On a GPU PyTorch goes first: its allocator hands the card back (empty_cache), JAX's keeps what it took.
    torch_first = hw.platform == "gpu"
    earlier = torch_runs() if torch_first else []
    results = [bench_chipwise(cfg, ctx, tokens, args.warmup, args.steps)]
    results += earlier if torch_first else torch_runs()
    for r in results:
        print_result(r)
    if args.markdown:
        print_markdown(results, cfg, ctx, args)
    return results


def main(argv: list[str] | None = None) -> int:
    _quiet_torch_logs()
    return run_guarded(build_parser(), run, argv, log_level=logging.WARNING)


if __name__ == "__main__":
    raise SystemExit(main())
