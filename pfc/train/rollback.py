"""A skipped step leaves the model as it was: what a step changes before the guard decides, undone.

    rollback = StepRollback(model, head, head_optimizer, runner.head_update_in_backward)
    rollback.begin()                 # before the step's micro-batches
    ...                              # forward + backward of every micro-batch
    found_inf = guard.found_inf(loss, ..., rollback.buffers_finite())
    applied = runner.step(head_optimizer, found_inf)     # masked: a skipped step updates nothing
    rollback.restore(skip=~applied)  # on the device: what the step changed is put back where skipped
    rollback.close()                 # at the end of the run (removes the head's forward hook)

A skipped step's optimizer steps are masked (``found_inf``), so the weights and the optimizer
states stay. Two things change anyway, before the decision can be taken:

* the backbone's buffers: the forward runs in training mode, so BatchNorm's running mean and
  variance and ``num_batches_tracked`` move (to NaN after a non-finite forward, and every later
  evaluation is then at chance). They are copied at :meth:`begin` (all buffers: 0.2 MB for
  iresnet50) and copied back by :meth:`restore`.
* with the head's update inside its backward (``runner.head_update_in_backward``): the head's
  loss is identical on every rank, so a non-finite loss updates no center anywhere; but a NaN
  that appears only in some rank's backbone gradient (the loss finite) is seen by the guard only
  after the head has updated its sampled rows. The sampled rows of the centers and of their
  momentum are therefore copied after each head forward (a forward hook: the rows are known only
  then) and written back by :meth:`restore`. That is one gather of the rows the update itself
  reads and writes, ``2 · S_r · D`` values per step (S_r sampled rows on the rank).

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
40 ms, about 11 % of the head's own step there (367 ms), which a backbone step dwarfs.

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
        self._rows: torch.Tensor | None = None   # the sampled rows snapshotted (None: all rows)
        self._saved_rows: dict[str, torch.Tensor] = {}   # "weight", "momentum" → [capacity, D] scratch
        self._have_rows = False
        self._hook = head.register_forward_hook(self._snapshot_rows) if head_update_in_backward else None

    def buffers_finite(self) -> torch.Tensor | None:
        """Whether the backbone's buffers are finite after the forward (a finite loss can come with
        an inf running variance: training-mode BatchNorm normalises with the batch's statistics):
        a 0-d bool device tensor, None without floating-point buffers; no host synchronisation."""
        return all_finite(self.buffers)

    @torch.no_grad()
    def begin(self) -> None:
        """Before the step's micro-batches: copy the backbone's buffers."""
        for saved, buffer in zip(self.saved_buffers, self.buffers):
            saved.copy_(buffer)
        self._have_rows = False

    def _live_rows(self) -> dict[str, torch.Tensor]:
        weight = self.head.weight
        live = {"weight": weight}
        momentum = self.head_optimizer.state.get(weight, {}).get("momentum_buffer")
        if momentum is not None:
            live["momentum"] = momentum
        return live

    @staticmethod
    def _scratch(blocks: dict[str, torch.Tensor], name: str, count: int, like: torch.Tensor) -> torch.Tensor:
        """A reused ``[≥ count, D]`` block of ``like``'s type and device (grown when too small)."""
        block = blocks.get(name)
        if block is None or block.shape[0] < count or block.dtype != like.dtype:
            block = blocks[name] = torch.empty((count, *like.shape[1:]), dtype=like.dtype, device=like.device)
        return block[:count]

    @torch.no_grad()
    def _snapshot_rows(self, head: nn.Module, inputs, output) -> None:
        """Forward hook of the head (update in backward only): copy the rows its backward will update."""
        if not head.training:
            return
        index = head.last_sample[0]
        self._rows = index
        for name, live in self._live_rows().items():
            count = live.shape[0] if index is None else index.numel()
            scratch = self._scratch(self._saved_rows, name, count, live)
            if index is None:
                scratch.copy_(live)
            else:
                torch.index_select(live, 0, index, out=scratch)
        self._have_rows = True

    @torch.no_grad()
    def restore(self, skip: torch.Tensor | bool = True) -> None:
        """Put back what :meth:`begin` and the head's forward hook copied where ``skip`` (a 0-d
        bool tensor, decided on the device; or a Python bool) is true; a no-op where it is false."""
        if not isinstance(skip, torch.Tensor):
            if skip:
                self._write_back(None)
            self._have_rows = False
            return
        self._write_back(skip)

    def _write_back(self, skip: torch.Tensor | None) -> None:
        """``current = where(skip, saved, current)`` for the buffers and the snapshotted rows
        (``skip`` None: ``current = saved``)."""
        for saved, buffer in zip(self.saved_buffers, self.buffers):
            buffer.copy_(saved if skip is None else torch.where(skip.to(buffer.device), saved, buffer))
        if not self._have_rows:
            return
        rows = self._rows
        for name, live in self._live_rows().items():
            saved = self._saved_rows[name][:live.shape[0] if rows is None else rows.numel()]
            if rows is None:  # every row was updated: one pass over the shard
                live.copy_(saved if skip is None else torch.where(skip.to(live.device), saved, live))
            elif skip is None:
                live.index_copy_(0, rows, saved)
            elif rows.numel():
                self._masked_row_write(live, rows, saved, skip.to(live.device))
        self._have_rows = False

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
        """Remove the head's forward hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
