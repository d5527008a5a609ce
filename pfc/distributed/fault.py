"""Fault handling for the training loop: stop signals, saves and data errors decided on the host,
non-finite steps decided on the device.

    stop = StopSignals()                        # SIGTERM / SIGINT only set a flag
    guard = StepGuard(max_consecutive_skips=5)  # collective (makes the control group once)
    for each step:
        load the step's batches (on the host; a failure is kept as ``error``)
        decision = guard.control(stop.requested, save_due=clock_says_so and rank == 0, error=error)
        ...                                     # forward + backward
        found_inf = guard.found_inf(loss, runner.gradients_finite(), rollback.buffers_finite())
        applied = runner.step(head_optimizer, found_inf)   # masked on the device
        rollback.restore(~applied)              # a skipped step changes nothing
        if log step (or a save, or a stop):
            review = guard.review(step)         # the host learns of the skips (one read)
            if review.stop: decision = review   # K skipped in a row: give up (after a checkpoint)
        if decision.save: write a checkpoint after this step (every rank, the same step)
        if decision.stop: save a checkpoint and leave the loop (decision.reason says why)

A signal, a NaN, a clock or a bad sample seen by one rank must change what *every* rank does at
the same step, or the next collective hangs. The work is split by who must act:

* the host's flags (a stop was requested, a checkpoint is due by rank 0's clock, loading this
  step's batches failed) are combined in one MAX all-reduce per step over a CPU (gloo) group,
  :func:`control_group` (:meth:`StepGuard.control`, through
  :func:`pfc.distributed.agree.agree_on_error`): a host collective, no device synchronisation;
  a loading error raises the same message on every rank;
* "this step is not finite" (the loss; when the caller passes them, this rank's backbone gradient
  norm and BatchNorm statistics: a NaN that appears only in one rank's backward would otherwise
  be averaged into every rank's weights) is a 0-d tensor all-reduced (MAX) on the device group
  (:meth:`StepGuard.found_inf`) and applied as a mask, as torch's GradScaler applies its
  ``found_inf``; counters of skipped steps stay on the device and the host reads them at log
  steps (:meth:`StepGuard.review`), which warns and, after ``max_consecutive_skips`` skipped
  steps in a row, stops the run. The host thus learns of skips up to ``log_every`` steps late;
  nothing skipped was applied in the meantime.

A steady-state step therefore makes no host synchronisation here: one host all-reduce and one
device all-reduce.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pfc.distributed.agree import agree_on_error
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


_control = {"world": None, "group": None}


def control_group():
    """The process group for the host's control flags: the default group when it is gloo (CPU
    tensors, no device involved), else a gloo group over the same ranks, made once per default
    group (collective on that first call: every rank makes it at the same point). None when not
    distributed (the default group's ``None``)."""
    if not is_distributed() or dist.get_backend() == "gloo":
        return None
    if _control["world"] is not dist.group.WORLD:
        _control["group"] = dist.new_group(backend="gloo")
        _control["world"] = dist.group.WORLD
    return _control["group"]


@dataclass(frozen=True)
class StepDecision:
    """What every rank does after this step: ``stop`` (``reason`` says why); ``save`` a checkpoint
    (a stop saves regardless)."""

    stop: bool = False
    reason: str = ""
    save: bool = False


class StepGuard:
    """One decision per step on every rank alike: the host's flags on the host, the step's
    finiteness on the device (see the module docstring for the split and the use).

    ``control`` (host, every step, before the step's first collective) all-reduces "a stop was
    requested here", "a checkpoint is due" and "loading failed here" over ``control_group``.
    ``found_inf`` (device, every step, before the update) returns the step's skip mask, the same
    on every rank, and counts on the device. ``review`` (host, at log steps) reads the counts:
    a warning for the steps skipped since the last review, and a stop once ``max_consecutive_skips``
    (0: never) steps in a row were skipped. ``skipped_total`` and ``consecutive`` are the counts
    as of the last review; the save flag lets one rank's clock decide for all (clocks differ
    between ranks and nodes: pass it from one rank only).
    """

    def __init__(self, max_consecutive_skips: int = 5, group=None, control=None):
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips} must be >= 0")
        self.max_consecutive_skips = max_consecutive_skips
        self.group = group
        self.control_group = control if control is not None else control_group()
        self.consecutive = 0
        self.skipped_total = 0
        self.gave_up = False  # True once the skips stopped the run (a stop for a signal after a skip is not)
        # on the device: [consecutive skips now, longest run since the last review, skipped in total]
        self._counts: torch.Tensor | None = None

    def control(self, stop_requested: bool = False, save_due: bool = False, error: BaseException | None = None,
                what: str = "loading the step's batches") -> StepDecision:
        """Collective over the control group (every rank calls it once per step, before any other
        collective of the step): ``error`` on any rank is raised on every rank as
        ``"{what} failed on rank R: …"``; else a stop requested on any rank stops every rank after
        this step, and ``save_due`` on any rank saves after it. No device is involved. A
        decision's ``reason`` names no step: the caller knows where it stops and says it once."""
        flags = agree_on_error(error, what, self.control_group,
                               flags={"stop": int(stop_requested), "save": int(save_due)})
        stop, save = bool(flags["stop"]), bool(flags["save"])
        return StepDecision(stop, "stop requested by a signal" if stop else "", save)

    def found_inf(self, loss: torch.Tensor, *finite: torch.Tensor | bool | None) -> torch.Tensor:
        """Collective on the device group: the step's skip mask, a 0-d float tensor on ``loss``'s
        device, 1.0 when any rank's ``loss`` is not finite or any of its ``finite`` flags (0-d
        bool tensors; None or True: nothing to add) is False, else 0.0; the same on every rank.
        Counts the skip on the device; no host synchronisation."""
        bad = ~torch.isfinite(loss.detach())
        for flag in finite:
            if isinstance(flag, torch.Tensor):
                bad = bad | ~flag.to(bad.device)
            elif flag is False:
                bad = torch.ones_like(bad)
        found = bad.to(torch.float32)
        if is_distributed() and get_world_size(self.group) > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group)
        if self._counts is None:
            self._counts = torch.zeros(3, dtype=torch.float32, device=found.device)
        consecutive = (self._counts[0] + 1) * found  # back to 0 on a finite step
        self._counts = torch.stack([consecutive, torch.maximum(self._counts[1], consecutive),
                                    self._counts[2] + found])
        return found

    def review(self, step: int | None = None) -> StepDecision:
        """Read the counts (one host synchronisation, the same values on every rank: no collective):
        warn about the steps skipped since the last review (the warning names ``step``) and decide
        whether to give up. Call it at log steps, and before a save (so that the saved count is
        exact)."""
        if self._counts is None:
            return StepDecision()
        consecutive, longest, total = (int(value) for value in self._counts.tolist())
        skipped, self.consecutive, self.skipped_total = total - self.skipped_total, consecutive, total
        self._counts[1] = consecutive
        where = f"step {step}: " if step is not None else ""
        if skipped:
            logger.warning("%snon-finite loss or gradient on at least one rank; %d update(s) skipped since "
                           "the last log (longest run %d, %d in a row now, %d in total)", where, skipped,
                           longest, consecutive, total)
        if self.max_consecutive_skips and longest >= self.max_consecutive_skips:
            self.gave_up = True
            return StepDecision(True, f"{longest} consecutive non-finite losses (limit {self.max_consecutive_skips})")
        return StepDecision()
