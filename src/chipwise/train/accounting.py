"""Where the seconds, tokens and FLOPs of a run go: per log window and for the whole run, and what they cost.

Step time is the interval between completions of consecutive steps (evaluation and checkpoints excluded and
counted apart); the first step of each invocation pays for warm-up and is kept out of the steady-state averages.
Model FLOPs follow flops.py; MFU, dollars and kWh per million tokens follow efficiency.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from chipwise import efficiency


@dataclass(frozen=True)
class Cadence:
    """When evaluation, checkpoints and log lines are due: decided here and nowhere else."""
    steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int

    @classmethod
    def of(cls, t) -> "Cadence":
        return cls(t.steps, t.eval_every, t.checkpoint_every, t.log_every)

    def eval_due(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.steps

    def checkpoint_due(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def boundary(self, step: int) -> bool:
        """A step after which the loop evaluates or saves, and so must know the step's outcome first."""
        return self.eval_due(step) or self.checkpoint_due(step)


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
    """The whole run's totals: a resumed run starts from those saved with its checkpoint (`from_state`), so the
    summary covers every invocation on the path to the final state (steps after the checkpoint a killed
    invocation had reached were trained again, and are counted once)."""
    tokens: int = 0
    wall_seconds: float = 0.0  # the training loops, evaluation and checkpoints included
    step_seconds: float = 0.0  # steady-state steps only (the first of each invocation excluded)
    steady_tokens: int = 0
    data_wait: float = 0.0
    checkpoint_seconds: float = 0.0
    eval_seconds: float = 0.0
    compile_seconds: float = 0.0
    invocations: int = 0
    val_losses: list = field(default_factory=list)  # (step, loss)
    last_loss: float | None = None
    stopped_by: str | None = None  # why the run stopped early (a signal, or divergence); never saved

    def state(self, **changes) -> dict:
        """What a checkpoint records (JSON)."""
        d = {k: v for k, v in asdict(self).items() if k != "stopped_by"} | changes
        d["val_losses"] = [list(x) for x in d["val_losses"]]
        return d

    @classmethod
    def from_state(cls, state: dict | None) -> "Totals":
        known = {f.name for f in fields(cls)} - {"stopped_by"}
        totals = cls(**{k: v for k, v in (state or {}).items() if k in known})
        totals.val_losses = [tuple(x) for x in totals.val_losses]
        return totals

    def add_step(self, tokens: int, seconds: float, data_wait: float, loss: float, steady: bool) -> None:
        self.tokens += tokens
        self.data_wait += data_wait
        self.last_loss = loss
        if steady:
            self.step_seconds += seconds
            self.steady_tokens += tokens


def window_record(step: int, metrics: dict, window: Window, tokens_per_step: int, hw, flops_per_token: float,
                  guard_state: dict, peak_memory: int | None) -> dict:
    """The metrics.jsonl record of one log line: the window's throughput, model FLOP/s and MFU."""
    step_time = window.seconds / window.steps
    tps = tokens_per_step / step_time
    tps_dev = tps / hw.num_devices
    tflops_dev = tps_dev * flops_per_token / 1e12
    record = {"step": step, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
              "tokens_per_s": tps, "tokens_per_s_per_device": tps_dev, "tflops_per_device": tflops_dev,
              "mfu": efficiency.mfu(tflops_dev, hw.peak), "step_time_s": step_time,
              "data_wait_s": window.data_wait / window.steps, "skipped_steps": guard_state["skipped"],
              "rollbacks": guard_state["rollbacks"]}
    if peak_memory is not None:
        record["peak_memory_bytes"] = peak_memory
    return record


def window_line(r: dict) -> str:
    """The console line of a window_record."""
    mfu_text = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "unknown"
    return (f"step {r['step']:>6}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s  "
            f"{r['tflops_per_device'] * 1e3:,.1f} GFLOP/s/dev  MFU {mfu_text}  step {r['step_time_s'] * 1e3:,.0f} ms "
            f"(data wait {r['data_wait_s'] * 1e3:.1f} ms)"
            + (f"  skipped {r['skipped_steps']}, rollbacks {r['rollbacks']}" if r["skipped_steps"] else "")
            + ("  mix " + " ".join(f"{k} {v:.1%}" for k, v in r["data_mixture"].items()) if "data_mixture" in r
               else ""))


def summary(totals: Totals, hw, flops_per_token: float, run_dir: str, peak_memory: int | None) -> dict:
    """The end-of-run summary (summary.json, and the table printed at the end), over the whole run."""
    steady_tps = totals.steady_tokens / totals.step_seconds if totals.step_seconds > 0 else None
    tflops_dev = steady_tps / hw.num_devices * flops_per_token / 1e12 if steady_tps else None
    first_val = totals.val_losses[0][1] if totals.val_losses else None
    return {
        "run_dir": run_dir,
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
        "compile_time_s": totals.compile_seconds,
        "invocations": totals.invocations,
        "stopped": totals.stopped_by,
        "data_wait_s": totals.data_wait,
        "eval_time_s": totals.eval_seconds,
        "checkpoint_time_s": totals.checkpoint_seconds,
        "usd_per_million_tokens": efficiency.dollars_per_million_tokens(hw, steady_tps or 0),
        "price_source": hw.price_source,
        "kwh_per_million_tokens": efficiency.kwh_per_million_tokens(hw, steady_tps or 0),
        "kwh_per_million_tokens_range": efficiency.kwh_per_million_tokens_range(hw, steady_tps or 0),
        "power_source": hw.power_source,
        "peak_memory_bytes": peak_memory,
    }
