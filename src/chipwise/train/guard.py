"""The divergence guard: what to do after each step, as a small state machine with no I/O.

    healthy --non-finite step--> skipping (the step's update was skipped inside the step itself, train/step.py)
    skipping --finite step--> healthy
    skipping --max_bad_steps non-finite in a row--> roll back: to the newest checkpoint from before the streak
                                                   (or the initial state), keeping the data position, so the
                                                   batches since then are skipped (as PaLM did at loss spikes)
    roll back with max_rollbacks already used --> stop: TrainingStopped, exit code EXIT_DIVERGED

Its counters are saved in every checkpoint, so a resumed run carries on counting.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

from chipwise.errors import TrainingStopped

EXIT_DIVERGED = 3  # non-finite steps kept coming after train.max_rollbacks rollbacks (preemption: 128 + signal)


class Verdict(enum.Enum):
    OK = "ok"
    SKIPPED = "skipped"  # a non-finite step; its update was not applied
    ROLL_BACK = "roll back"  # too many non-finite steps in a row: restore an earlier state


@dataclass
class RollbackPlan:
    target_step: int  # the checkpoint to restore; 0: the initial state (no checkpoint from before the streak)
    set_aside: list[int] = field(default_factory=list)  # checkpoints of the abandoned path, moved out of the way


@dataclass
class Guard:
    skipped: int = 0  # updates skipped for a non-finite loss or gradient norm, over the whole run
    streak: int = 0  # non-finite steps in a row, now
    streak_start: int | None = None  # the first step of that streak
    rollbacks: int = 0

    def observe(self, step: int, finite: bool, max_bad_steps: int) -> Verdict:
        """Record one finished step."""
        if finite:
            self.streak, self.streak_start = 0, None
            return Verdict.OK
        self.skipped += 1
        self.streak += 1
        self.streak_start = self.streak_start or step
        return Verdict.ROLL_BACK if self.streak >= max_bad_steps else Verdict.SKIPPED

    def check_rollback_allowed(self, max_rollbacks: int, checkpoint_steps: list[int]) -> None:
        """Raise TrainingStopped (exit EXIT_DIVERGED) when the rollbacks allowed are used up."""
        if self.rollbacks >= max_rollbacks:
            intact = (f"checkpoints up to step {max(checkpoint_steps)} are intact" if checkpoint_steps else
                      "no checkpoint had been saved")
            raise TrainingStopped(f"training diverged: {self.streak} non-finite steps in a row from step "
                                  f"{self.streak_start}, and the {max_rollbacks} rollbacks allowed "
                                  f"(train.max_rollbacks) are used up; {intact}", EXIT_DIVERGED)

    def plan_rollback(self, checkpoint_steps: list[int]) -> RollbackPlan:
        """Where to go back to: the newest checkpoint from before the streak; later ones are set aside."""
        good = [s for s in checkpoint_steps if s < self.streak_start]
        return RollbackPlan(target_step=good[-1] if good else 0,
                            set_aside=[s for s in checkpoint_steps if s >= self.streak_start])

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.streak, self.streak_start = 0, None

    def state(self) -> dict:
        return asdict(self)
