"""The training loop: set up devices, data and state, run the steps, and account for every second and FLOP."""

from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from rich.console import Console

from chipwise import attention, data, efficiency, flops, provenance
from chipwise.config import Config, from_dict, to_dict
from chipwise.distributed import agree, barrier, is_leader, preemption_point
from chipwise.errors import ChipwiseError, ConfigError
from chipwise.sharding import data_parallel_size, make_mesh, platform_rules, use_mesh
from chipwise.train.checkpoint import Checkpoints, abstract_like
from chipwise.train.metrics import open_writer
from chipwise.train.step import build_steps

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


def compute_dtype(cfg: Config, platform: str):
    if cfg.train.dtype == "auto":
        return jnp.float32 if platform == "cpu" else jnp.bfloat16  # CPUs have no fast bf16 matmul
    return jnp.dtype(cfg.train.dtype).type


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.run_dir)
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise ChipwiseError(f"cannot resume: {run_dir} is not a chipwise run directory (no {CONFIG_FILE})")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ChipwiseError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                                f"--overwrite to replace it, or choose another run_dir")
        if not (run_dir / CONFIG_FILE).is_file():
            raise ChipwiseError(f"refusing to overwrite {run_dir}: it is not a chipwise run directory "
                                f"(no {CONFIG_FILE}); choose another run_dir")
    barrier("run-dir-checked")  # every process has judged the directory before one of them changes it
    if is_leader():
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier("run-dir-ready")
    return run_dir


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ChipwiseError(f"{run_dir} is not a chipwise run directory (no {CONFIG_FILE})")
    return from_dict(yaml.safe_load(path.read_text()))


