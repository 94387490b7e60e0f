"""The divergence guard and the loop's cadence as plain objects: no model, no CLI run."""

import pytest

from chipwise.errors import TrainingStopped
from chipwise.train.accounting import Cadence
from chipwise.train.guard import EXIT_DIVERGED, Guard, Verdict


def test_a_lone_non_finite_step_is_skipped_and_a_finite_one_ends_the_streak():
    g = Guard()
    assert g.observe(1, True, max_bad_steps=3) is Verdict.OK
    assert g.observe(2, False, max_bad_steps=3) is Verdict.SKIPPED
    assert (g.skipped, g.streak, g.streak_start) == (1, 1, 2)
    assert g.observe(3, True, max_bad_steps=3) is Verdict.OK
    assert (g.skipped, g.streak, g.streak_start) == (1, 0, None)  # the total is kept, the streak is not


def test_max_bad_steps_in_a_row_call_for_a_rollback_to_before_the_streak():
    g = Guard()
    verdicts = [g.observe(step, False, max_bad_steps=3) for step in (10, 11, 12)]
    assert verdicts == [Verdict.SKIPPED, Verdict.SKIPPED, Verdict.ROLL_BACK]
    assert g.streak_start == 10
    plan = g.plan_rollback([4, 8, 10, 12])
    assert plan.target_step == 8 and plan.set_aside == [10, 12]  # a checkpoint at the streak's start is bad too
    g.check_rollback_allowed(max_rollbacks=1, checkpoint_steps=[4, 8])
    g.rolled_back()
    assert (g.rollbacks, g.streak, g.streak_start, g.skipped) == (1, 0, None, 3)


def test_no_checkpoint_before_the_streak_rolls_back_to_the_initial_state():
    g = Guard()
    for step in (2, 3):
        g.observe(step, False, max_bad_steps=2)
    plan = g.plan_rollback([5])
    assert plan.target_step == 0 and plan.set_aside == [5]


def test_rollbacks_used_up_stop_the_run_as_diverged():
    g = Guard(rollbacks=2)
    for step in (7, 8):
        g.observe(step, False, max_bad_steps=2)
    with pytest.raises(TrainingStopped) as stopped:
        g.check_rollback_allowed(max_rollbacks=2, checkpoint_steps=[5, 6])
    assert stopped.value.exit_code == EXIT_DIVERGED
    assert "2 non-finite steps in a row from step 7" in str(stopped.value) and "up to step 6" in str(stopped.value)
    with pytest.raises(TrainingStopped, match="no checkpoint had been saved"):  # never "up to step 0"
        g.check_rollback_allowed(max_rollbacks=2, checkpoint_steps=[])


def test_the_guard_state_round_trips_through_a_checkpoint_record():
    g = Guard()
    g.observe(3, False, max_bad_steps=5)
    assert Guard(**g.state()) == g


def test_cadence_decides_evaluation_checkpoints_and_logs_in_one_place():
    c = Cadence(steps=10, eval_every=4, checkpoint_every=3, log_every=5)
    assert [s for s in range(1, 11) if c.eval_due(s)] == [4, 8, 10]  # the last step always
    assert [s for s in range(1, 11) if c.checkpoint_due(s)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if c.log_due(s)] == [5, 10]
    assert [s for s in range(1, 11) if c.boundary(s)] == [3, 4, 6, 8, 9, 10]
