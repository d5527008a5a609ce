"""Collective step decisions: a NaN or a stop signal on one rank changes every rank's step."""
from __future__ import annotations

import math
import os
import signal

import pytest

from pfc.distributed.fault import StepGuard, StopSignals
from tests.distributed import run_ranks


def guard_decisions(rank: int, world_size: int) -> dict:
    """Both review periods in one process group (each spawn costs seconds)."""
    return {review_every: guard_run(rank, review_every) for review_every in (1, 3)}


def guard_run(rank: int, review_every: int) -> dict:
    """Steps whose loss only rank 1 sees as non-finite: the mask, the same on both ranks each step,
    and what the host learns at the reviews (every ``review_every`` steps, as at log steps)."""
    import torch

    guard = StepGuard(max_consecutive_skips=3)
    losses = [1.0, math.nan, 2.0, math.inf, math.nan, math.nan, 1.0]
    masks, reviews = [], []
    for step, loss in enumerate(losses):
        mine = loss if rank == 1 else 0.5          # only rank 1 sees the bad values
        masks.append(guard.found_inf(torch.tensor(mine)).item())
        if (step + 1) % review_every == 0:
            decision = guard.review(step + 1)
            reviews.append((step + 1, decision.stop, guard.consecutive, guard.skipped_total))
    stop = StopSignals()
    if rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)       # handled: only sets the flag
    decision = guard.control(stop.requested)
    stop.restore()
    return {"masks": masks, "reviews": reviews, "stop": (decision.stop, decision.reason),
            "gave_up": guard.gave_up, "signal": stop.signal_name}


@pytest.fixture(scope="module")
def guard_results():
    return run_ranks(guard_decisions, 2)


@pytest.fixture(scope="module")
def error_results():
    return run_ranks(errors_agreed, 3, timeout=60)


def test_nan_and_signal_decisions_are_collective(guard_results):
    results = [both[1] for both in guard_results]
    for result in results:
        assert result["masks"] == [0, 1, 0, 1, 1, 1, 0]                 # every rank skips the same steps
        assert [review[1:] for review in result["reviews"]] == [
            (False, 0, 0), (False, 1, 1), (False, 0, 1), (False, 1, 2), (False, 2, 3), (True, 3, 4), (True, 0, 4)]
        assert result["gave_up"]
        assert result["stop"] == (True, "stop requested by a signal")     # the step is the caller's to say, once
    assert results[0]["signal"] == "SIGTERM" and results[1]["signal"] is None


def test_the_host_learns_of_skips_at_the_next_review(guard_results):
    """Reviewed every 3 steps (log_every=3): the masks are the same; the run of 3 skips in a row
    (steps 4-6) is found at the review of step 6, and a review after a finite step still sees it."""
    for result in [both[3] for both in guard_results]:
        assert result["masks"] == [0, 1, 0, 1, 1, 1, 0]
        assert result["reviews"] == [(3, False, 0, 1), (6, True, 3, 4)]
    guard = StepGuard(max_consecutive_skips=2)
    import torch

    for loss in (math.nan, math.nan, 1.0):
        guard.found_inf(torch.tensor(loss))
    decision = guard.review(3)                     # the run is over, but it happened
    assert decision.stop and "2 consecutive non-finite losses (limit 2)" in decision.reason and guard.gave_up


def test_consecutive_skips_stop_the_run():
    import torch

    guard = StepGuard(max_consecutive_skips=2)
    guard.found_inf(torch.tensor(math.nan))
    assert not guard.review().stop
    guard.found_inf(torch.tensor(1.0), torch.tensor(False))   # a finite loss, but a non-finite gradient
    decision = guard.review(9)
    assert decision.stop and decision.reason == "2 consecutive non-finite losses (limit 2)"


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
    return {"outcomes": outcomes, "control": control_flags(rank)}


def test_an_error_on_one_rank_is_raised_on_every_rank(error_results):
    for result in error_results:
        assert result["outcomes"] == ["ok", "loading batch 1 failed on rank 1: ValueError: label 12 outside [0, 10)",
                                      "ok"]


def test_a_signal_right_after_a_skipped_step_is_a_stop_not_giving_up():
    import torch

    guard = StepGuard(max_consecutive_skips=3)
    guard.found_inf(torch.tensor(math.nan))
    decision = guard.control(stop_requested=True)
    assert decision.stop and "stop requested by a signal" in decision.reason
    assert not guard.review().stop and guard.consecutive == 1 and not guard.gave_up   # exit 0, no NonFiniteLossError
    guard.found_inf(torch.tensor(math.nan))
    guard.found_inf(torch.tensor(math.nan))
    assert guard.review().stop and guard.gave_up


def control_flags(rank: int) -> dict:
    """The host's flags in one all-reduce: each rank's own, combined; a loading error raised everywhere."""
    from pfc.host_syncs import HostSyncCounter

    guard = StepGuard()
    decisions = []
    with HostSyncCounter() as counter:
        for step in range(3):
            decision = guard.control(stop_requested=rank == 1 and step == 1, save_due=rank == 0 and step == 2)
            decisions.append((decision.stop, decision.save))
    try:
        guard.control(error=ValueError("label 12 outside [0, 10)") if rank == 2 else None, what="loading batch 3")
        error = None
    except ValueError as exc:
        error = str(exc)
    return {"decisions": decisions, "error": error, "syncs": counter.count}


def test_control_flags_are_combined_on_the_host_and_a_loading_error_is_raised_everywhere(error_results):
    for result in [both["control"] for both in error_results]:
        assert result["decisions"] == [(False, False), (True, False), (False, True)]
        assert result["error"] == "loading batch 3 failed on rank 2: ValueError: label 12 outside [0, 10)"
        assert result["syncs"] == 0                # a host collective: no device value read


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