@dataclass
class Window:
    """Timings of the steps since the last log line."""
    steps: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0

    def add(self, seconds: float, data_wait: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.data_wait += data_wait


@dataclass
class Totals:
    tokens: int = 0
    wall_seconds: float = 0.0  # the whole loop, evaluation and checkpoints included
    step_seconds: float = 0.0  # steady-state steps only (the first of each invocation excluded)
    steady_tokens: int = 0
    data_wait: float = 0.0
    checkpoint_seconds: float = 0.0
    eval_seconds: float = 0.0
    val_losses: list = field(default_factory=list)  # (step, loss)
    last_loss: float | None = None


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(quiet=not is_leader())  # one process speaks for the run
        self.run_dir = prepare_run_dir(cfg, resume, overwrite)
        self.resume = resume

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _setup(self):
        cfg, t = self.cfg, self.cfg.train
        self.devices = jax.devices()
        self.platform = self.devices[0].platform
        self.dtype = compute_dtype(cfg, self.platform)
        self.mesh = make_mesh(cfg.mesh, self.devices)
        dp = data_parallel_size(self.mesh)
        if t.batch_size % dp:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by the data-parallel size "
                              f"mesh.data x mesh.fsdp = {dp}")
        if (t.batch_size // t.grad_accum) % dp:
            raise ConfigError(f"each micro-batch (train.batch_size / train.grad_accum = "
                              f"{t.batch_size // t.grad_accum}) must be divisible by the data-parallel size {dp}")
        self.rules = platform_rules(self.platform)["rules"]
        m = cfg.model
        self.attention = attention.select(self.platform, seq_len=t.seq_len, head_dim=m.head_dim,
                                          num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, dtype=self.dtype)
        barrier("measure-peak")  # processes sharing a CPU measure it together, so each sees its share
        self.hardware = efficiency.resolve_hardware(self.devices, self.dtype, cfg.hardware)
        self.flops = flops.training_flops_per_token(m, t.seq_len)
        # Process 0 builds the tokenizer and token cache first; the others then find it where the cache is
        # shared, and must in any case end up with the very same tokens.
        if is_leader():
            self.data = data.prepare_data(cfg.data, m.vocab_size, log=self.log)
        barrier("data-prepared")
        if not is_leader():
            self.data = data.prepare_data(cfg.data, m.vocab_size, log=self.log)
        agree(f"{self.data.tokenizer_fingerprint}:{len(self.data.train_tokens)}", "the tokenizer and tokens")
        if not self.resume and is_leader():  # sampling and export read the run's own copy of its tokenizer
            self.data.tokenizer.save(str(self.run_dir / TOKENIZER_FILE))

    def _describe(self, compile_s: float) -> dict:
        hw, m = self.hardware, self.cfg.model
        info = {
            "devices": f"{hw.num_devices} x {hw.device_kind} ({hw.platform})",
            "chips": hw.num_chips,
            "mesh": dict(self.mesh.shape),
            "compute_dtype": jnp.dtype(self.dtype).name,
            "attention": self.attention.name,
            "attention_fallback": self.attention.fallback_reason,
            "params": flops.param_count(m),
            "flops_per_token": self.flops.total,
            "flops_convention": flops.CONVENTION,
            "peak": hw.peak.describe(),
            "peak_kind": hw.peak.kind,
            "price_per_chip_hour": hw.price_per_chip_hour, "price_source": hw.price_source,
            "power_watts_per_chip": hw.power_watts_per_chip, "power_source": hw.power_source,
            "data": self.data.description,
            "compile_time_s": compile_s,
            "jax": jax.__version__,
            "provenance": provenance.collect(self.devices),  # versions, git commit, devices: what exactly ran
        }
        if is_leader():
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        return info

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self._setup()
        if is_leader():
            (self.run_dir / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        with use_mesh(self.mesh, self.rules):
            steps = build_steps(cfg, self.mesh, self.attention.fn, self.dtype)
            abstract_state = abstract_like(jax.eval_shape(steps.init), steps.state_shardings)
            abstract_batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32,
                                                  sharding=steps.batch_sharding)
            t0 = time.perf_counter()
            train_step = steps.train.lower(abstract_state, abstract_batch).compile()
            compile_s = time.perf_counter() - t0
            info = self._describe(compile_s)
            self._print_header(info)
            ckpt = Checkpoints(self.run_dir / "checkpoints", t.keep_checkpoints, t.checkpoint_every)
            state, start, iterator = self._initial_state(steps, ckpt, abstract_state)
            val_batches = data.eval_batches(self.data.val_tokens, t.seq_len, t.batch_size, t.eval_batches)
            writer = open_writer(self.run_dir, self.console, t.steps, start)  # a no-op beyond process 0
            writer.write({"step": start, "compile_time_s": compile_s})
            try:
                totals = self._loop(state, start, iterator, train_step, steps, ckpt, writer, val_batches)
            finally:
                writer.close()
                ckpt.close()
        summary = self._summary(totals, info)
        if is_leader():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._print_summary(summary)
        return summary

    def _initial_state(self, steps, ckpt: Checkpoints, abstract_state):
        t = self.cfg.train
        iterator = data.make_train_iterator(self.data, t.seq_len, t.batch_size, t.seed,
                                            jax.process_index(), jax.process_count(), self.cfg.data.worker_threads)
        latest = ckpt.latest_step() if self.resume else None
        if latest is None:
            if self.resume:
                self.log(f"no checkpoint in {self.run_dir}; starting from step 0")
            state = steps.init()
            if self.cfg.train.init_from:  # pre-trained weights (Hugging Face Llama), a fresh optimizer state
                from chipwise.hf import initial_params

                state["params"] = initial_params(self.cfg, steps.state_shardings["params"])
                self.log(f"initialised from {self.cfg.train.init_from}")
            return state, 0, iterator
        state, meta = ckpt.restore(latest, abstract_state)
        if meta.get("tokenizer_fingerprint") != self.data.tokenizer_fingerprint:
            raise ChipwiseError(f"cannot resume {self.run_dir}: its checkpoint was trained with another tokenizer "
                                f"than the data now gives; resume with the same data and tokenizer settings")
        iterator.set_state(meta["data_iterator"])
        self.log(f"resumed from step {latest}")
        return state, latest, iterator

    def _global_batch(self, local: np.ndarray, sharding) -> jax.Array:
        shape = (self.cfg.train.batch_size, local.shape[1])
        return jax.make_array_from_process_local_data(sharding, local, shape)

    def _evaluate(self, eval_fn, params, batches, sharding) -> float:
        rows = self.cfg.train.batch_size // jax.process_count()  # each process feeds its own rows
        first = jax.process_index() * rows
        losses = [eval_fn(params, self._global_batch(b["tokens"][first:first + rows], sharding)) for b in batches]
        return float(np.mean([float(x) for x in losses]))

    def _loop(self, state, start, iterator, train_step, steps, ckpt, writer, val_batches) -> Totals:
        t = self.cfg.train
        tokens_per_step = t.batch_size * t.seq_len
        totals, window = Totals(), Window()
        hw = self.hardware

        def evaluate(step):
            e0 = time.perf_counter()
            loss = self._evaluate(steps.eval, state["params"], val_batches, steps.batch_sharding)
            seconds = time.perf_counter() - e0
            totals.eval_seconds += seconds
            totals.val_losses.append((step, loss))
            writer.write({"step": step, "val_loss": loss, "val_ppl": float(np.exp(min(loss, 50.0))),
                          "eval_s": seconds})
            writer.log(f"step {step:>6}  val_loss {loss:.4f}  (ppl {np.exp(min(loss, 50.0)):.1f})")

        loop_start = time.perf_counter()
        if start == 0:
            evaluate(0)
        pending = None  # (step, metrics, data_wait) of the step dispatched last, read one step late
        last_done = time.perf_counter()
        first = True

        def finish(entry):
            """Block on a dispatched step's metrics, time it, and log it when due."""
            nonlocal last_done, first
            step, metrics, wait = entry
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            seconds, last_done = now - last_done, now
            totals.tokens += tokens_per_step
            totals.data_wait += wait
            totals.last_loss = metrics["loss"]
            if not first:  # the first step of an invocation pays for warm-up; keep it out of the averages
                totals.step_seconds += seconds
                totals.steady_tokens += tokens_per_step
            first = False
            window.add(seconds, wait)
            writer.advance(step, metrics["loss"])
            if step % t.log_every == 0 or step == t.steps:
                self._log_window(writer, step, metrics, window, tokens_per_step, hw)
                window.__init__()

        for step in range(start + 1, t.steps + 1):
            w0 = time.perf_counter()
            local = next(iterator)["tokens"]
            batch = self._global_batch(local, steps.batch_sharding)
            wait = time.perf_counter() - w0
            state, metrics = train_step(state, batch)
            if pending is not None:
                finish(pending)
            pending = (step, metrics, wait)
            stop = preemption_point(step)  # SIGTERM to a multi-process run: all processes save at this step
            boundary = stop or step % t.eval_every == 0 or step % t.checkpoint_every == 0 or step == t.steps
            if boundary:
                finish(pending)
                pending = None
                if step % t.eval_every == 0 or step == t.steps:
                    evaluate(step)
                if stop or step % t.checkpoint_every == 0 or step == t.steps:
                    c0 = time.perf_counter()
                    meta = {"step": step, "data_iterator": iterator.get_state(),
                            "tokenizer_fingerprint": self.data.tokenizer_fingerprint}
                    ckpt.save(step, state, meta, force=stop or step == t.steps)
                    seconds = time.perf_counter() - c0
                    totals.checkpoint_seconds += seconds
                    writer.write({"step": step, "checkpoint_s": seconds})  # per-step breakdown in reports
                last_done = time.perf_counter()  # eval and checkpoint time is not step time
            if stop:
                ckpt.wait()
                writer.log(f"stopped by SIGTERM at step {step}; its checkpoint is saved (continue with --resume)")
                raise SystemExit(128 + signal.SIGTERM)
        if pending is not None:
            finish(pending)
        ckpt.wait()
        totals.wall_seconds = time.perf_counter() - loop_start
        return totals

    def _log_window(self, writer, step, metrics, window: Window, tokens_per_step, hw) -> None:
        step_time = window.seconds / window.steps
        tps = tokens_per_step / step_time
        tps_dev = tps / hw.num_devices
        tflops_dev = tps_dev * self.flops.total / 1e12
        mfu = efficiency.mfu(tflops_dev, hw.peak)
        record = {"step": step, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                  "tokens_per_s": tps, "tokens_per_s_per_device": tps_dev, "tflops_per_device": tflops_dev,
                  "mfu": mfu, "step_time_s": step_time, "data_wait_s": window.data_wait / window.steps}
        mem = efficiency.peak_memory_bytes(self.devices)
        if mem is not None:
            record["peak_memory_bytes"] = mem
        writer.write(record)
        mfu_text = f"{mfu:6.1%}" if mfu is not None else "unknown"
        writer.log(f"step {step:>6}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                   f"{tps:,.0f} tok/s  {tflops_dev * 1e3:,.1f} GFLOP/s/dev  MFU {mfu_text}  "
                   f"step {step_time * 1e3:,.0f} ms (data wait {window.data_wait / window.steps * 1e3:.1f} ms)")

    # ---- reporting ----------------------------------------------------------------------------------------
    def _print_header(self, info: dict) -> None:
        self.log(f"[bold]chipwise[/bold] run {self.run_dir}")
        self.log(f"  devices   {info['devices']}, mesh {info['mesh']}, compute {info['compute_dtype']}, "
                 f"attention {info['attention']}")
        self.log(f"  model     {info['params'] / 1e6:.2f}M parameters, "
                 f"{info['flops_per_token'] / 1e6:.1f} MFLOP per token ({info['flops_convention']})")
        self.log(f"  peak      {info['peak']}")
        self.log(f"  data      {info['data']}")
        self.log(f"  compile   {info['compile_time_s']:.1f} s")

    def _summary(self, totals: Totals, info: dict) -> dict:
        hw = self.hardware
        steady_tps = totals.steady_tokens / totals.step_seconds if totals.step_seconds > 0 else None
        tflops_dev = steady_tps / hw.num_devices * self.flops.total / 1e12 if steady_tps else None
        first_val = totals.val_losses[0][1] if totals.val_losses else None
        return {
            "run_dir": str(self.run_dir),
            "tokens": totals.tokens,
            "wall_time_s": totals.wall_seconds,
            "final_train_loss": totals.last_loss,
            "first_val_loss": first_val,
            "final_val_loss": totals.val_losses[-1][1] if totals.val_losses else None,
            "tokens_per_s": steady_tps,
            "tokens_per_s_per_device": steady_tps / hw.num_devices if steady_tps else None,
            "tflops_per_device": tflops_dev,
            "mfu": efficiency.mfu(tflops_dev, hw.peak) if tflops_dev else None,
            "mfu_basis": efficiency.mfu_label(hw),
            "compile_time_s": info["compile_time_s"],
            "data_wait_s": totals.data_wait,
            "eval_time_s": totals.eval_seconds,
            "checkpoint_time_s": totals.checkpoint_seconds,
            "usd_per_million_tokens": efficiency.dollars_per_million_tokens(hw, steady_tps or 0),
            "price_source": hw.price_source,
            "kwh_per_million_tokens": efficiency.kwh_per_million_tokens(hw, steady_tps or 0),
            "power_source": hw.power_source,
            "peak_memory_bytes": efficiency.peak_memory_bytes(self.devices),
        }

    def _print_summary(self, s: dict) -> None:
        from chipwise.report import summary_table

        self.console.print(summary_table(s))
