"""A skipped step leaves the model as it was: what a step changes before the guard decides, undone.

    rollback = StepRollback(model, head, head_optimizer, runner.head_update_in_backward)
    rollback.begin()                 # before the step's micro-batches
    ...                              # forward + backward of every micro-batch
    found_inf = guard.found_inf(loss, ..., rollback.buffers_finite())
    applied = runner.step(head_optimizer, found_inf)     # masked: a skipped step updates nothing
    rollback.restore(skip=~applied)  # on the device: what the step changed is put back where skipped
    rollback.close()                 # at the end of the run (the head's update stops keeping old rows)

A skipped step's optimizer steps are masked (``found_inf``), so the weights and the optimizer
states stay. Two things change anyway, before the decision can be taken:

* the backbone's buffers: the forward runs in training mode, so BatchNorm's running mean and
  variance and ``num_batches_tracked`` move (to NaN after a non-finite forward, and every later
  evaluation is then at chance). They are copied at :meth:`begin` (all buffers: 0.2 MB for
  iresnet50) and copied back by :meth:`restore`.
* with the head's update inside its backward (``runner.head_update_in_backward``): the head's
  loss is identical on every rank, so a non-finite loss updates no center anywhere; but a NaN
  that appears only in some rank's backbone gradient (the loss finite) is seen by the guard only
  after the head has updated its sampled rows. The values the sampled rows of the centers and of
  their optimizer state (SGD's momentum; AdamW's two moments and per-row step counts) had before
  the update are therefore kept and written back by :meth:`restore`:
  the update itself writes them (:meth:`pfc.head.row_optimizer.SparseRowOptimizer.keep_old_rows`) from the
  rows it has just read, ``2 · S_r · D`` values written per step with SGD (``3 · S_r · D + S_r`` with
  AdamW; S_r sampled rows on the rank)
  and no pass of its own (the Triton update writes them from registers; the torch one copies
  each chunk it gathered, in cache).

:meth:`restore` decides on the device, without a host synchronisation: ``skip`` is a 0-d bool
tensor, and every snapshotted value becomes ``where(skip, saved, current)``. A step that is not
skipped therefore costs a restore too: the buffers (small) and, with the update in the backward,
one scatter of the saved rows, which a kept step aims at a single row (see
:meth:`StepRollback._masked_row_write`), so that it neither reads the sampled rows again nor
writes them. A Python bool ``skip`` (an engine that decides on the host, DeepSpeed) restores only
when True.

Measured with ``python bench/step_rollback.py`` on one CPU thread: the buffer copy and check cost
0.2 % / 0.03 % of a tiny / iresnet50 step (batch 16), the gradient norm of the guard 1.5 % /
0.3 % (reused by clipping); the row copy at 1M classes on 2 ranks (50k of 500k rows sampled)
40 ms, about 11 % of the head's own step there (367 ms), when it was a gather of its own after
the forward (before the update wrote the old rows itself).

The LR schedules are not the model: the loop steps them on a skipped step too (the schedule is a
function of the step index, which moves on).
"""
from __future__ import annotations

import torch
from torch import nn

from pfc.train.finite import all_finite


class StepRollback:
    """Snapshot of the state a step changes before its update is decided (see the module docstring)."""

    def __init__(self, model: nn.Module, head: nn.Module, head_optimizer: torch.optim.Optimizer,
                 head_update_in_backward: bool):
        self.buffers = [buffer for buffer in model.buffers()]
        self.saved_buffers = [torch.empty_like(buffer) for buffer in self.buffers]
        self.head = head
        self.head_optimizer = head_optimizer
        # the rows the update in the backward changed and their old values, written by the update
        self._old_rows = head_optimizer.keep_old_rows() if head_update_in_backward else None

    def buffers_finite(self) -> torch.Tensor | None:
        """Whether the backbone's buffers are finite after the forward (a finite loss can come with
        an inf running variance: training-mode BatchNorm normalises with the batch's statistics):
        a 0-d bool device tensor, None without floating-point buffers; no host synchronisation."""
        return all_finite(self.buffers)

    @torch.no_grad()
    def begin(self) -> None:
        """Before the step's micro-batches: copy the backbone's buffers (and forget the old rows of
        an earlier step)."""
        for saved, buffer in zip(self.saved_buffers, self.buffers):
            saved.copy_(buffer)
        if self._old_rows is not None:
            self._old_rows.filled = False

    def _live_rows(self) -> dict[str, torch.Tensor]:
        """The centers and the optimizer's per-row states (SGD's momentum; AdamW's moments and step
        counts), by the names :class:`pfc.head.row_optimizer.OldRows` keeps their old rows under."""
        weight = self.head.weight
        return {"weight": weight, **self.head_optimizer.row_states(weight)}

    @torch.no_grad()
    def restore(self, skip: torch.Tensor | bool = True) -> None:
        """Put back what :meth:`begin` copied and the old rows the head's update kept where ``skip``
        (a 0-d bool tensor, decided on the device; or a Python bool) is true; a no-op where it is false."""
        if not isinstance(skip, torch.Tensor):
            if skip:
                self._write_back(None)
            if self._old_rows is not None:
                self._old_rows.filled = False
            return
        self._write_back(skip)

    def _write_back(self, skip: torch.Tensor | None) -> None:
        """``current = where(skip, saved, current)`` for the buffers and the snapshotted rows
        (``skip`` None: ``current = saved``)."""
        for saved, buffer in zip(self.saved_buffers, self.buffers):
            buffer.copy_(saved if skip is None else torch.where(skip.to(buffer.device), saved, buffer))
        old = self._old_rows
        if old is None or not old.filled:
            return
        rows = old.rows
        for name, live in self._live_rows().items():
            saved = old.weight if name == "weight" else old.states.get(name)
            if saved is None:
                continue
            if rows is None:  # every row was updated: one pass over the shard
                live.copy_(saved if skip is None else torch.where(skip.to(live.device), saved, live))
            elif skip is None:
                live.index_copy_(0, rows, saved)
            elif rows.numel():
                self._masked_row_write(live, rows, saved, skip.to(live.device))
        old.filled = False

    @staticmethod
    def _masked_row_write(live: torch.Tensor, rows: torch.Tensor, saved: torch.Tensor, skip: torch.Tensor) -> None:
        """``live[rows] = saved`` where ``skip``, else leave ``live`` as it is, without reading
        ``live[rows]``: the write goes to ``rows`` when skipping and all to the first of them
        otherwise (index_copy_ of duplicates: one of them lands), whose own value is then put back
        from a one-row copy. One scatter of the saved rows, as the host-decided restore of a
        skipped step; a kept step's writes all hit one row (cache-resident) instead of the shard."""
        first = rows[:1]
        first_now = live.index_select(0, first)   # the update's value of that row (kept if not skipping)
        live.index_copy_(0, torch.where(skip, rows, first.expand_as(rows)), saved)
        live.index_copy_(0, first, torch.where(skip, saved[:1], first_now))

    def close(self) -> None:
        """Stop the head's optimizer writing the old rows."""
        if self._old_rows is not None:
            self.head_optimizer.drop_old_rows()
            self._old_rows = None
