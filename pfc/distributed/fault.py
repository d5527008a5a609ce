"""Fault handling for the training loop, decided collectively: stop signals, non-finite losses, saves.

    stop = StopSignals()                        # SIGTERM / SIGINT only set a flag
    guard = StepGuard(max_consecutive_skips=5)
    ...                                         # forward + backward of one step
    decision = guard.check(loss_value, stop.requested, step_finite=runner.gradients_finite(),
                           save_due=clock_says_so and rank == 0)
    if decision.skip: zero the gradients instead of stepping (one all-reduce, same answer everywhere)
    if decision.save: write a checkpoint after this step (every rank, the same step)
    if decision.stop: save a checkpoint and leave the loop (decision.reason says why)

A signal, a NaN or a clock seen by one rank must change what *every* rank does at the same step,
or the next collective hangs; hence the single all-reduce of ``[non_finite, stop_requested,
save_due]`` per step. "Non-finite" covers the loss and, when the caller passes ``step_finite``,
what else the step computed on this rank (its gradients, the BatchNorm statistics its forward
moved): a NaN that appears only in one rank's backward (the loss finite everywhere) would
otherwise be averaged into every rank's weights.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pfc.distributed.collectives import get_world_size, is_distributed

logger = logging.getLogger(__name__)


def init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """``dist.init_process_group`` from torchrun's environment, safe across torchrun restarts.

    After a restart (``--max-restarts``), torchrun's workers reuse the agent's TCPStore, where the
    previous attempt's keys (e.g. gloo's peer addresses) are still present; a new worker may read
    a dead peer's address and fail with "connectFullMesh … Connection refused". The group is
    therefore created on a store namespaced by ``TORCHELASTIC_RESTART_COUNT``. Outside torchrun
    (no restart count) this is plain ``init_process_group(backend)`` with the env:// method.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=not agent_store)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pfc/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag polled at step boundaries (previous handlers restored
    by :meth:`restore`). A second SIGINT while a stop is pending raises KeyboardInterrupt, so an
    impatient Ctrl-C still ends the process. A repeated SIGTERM changes nothing: schedulers often
    deliver it twice (SLURM may signal every process of a step, and torchrun forwards its copy),
    and their only follow-up is SIGKILL."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread; nothing is caught then
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal_name == name:
            raise KeyboardInterrupt(f"second {name}")
        self.signal_name = self.signal_name or name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


@dataclass(frozen=True)
class StepDecision:
    """What every rank does with this step: ``skip`` its update; ``stop`` after it (``reason``);
    ``save`` a checkpoint after it (a stop saves regardless)."""

    skip: bool
    stop: bool
    reason: str = ""
    save: bool = False


class StepGuard:
    """Collective per-step check of the loss, of pending stop requests and of the time to save.

    ``check`` all-reduces (MAX) three flags: "my loss (or step) is not finite", "a stop was
    requested here" and "a checkpoint is due". A non-finite loss or gradient on any rank skips
    the step on every rank and logs a warning; after ``max_consecutive_skips`` skipped steps in a
    row (0: never) the decision is to stop. ``skipped_total`` and ``consecutive`` count the
    skips. The save flag lets one rank's clock decide for all (clocks differ between ranks and
    nodes: pass it from one rank only), without a collective of its own.
    """

    def __init__(self, max_consecutive_skips: int = 5, group=None):
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips} must be >= 0")
        self.max_consecutive_skips = max_consecutive_skips
        self.group = group
        self.consecutive = 0
        self.skipped_total = 0

    @property
    def gave_up(self) -> bool:
        """True once ``max_consecutive_skips`` non-finite steps in a row made the guard stop the
        run (a stop for a signal after a skipped step is not giving up)."""
        return bool(self.max_consecutive_skips) and self.consecutive >= self.max_consecutive_skips

    def check(self, loss: float | torch.Tensor, stop_requested: bool = False, step: int | None = None,
              step_finite: bool = True, save_due: bool = False) -> StepDecision:
        """Decide this step on every rank alike (collective: every rank calls it once per step);
        ``step_finite``: False when something else this rank computed in the step (gradients,
        statistics) holds inf/NaN, its loss being finite or not; ``save`` is True on every rank
        when ``save_due`` is True on any."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        bad = not (math.isfinite(value) and step_finite)
        flags = torch.tensor([1.0 if bad else 0.0, float(stop_requested), float(save_due)])
        if is_distributed() and get_world_size(self.group) > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        non_finite, stop, save = bool(flags[0] > 0), bool(flags[1] > 0), bool(flags[2] > 0)
        where = f"step {step}: " if step is not None else ""
        if non_finite:
            self.consecutive += 1
            self.skipped_total += 1
            logger.warning("%snon-finite loss or gradient on at least one rank; skipping the update "
                           "(%d in a row, %d in total)", where, self.consecutive, self.skipped_total)
        else:
            self.consecutive = 0
        if non_finite and self.max_consecutive_skips and self.consecutive >= self.max_consecutive_skips:
            return StepDecision(True, True, f"{where}{self.consecutive} consecutive non-finite losses "
                                            f"(limit {self.max_consecutive_skips}); stopping", save)
        if stop:
            return StepDecision(non_finite, True, f"{where}stop requested by a signal", save)
        return StepDecision(non_finite, False, "", save)
