"""SIGTERM / SIGINT during a run: finish the step, save, and exit with 128 + the signal number.

A single process installs handlers that set a flag the loop checks between steps. Before training starts (data
preparation, compilation) there is nothing new to save, so a signal stops at once. A second signal gets the old
behaviour at once (the files on disk are always consistent: Orbax publishes a checkpoint only when it is complete).
A multi-process run leaves SIGTERM to JAX's preemption service, which the loop asks at every step
(distributed.preemption_point), so that every process stops after the same step.
"""

from __future__ import annotations

import signal
import threading

import jax

from chipwise.errors import TrainingStopped

WATCHED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager; `.received` is the signal number that asked the run to stop, or None."""

    def __init__(self):
        self.received: int | None = None
        self.training = False  # set by the loop once a step can be saved
        self._previous: dict = {}

    def _handler(self, signum, frame):
        self._restore()
        if not self.training:
            name = signal.Signals(signum).name
            raise TrainingStopped(f"{name} before training started; nothing new to save", 128 + signum)
        self.received = signum

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        # Python allows handlers only in the main thread; JAX's preemption service owns SIGTERM in multi-process
        # runs.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._handler) for s in WATCHED}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name
