"""The training loop. Each step: fetch the batch, dispatch the step, and only then read the previous step's
metrics (so the host never stalls the device); evaluate and save when due (accounting.Cadence); answer the
divergence guard (guard.py) and stop signals (signals.py). Set-up is in setup.py, where a run starts from in
resume.py, the run directory's layout in run_dir.py, and every second and FLOP is accounted in accounting.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import numpy as np
from rich.console import Console

from chipwise import data, efficiency
from chipwise.config import Config
from chipwise.config_checks import config_warnings
from chipwise.distributed import is_leader, preemption_point
from chipwise.errors import TrainingStopped
from chipwise.process import make_console
from chipwise.run_dir import RunDir
from chipwise.sharding import use_mesh
from chipwise.train import accounting
from chipwise.train.accounting import Cadence, Totals, Window
from chipwise.train.compiled_step import build_train_step, with_platform_defaults
from chipwise.train.guard import EXIT_DIVERGED, Guard, Verdict  # noqa: F401 - EXIT_DIVERGED: the exit codes' home
from chipwise.train.metrics import open_writer
from chipwise.train.resume import checkpoint_meta, fresh_state, initial_state, restore_step
from chipwise.train.setup import describe, header_lines, prepare_data_everywhere, prepare_devices
from chipwise.train.signals import StopSignals


class Trainer:
    """`init_only`: set the run up, evaluate its starting state and save it as the step-0 checkpoint, then stop
    without training (`chipwise import`; `train --resume` continues from that checkpoint)."""

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False, console: Console | None = None,
                 init_only: bool = False):
        self.cfg, self.resume, self.overwrite, self.init_only = cfg, resume, overwrite, init_only
        self.console = console or make_console(quiet=not is_leader())  # one process speaks for the run
        self.run_dir = RunDir(cfg.run_dir)
        self.run_dir.check_prepare(resume, overwrite)  # refuse now; nothing is created until every check passed

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def run(self) -> dict:
        """Train; the summary of the whole run. Raises TrainingStopped when a signal or divergence stopped it."""
        with StopSignals() as self.signals:
            self.setup = prepare_devices(self.cfg)
            self.cfg = with_platform_defaults(self.cfg, self.setup.platform)  # config.yaml records the choice
            self.data = prepare_data_everywhere(self.cfg, self.log)
            self.run_dir.prepare(self.resume, self.overwrite)  # from here this run owns the directory
            try:
                totals = self._train()
            finally:
                self.run_dir.release()
        summary = accounting.summary(totals, self.setup.hardware, self.setup.flops.total, str(self.run_dir),
                                     efficiency.peak_memory_bytes(self.setup.devices))
        self.run_dir.write_summary(summary, self.log)
        if totals.stopped_by is not None:
            raise TrainingStopped(totals.stopped_by, self.exit_code)
        if self.init_only:  # nothing trained to sum up; the caller says what was made
            return summary
        from chipwise.report import summary_table

        self.console.print(summary_table(summary))
        return summary

    def _train(self) -> Totals:
        cfg, t = self.cfg, self.cfg.train
        if not self.resume:  # sampling and export read the run's own copy of its tokenizer
            self.run_dir.write_tokenizer(self.data.tokenizer)
            if t.init_from:  # its special tokens and chat template go where its tokenizer goes, to export and serve
                from chipwise.hf import read_tokenizer_meta

                self.run_dir.write_tokenizer_meta(read_tokenizer_meta(Path(t.init_from)))
            self.run_dir.write_config(cfg)  # a resumed run's config is written once the checkpoint accepts it
        with use_mesh(self.setup.mesh, self.setup.rules):
            compiled = build_train_step(cfg, self.setup.mesh, self.setup.platform, self.setup.attention,
                                        eos_id=self.data.eos_id)
            ckpt = self.run_dir.checkpoints(t.keep_checkpoints, t.keep_every, log=self.log,
                                            compress=t.compress_checkpoints)
            try:
                state, start, iterator, guard, totals, restored = initial_state(
                    cfg, self.run_dir, self.data, compiled.steps, ckpt, compiled.abstract_state, self.resume,
                    self.log)
                if self.resume:
                    self.run_dir.write_config(cfg)
                if not self.init_only:  # after the checkpoint is accepted: a refused resume costs no compile
                    compiled.compile()
                    totals.compile_seconds += compiled.compile_s
                totals.invocations += 1
                info = describe(self.setup, cfg, self.data, compiled.compile_s)
                self.run_dir.write_run_info(info, self.log)
                for line in header_lines(self.run_dir, info):
                    self.log(line)
                for warning in config_warnings(cfg):
                    self.log(f"[bold yellow]warning[/bold yellow]  {warning}")
                self.run_dir.repair_metrics()
                writer = open_writer(self.run_dir, self.console, t.steps, start)  # a no-op beyond process 0
                event = {"event": "resumed"} if restored else {"event": "restarted"} if self.resume else {}
                compile_s = {} if compiled.compile_s is None else {"compile_time_s": compiled.compile_s}
                writer.write({"step": start, **compile_s, **event})
                try:
                    return self._loop(state, start, iterator, guard, totals, compiled, ckpt, writer, restored)
                finally:
                    writer.close()
            finally:
                ckpt.close()

    # ---- pieces of the loop -------------------------------------------------------------------------------
    def _global_batch(self, local: np.ndarray, sharding) -> jax.Array:
        return jax.make_array_from_process_local_data(sharding, local, (self.cfg.train.batch_size, local.shape[1]))

    def _evaluate(self, step, eval_fn, params, batches, sharding, totals, writer) -> None:
        e0 = time.perf_counter()
        rows = self.cfg.train.batch_size // jax.process_count()  # each process feeds its own rows
        first = jax.process_index() * rows
        losses = [eval_fn(params, self._global_batch(b["tokens"][first:first + rows], sharding)) for b in batches]
        loss = float(np.mean([float(x) for x in losses]))
        seconds = time.perf_counter() - e0
        totals.eval_seconds += seconds
        totals.val_losses.append((step, loss))
        writer.write({"step": step, "val_loss": loss, "val_ppl": float(np.exp(min(loss, 50.0))), "eval_s": seconds})
        writer.log(f"step {step:>6}  val_loss {loss:.4f}  (ppl {np.exp(min(loss, 50.0)):.1f})")

    def _save(self, ckpt, writer, step, state, iterator, guard, totals: dict, force=False) -> None:
        known = len(ckpt.failures)
        ckpt.save(step, state, checkpoint_meta(self.cfg, step, iterator, self.data, guard, totals), force=force)
        if self.run_dir.remote:  # a bucket's records are uploaded whole: with each checkpoint, at the latest
            writer.sync()
        for failed, reason in ckpt.failures[known:]:  # this save, or the previous one finishing badly
            writer.write({"step": failed, "event": "checkpoint_failed", "reason": reason})

    def _rollback(self, ckpt, writer, steps, abstract_state, guard: Guard, step: int, data_pos: int):
        """Back to the newest checkpoint from before the run of non-finite steps, keeping the data position."""
        t = self.cfg.train
        try:
            guard.check_rollback_allowed(t.max_rollbacks, ckpt.all_steps())
        except TrainingStopped as stop:
            writer.write({"step": step, "event": "diverged", "bad_streak": guard.streak,
                          "rollbacks": guard.rollbacks, "reason": str(stop)})
            raise
        ckpt.wait()
        plan = guard.plan_rollback(ckpt.all_steps())
        for s in plan.set_aside:  # the abandoned path
            ckpt.set_aside(s, "rolled-back")
        target = plan.target_step
        if target in ckpt.all_steps():  # step 0 too: `chipwise import` saves one
            state, meta = restore_step(ckpt, target, self.cfg, steps, abstract_state)
            target_pos = meta["data_iterator"]["step"]
        else:  # no checkpoint before the trouble: the initial state (pre-trained weights too) is the last good one
            state, target_pos = fresh_state(self.cfg, steps), 0
        writer.write({"step": target, "event": "rollback", "from_step": step, "bad_streak": guard.streak,
                      "data_skipped_batches": data_pos - target_pos, "rollbacks": guard.rollbacks + 1})
        writer.log(f"[bold red]rolled back[/bold red] to step {target} after {guard.streak} non-finite steps in a "
                   f"row (from step {guard.streak_start}); skipping {data_pos - target_pos} batches of data "
                   f"(rollback {guard.rollbacks + 1} of at most {t.max_rollbacks})")
        guard.rolled_back()
        return state, target

    def _preempted(self, ckpt, writer, step, start, state, iterator, guard, totals: dict) -> str:
        name = self.signals.name
        if step > start and step not in ckpt.all_steps():
            self._save(ckpt, writer, step, state, iterator, guard, totals, force=True)
        saved = ckpt.wait() and step in ckpt.all_steps()
        writer.write({"step": step, "event": "preempted", "signal": name, "checkpoint_saved": saved})
        latest = ckpt.latest_step()
        where = (f"checkpoint saved at step {step}" if saved else
                 f"no new checkpoint (latest: {latest if latest is not None else 'none'})")
        return f"{name} after step {step}: {where}; continue with: chipwise train --resume {self.run_dir}"

    # ---- the loop -----------------------------------------------------------------------------------------
    def _loop(self, state, start, iterator, guard: Guard, totals: Totals, compiled, ckpt, writer,
              restored: bool) -> Totals:
        """Train from `start` to train.steps, adding to `totals` (the run's so far). A state not `restored` from a
        checkpoint is evaluated first (a checkpoint's state was evaluated when it was saved)."""
        t, steps = self.cfg.train, compiled.steps
        cadence, tokens_per_step = Cadence.of(t), t.batch_size * t.seq_len
        window, wall_before = Window(), totals.wall_seconds
        poisoned = set(t.inject_nan_batches)
        val_batches = data.eval_batches(self.data.val_tokens, t.seq_len, t.batch_size, t.eval_batches)

        def evaluate(step):
            self._evaluate(step, steps.eval, state["params"], val_batches, steps.batch_sharding, totals, writer)

        loop_start = time.perf_counter()

        def totals_now() -> dict:  # what a checkpoint records: the run's totals up to this moment
            return totals.state(wall_seconds=wall_before + time.perf_counter() - loop_start)

        if not restored:
            evaluate(start)
        if self.init_only:  # the starting state is the run's first checkpoint
            self._save(ckpt, writer, start, state, iterator, guard, totals_now(), force=True)
        pending = None  # (step, metrics, data_wait) of the step dispatched last, read one step late
        last_done, first = time.perf_counter(), True

        def finish(entry) -> bool:
            """Block on a dispatched step's metrics, time it, log it when due; True if it calls for a rollback."""
            nonlocal last_done, first
            step, metrics, wait, position = entry
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            seconds, last_done = now - last_done, now
            totals.add_step(tokens_per_step, seconds, wait, metrics["loss"], steady=not first)  # first: warm-up
            first = False
            window.add(seconds, wait)
            verdict = guard.observe(step, bool(metrics["finite"]), t.max_bad_steps)
            if verdict is not Verdict.OK:
                writer.write({"step": step, "event": "skipped_update", "loss": metrics["loss"],
                              "grad_norm": metrics["grad_norm"], "bad_streak": guard.streak,
                              "skipped_steps": guard.skipped})
                writer.log(f"step {step:>6}  [bold red]non-finite[/bold red] loss {metrics['loss']} / grad norm "
                           f"{metrics['grad_norm']}: update skipped ({guard.streak} in a row, {guard.skipped} "
                           f"in all)")
            writer.advance(step, metrics["loss"], guard.skipped)
            if cadence.log_due(step):
                record = accounting.window_record(step, metrics, window, tokens_per_step, self.setup.hardware,
                                                  self.setup.flops.total, guard.state(),
                                                  efficiency.peak_memory_bytes(self.setup.devices))
                shares = iterator.realised_mixture(position)
                if shares is not None:  # every sequence drawn up to this step, all processes together
                    record["data_mixture"] = shares
                writer.write(record)
                writer.log(accounting.window_line(record))
                window.__init__()
            return verdict is Verdict.ROLL_BACK

        step = start
        data_pos = iterator.get_state()["step"]  # stream position of the next batch
        self.signals.training = True  # from here a signal lets the step finish and saves
        while step < t.steps and not self.init_only and self.signals.received is None:
            step += 1
            w0 = time.perf_counter()
            batch = self._global_batch(next(iterator)["tokens"], steps.batch_sharding)
            wait = time.perf_counter() - w0
            poison = np.float32(np.nan if data_pos in poisoned else 0.0)
            data_pos += 1
            state, metrics = compiled.train(state, batch, poison)
            diverged = finish(pending) if pending is not None else False
            pending = (step, metrics, wait, data_pos)
            if preemption_point(step):  # SIGTERM to a multi-process run: every process stops after this step
                self.signals.received = signal.SIGTERM
            boundary = cadence.boundary(step)
            if boundary and not diverged:
                diverged, pending = finish(pending), None
            if diverged:
                try:
                    state, step = self._rollback(ckpt, writer, steps, compiled.abstract_state, guard, step,
                                                 data_pos)
                except TrainingStopped as stop:  # the summary still gets written, with why it stopped
                    totals.stopped_by, self.exit_code = str(stop), stop.exit_code
                    pending = None
                    break
                pending, last_done = None, time.perf_counter()
                continue
            if boundary:
                if cadence.eval_due(step):
                    evaluate(step)
                if cadence.checkpoint_due(step):
                    c0 = time.perf_counter()
                    self._save(ckpt, writer, step, state, iterator, guard, totals_now(), force=step == t.steps)
                    seconds = time.perf_counter() - c0
                    totals.checkpoint_seconds += seconds
                    writer.write({"step": step, "checkpoint_s": seconds})  # per-step breakdown in reports
                last_done = time.perf_counter()  # eval and checkpoint time is not step time
        if pending is not None:
            finish(pending)  # a rollback it might call for happens after the resume; the streak is saved
        if self.signals.received is not None and totals.stopped_by is None:
            totals.stopped_by = self._preempted(ckpt, writer, step, start, state, iterator, guard, totals_now())
            self.exit_code = 128 + self.signals.received
        known = len(ckpt.failures)
        ckpt.wait()
        for failed, reason in ckpt.failures[known:]:  # the last save, failing only now
            writer.write({"step": failed, "event": "checkpoint_failed", "reason": reason})
        totals.wall_seconds = wall_before + time.perf_counter() - loop_start
        return totals
