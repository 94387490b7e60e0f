"""The training loop: set up devices, data and state, run the steps, and account for every second and FLOP."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import threading
import time
from contextlib import contextmanager
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
from chipwise.errors import ChipwiseError, ConfigError, TrainingStopped
from chipwise.sharding import data_parallel_size, make_mesh, platform_rules, use_mesh
from chipwise.train.checkpoint import Checkpoints, abstract_like
from chipwise.train.metrics import open_writer
from chipwise.train.step import build_steps

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
EXIT_DIVERGED = 3  # non-finite steps kept coming after train.max_rollbacks rollbacks (preemption: 128 + signal)


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


def incompatibility(meta: dict, cfg: Config, tokenizer_fp: str) -> str | None:
    """What makes a checkpoint unusable under `cfg`, in a few words; None if nothing does.

    The model's shape and vocabulary and the tokenizer must match; training length, schedule, logging and mesh
    may change (the data-stream settings are checked by the data iterator itself).
    """
    saved = (meta.get("config") or {}).get("model")
    if saved is not None:  # checkpoints of older versions lack it; Orbax's shape check then has the last word
        now = to_dict(cfg)["model"]
        for key, value in now.items():
            if key in saved and saved[key] != value:
                return f"checkpoint has model.{key}={saved[key]}, config has {value}"
    fp = meta.get("tokenizer_fingerprint")
    if fp != tokenizer_fp:
        return (f"checkpoint was trained with tokenizer {str(fp)[:12]}, the data now gives tokenizer "
                f"{tokenizer_fp[:12]} (sha256 of tokenizer.json)")
    return None


@dataclass
class Guard:
    """The divergence guard's counters; saved in every checkpoint so that a resumed run carries on counting."""
    skipped: int = 0  # updates skipped for a non-finite loss or gradient norm, over the whole run
    streak: int = 0  # non-finite steps in a row, now
    streak_start: int | None = None  # the first step of that streak
    rollbacks: int = 0


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
    stopped_by: str | None = None  # why a signal stopped the run early


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
        with self._stop_on_signals():
            self._setup()
            if not self.resume:  # a resumed run's config is written only once the checkpoint accepts it
                self._write_config()
            with use_mesh(self.mesh, self.rules):
                steps = build_steps(cfg, self.mesh, self.attention.fn, self.dtype)
                abstract_state = abstract_like(jax.eval_shape(steps.init), steps.state_shardings)
                ckpt = Checkpoints(self.run_dir / "checkpoints", t.keep_checkpoints, t.checkpoint_every,
                                   t.keep_every, log=self.log)
                try:
                    state, start, iterator, guard = self._initial_state(steps, ckpt, abstract_state)
                    if self.resume:
                        self._write_config()
                    abstract_batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32,
                                                          sharding=steps.batch_sharding)
                    t0 = time.perf_counter()
                    train_step = steps.train.lower(abstract_state, abstract_batch,
                                                   jax.ShapeDtypeStruct((), jnp.float32)).compile()
                    compile_s = time.perf_counter() - t0
                    info = self._describe(compile_s)
                    self._print_header(info)
                    val_batches = data.eval_batches(self.data.val_tokens, t.seq_len, t.batch_size, t.eval_batches)
                    writer = open_writer(self.run_dir, self.console, t.steps, start)  # a no-op beyond process 0
                    writer.write({"step": start, "compile_time_s": compile_s,
                                  **({"event": "resumed"} if start else {})})
                    try:
                        totals = self._loop(state, start, iterator, guard, train_step, steps, ckpt, writer,
                                            val_batches, abstract_state)
                    finally:
                        writer.close()
                finally:
                    ckpt.close()
        if totals.stopped_by is not None:
            raise TrainingStopped(totals.stopped_by, 128 + self._signal)
        summary = self._summary(totals, info)
        if is_leader():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._print_summary(summary)
        return summary

    def _write_config(self) -> None:
        if is_leader():  # one process writes the run's files
            (self.run_dir / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    @contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGINT set a flag the loop checks between steps: it finishes the step, saves, and exits
        with 128 + the signal number. A second signal gets the old behaviour at once (the files on disk are
        always consistent: Orbax publishes a checkpoint only when it is complete)."""
        self._signal, self._training = None, False
        if threading.current_thread() is not threading.main_thread():  # Python allows handlers only there
            yield
            return
        if jax.process_count() > 1:  # JAX's preemption service owns SIGTERM: the loop asks preemption_point
            yield
            return
        watched = (signal.SIGTERM, signal.SIGINT)

        def handler(signum, frame):
            for s, h in previous.items():
                signal.signal(s, h)
            if not self._training:  # data preparation or compilation: nothing new to save, so stop now
                name = signal.Signals(signum).name
                raise TrainingStopped(f"{name} before training started; nothing new to save", 128 + signum)
            self._signal = signum

        previous = {s: signal.signal(s, handler) for s in watched}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _initial_state(self, steps, ckpt: Checkpoints, abstract_state):
        t = self.cfg.train
        iterator = data.make_train_iterator(self.data, t.seq_len, t.batch_size, t.seed,
                                            jax.process_index(), jax.process_count(), self.cfg.data.worker_threads)
        found = None
        if self.resume:
            def check(meta):  # before any array is read or any file of the run is written
                problem = incompatibility(meta, self.cfg, self.data.tokenizer_fingerprint)
                if problem:
                    raise ChipwiseError(f"cannot resume {self.run_dir}: {problem}; resume with the settings it "
                                        f"was trained with, or start a new run_dir")
                iterator.set_state(meta["data_iterator"])  # refuses a changed seq_len, batch size or seed

            found = ckpt.restore_latest(abstract_state, check)
        if found is None:
            if self.resume:
                self.log(f"no checkpoint in {self.run_dir}; starting from step 0")
            state = steps.init()
            if self.cfg.train.init_from:  # pre-trained weights (Hugging Face Llama), a fresh optimizer state
                from chipwise.hf import initial_params

                state["params"] = initial_params(self.cfg, steps.state_shardings["params"])
                self.log(f"initialised from {self.cfg.train.init_from}")
            return state, 0, iterator, Guard()
        step, state, meta = found
        self.log(f"resumed from step {step}")
        return state, step, iterator, Guard(**meta.get("guard", {}))

    def _global_batch(self, local: np.ndarray, sharding) -> jax.Array:
        shape = (self.cfg.train.batch_size, local.shape[1])
        return jax.make_array_from_process_local_data(sharding, local, shape)

    def _evaluate(self, eval_fn, params, batches, sharding) -> float:
        rows = self.cfg.train.batch_size // jax.process_count()  # each process feeds its own rows
        first = jax.process_index() * rows
        losses = [eval_fn(params, self._global_batch(b["tokens"][first:first + rows], sharding)) for b in batches]
        return float(np.mean([float(x) for x in losses]))

    def _save(self, ckpt: Checkpoints, writer, step, state, iterator, guard, force=False) -> None:
        meta = {"step": step, "data_iterator": iterator.get_state(), "config": to_dict(self.cfg),
                "tokenizer_fingerprint": self.data.tokenizer_fingerprint, "guard": dataclasses.asdict(guard)}
        known = len(ckpt.failures)
        ckpt.save(step, state, meta, force=force)
        for failed, reason in ckpt.failures[known:]:  # this save, or the previous one finishing badly
            writer.write({"step": failed, "event": "checkpoint_failed", "reason": reason})

    def _rollback(self, ckpt: Checkpoints, writer, steps, abstract_state, guard, step, data_pos):
        """Back to the newest checkpoint from before the run of non-finite steps, keeping the data position
        (so the batches since that checkpoint are skipped, as PaLM did at loss spikes). Later checkpoints
        belong to the abandoned path and are moved aside."""
        t = self.cfg.train
        if guard.rollbacks >= t.max_rollbacks:
            raise TrainingStopped(f"training diverged: {guard.streak} non-finite steps in a row from step "
                                  f"{guard.streak_start}, and the {t.max_rollbacks} rollbacks allowed "
                                  f"(train.max_rollbacks) are used up; checkpoints up to step "
                                  f"{max(ckpt.all_steps(), default=0)} are intact", EXIT_DIVERGED)
        ckpt.wait()
        good = [s for s in ckpt.all_steps() if s < guard.streak_start]
        for s in ckpt.all_steps():
            if s >= guard.streak_start:
                ckpt.set_aside(s, "rolled-back")
        if good:
            target, state = good[-1], ckpt.restore(good[-1], abstract_state)
            target_pos = ckpt.read_meta(target)["data_iterator"]["step"]
        else:  # no checkpoint before the trouble: the initial state is the last good one
            target, state, target_pos = 0, steps.init(), 0
        record = {"step": target, "event": "rollback", "from_step": step, "bad_streak": guard.streak,
                  "data_skipped_batches": data_pos - target_pos, "rollbacks": guard.rollbacks + 1}
        writer.write(record)
        writer.log(f"[bold red]rolled back[/bold red] to step {target} after {guard.streak} non-finite steps in a "
                   f"row (from step {guard.streak_start}); skipping {data_pos - target_pos} batches of data "
                   f"(rollback {guard.rollbacks + 1} of at most {t.max_rollbacks})")
        guard.rollbacks += 1
        guard.streak, guard.streak_start = 0, None
        return state, target

    def _loop(self, state, start, iterator, guard, train_step, steps, ckpt, writer, val_batches,
              abstract_state) -> Totals:
        t = self.cfg.train
        tokens_per_step = t.batch_size * t.seq_len
        totals, window = Totals(), Window()
        hw = self.hardware
        poisoned = set(t.inject_nan_batches)

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

        def finish(entry) -> bool:
            """Block on a dispatched step's metrics, time it, log it when due; True if it calls for a rollback."""
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
            if metrics["finite"]:
                guard.streak, guard.streak_start = 0, None
            else:
                guard.skipped += 1
                guard.streak += 1
                guard.streak_start = guard.streak_start or step
                writer.write({"step": step, "event": "skipped_update", "loss": metrics["loss"],
                              "grad_norm": metrics["grad_norm"], "bad_streak": guard.streak,
                              "skipped_steps": guard.skipped})
                writer.log(f"step {step:>6}  [bold red]non-finite[/bold red] loss {metrics['loss']} / grad norm "
                           f"{metrics['grad_norm']}: update skipped ({guard.streak} in a row, {guard.skipped} "
                           f"in all)")
            writer.advance(step, metrics["loss"], guard.skipped)
            if step % t.log_every == 0 or step == t.steps:
                self._log_window(writer, step, metrics, window, tokens_per_step, hw, guard)
                window.__init__()
            return guard.streak >= t.max_bad_steps

        step = start
        data_pos = iterator.get_state()["step"]  # stream position of the next batch
        self._training = True  # from here a signal lets the step finish and saves (see _stop_on_signals)
        while step < t.steps and self._signal is None:
            step += 1
            w0 = time.perf_counter()
            local = next(iterator)["tokens"]
            batch = self._global_batch(local, steps.batch_sharding)
            wait = time.perf_counter() - w0
            poison = np.float32(np.nan if data_pos in poisoned else 0.0)
            data_pos += 1
            state, metrics = train_step(state, batch, poison)
            diverged = finish(pending) if pending is not None else False
            pending = (step, metrics, wait)
            if preemption_point(step):  # SIGTERM to a multi-process run: every process stops after this step
                self._signal = signal.SIGTERM
            boundary = step % t.eval_every == 0 or step % t.checkpoint_every == 0 or step == t.steps
            if boundary and not diverged:
                diverged = finish(pending)
                pending = None
            if diverged:
                state, step = self._rollback(ckpt, writer, steps, abstract_state, guard, step, data_pos)
                pending = None
                last_done = time.perf_counter()
                continue
            if boundary:
                if step % t.eval_every == 0 or step == t.steps:
                    evaluate(step)
                if step % t.checkpoint_every == 0 or step == t.steps:
                    c0 = time.perf_counter()
                    self._save(ckpt, writer, step, state, iterator, guard, force=step == t.steps)
                    seconds = time.perf_counter() - c0
                    totals.checkpoint_seconds += seconds
                    writer.write({"step": step, "checkpoint_s": seconds})  # per-step breakdown in reports
                last_done = time.perf_counter()  # eval and checkpoint time is not step time
        if pending is not None:
            finish(pending)  # a rollback it might call for happens after the resume; the streak is saved
        if self._signal is not None:
            totals.stopped_by = self._preempted(ckpt, writer, step, start, state, iterator, guard)
        ckpt.wait()
        totals.wall_seconds = time.perf_counter() - loop_start
        return totals

    def _preempted(self, ckpt, writer, step, start, state, iterator, guard) -> str:
        name = signal.Signals(self._signal).name
        if step > start and step not in ckpt.all_steps():
            self._save(ckpt, writer, step, state, iterator, guard, force=True)
        saved = ckpt.wait() and step in ckpt.all_steps()
        writer.write({"step": step, "event": "preempted", "signal": name, "checkpoint_saved": saved})
        latest = ckpt.latest_step()
        where = (f"checkpoint saved at step {step}" if saved else
                 f"no new checkpoint (latest: {latest if latest is not None else 'none'})")
        return f"{name} after step {step}: {where}; continue with: chipwise train --resume {self.run_dir}"

    def _log_window(self, writer, step, metrics, window: Window, tokens_per_step, hw, guard: Guard) -> None:
        step_time = window.seconds / window.steps
        tps = tokens_per_step / step_time
        tps_dev = tps / hw.num_devices
        tflops_dev = tps_dev * self.flops.total / 1e12
        mfu = efficiency.mfu(tflops_dev, hw.peak)
        record = {"step": step, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                  "tokens_per_s": tps, "tokens_per_s_per_device": tps_dev, "tflops_per_device": tflops_dev,
                  "mfu": mfu, "step_time_s": step_time, "data_wait_s": window.data_wait / window.steps,
                  "skipped_steps": guard.skipped, "rollbacks": guard.rollbacks}
        mem = efficiency.peak_memory_bytes(self.devices)
        if mem is not None:
            record["peak_memory_bytes"] = mem
        writer.write(record)
        mfu_text = f"{mfu:6.1%}" if mfu is not None else "unknown"
        writer.log(f"step {step:>6}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                   f"{tps:,.0f} tok/s  {tflops_dev * 1e3:,.1f} GFLOP/s/dev  MFU {mfu_text}  "
                   f"step {step_time * 1e3:,.0f} ms (data wait {window.data_wait / window.steps * 1e3:.1f} ms)"
                   + (f"  skipped {guard.skipped}, rollbacks {guard.rollbacks}" if guard.skipped else ""))

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
