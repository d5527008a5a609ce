"""Collective step decisions: a NaN or a stop signal on one rank changes every rank's step."""
from __future__ import annotations

import math
import os
import signal

from pfc.distributed.fault import StepGuard, StopSignals
from tests.distributed import run_ranks


def guard_decisions(rank: int, world_size: int) -> list:
    guard = StepGuard(max_consecutive_skips=3)
    losses = [1.0, math.nan, 2.0, math.inf, math.nan, math.nan, 1.0]
    decisions = []
    for step, loss in enumerate(losses):
        mine = loss if rank == 1 else 0.5          # only rank 1 sees the bad values
        decisions.append((guard.check(mine, step=step).skip, guard.consecutive))
    stop = StopSignals()
    if rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)       # handled: only sets the flag
    decision = guard.check(0.5, stop.requested, step=len(losses))
    stop.restore()
    return {"decisions": decisions, "stop": (decision.skip, decision.stop, decision.reason),
            "skipped_total": guard.skipped_total, "signal": stop.signal_name}


def test_nan_and_signal_decisions_are_collective():
    results = run_ranks(guard_decisions, 2)
    for result in results:
        assert result["decisions"] == [(False, 0), (True, 1), (False, 0), (True, 1), (True, 2), (True, 3), (False, 0)]
        assert result["skipped_total"] == 4
        assert result["stop"] == (False, True, "step 7: stop requested by a signal")
    assert results[0]["signal"] == "SIGTERM" and results[1]["signal"] is None


def test_consecutive_skips_stop_the_run():
    guard = StepGuard(max_consecutive_skips=2)
    assert not guard.check(float("nan")).stop
    decision = guard.check(float("nan"), step=9)
    assert decision.skip and decision.stop and "2 consecutive non-finite losses" in decision.reason


def errors_agreed(rank: int, world_size: int) -> list:
    from pfc.distributed.agree import agree_on_error

    outcomes = []
    for step in range(3):
        error = ValueError("label 12 outside [0, 10)") if rank == 1 and step == 1 else None
        try:
            agree_on_error(error, f"loading batch {step}")
            outcomes.append("ok")
        except ValueError as exc:   # a ValueError everywhere, since the failing rank's was one
            outcomes.append(str(exc))
    return outcomes


def test_an_error_on_one_rank_is_raised_on_every_rank():
    for outcomes in run_ranks(errors_agreed, 3, timeout=60):
        assert outcomes == ["ok", "loading batch 1 failed on rank 1: ValueError: label 12 outside [0, 10)", "ok"]


def test_a_signal_right_after_a_skipped_step_is_a_stop_not_giving_up():
    guard = StepGuard(max_consecutive_skips=3)
    decision = guard.check(float("nan"), stop_requested=True, step=4)
    assert decision.skip and decision.stop and "stop requested by a signal" in decision.reason
    assert guard.consecutive == 1 and not guard.gave_up        # the trainer exits 0, not NonFiniteLossError
    guard.check(float("nan"))
    assert guard.check(float("nan")).stop and guard.gave_up


def rank_zero_runs(rank: int, world_size: int) -> list:
    from pfc.distributed.agree import run_on_rank_zero

    calls = []
    value = run_on_rank_zero(lambda: calls.append(rank) or {"listed": [1, 2]}, "listing")
    try:
        run_on_rank_zero(lambda: (_ for _ in ()).throw(ValueError("folder gone")), "listing checkpoints")
        error = None
    except ValueError as exc:
        error = str(exc)
    return [value, calls, error]


def test_rank_zero_decides_for_every_rank_and_its_error_is_raised_everywhere():
    results = run_ranks(rank_zero_runs, 3, timeout=60)
    assert [calls for _, calls, _ in results] == [[0], [], []]          # only rank 0 ran it
    for value, _, error in results:
        assert value == {"listed": [1, 2]}
        assert error == "listing checkpoints failed on rank 0: ValueError: folder gone"
