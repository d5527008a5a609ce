"""Row-sparse SGD for the class centers, and the seam through which the head's backward applies it.

Partial FC touches only the sampled rows of the center matrix each step. ``SparseRowSGD``
updates exactly those rows (weights and momentum of every other row stay bit-identical) and
never materialises a dense gradient; its work and memory traffic scale with the sampled rows.
:class:`UpdateInBackward` is what the head's backward calls instead of returning the rows'
gradient (``PartialFC.optimizer(update_in_backward=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pfc.head.scratch import ScratchBlocks
from pfc.torch_private import uncoalesced_rows


class SparseRowSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay, applied row by row to the rows that have a gradient.

    For every row ``j`` present in ``p.grad`` (a sparse COO tensor over rows, or dense = all rows):

        d_j = grad_j + weight_decay · w_j
        v_j = momentum · v_j + d_j           (v starts at 0, as torch.optim.SGD's first step)
        w_j = w_j − lr · v_j

    With a dense gradient this is bit-identical to ``torch.optim.SGD(lr, momentum,
    weight_decay=weight_decay)``. Duplicate rows in an uncoalesced sparse gradient (gradient
    accumulation) are summed first. The momentum buffer is allocated eagerly as
    ``state[p]["momentum_buffer"]`` (dense, same shape as ``p``); ``momentum_dtype`` may store it
    in a narrower type (e.g. ``torch.bfloat16`` halves the optimizer memory; the update is then
    computed in the parameter's dtype and rounded when stored).

    :meth:`update_rows` applies the same update to given rows and their gradient directly: the
    head calls it inside its backward when built with
    ``PartialFC.optimizer(update_in_backward=True)`` (no gradient stored, ``p.grad`` stays None),
    with a bit-identical result.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 momentum_dtype: torch.dtype | None = None, chunk_rows: int = 1024):
        if not lr >= 0:
            raise ValueError(f"learning rate {lr} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum {momentum} outside [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows {chunk_rows} must be >= 1")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.momentum_dtype = momentum_dtype
        self.chunk_rows = chunk_rows
        self._scratch = ScratchBlocks(min_rows=chunk_rows)
        for group in self.param_groups:
            for param in group["params"]:
                if group["momentum"]:
                    self.state[param]["momentum_buffer"] = torch.zeros_like(
                        param, dtype=momentum_dtype or param.dtype, memory_format=torch.contiguous_format)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.momentum_dtype is not None:  # the base class casts state to the parameter dtype
            for state in self.state.values():
                if "momentum_buffer" in state:
                    state["momentum_buffer"] = state["momentum_buffer"].to(self.momentum_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._update(param)
        return loss

    def _update(self, param):
        rows, values = _row_gradient(param.grad)
        self.update_rows(param, slice(0, values.shape[0]) if rows is None else rows, values)

    @torch.no_grad()
    def update_rows(self, param: torch.Tensor, rows: slice | torch.Tensor, grad: torch.Tensor,
                    weight_rows: torch.Tensor | None = None) -> None:
        """Apply the update to some rows of ``param`` given their gradient ``grad [n, D]``.

        ``rows`` is a slice (the rows are updated in place) or a LongTensor of distinct row ids;
        then ``weight_rows``, when given, must hold ``param[rows]`` (it is overwritten with the
        new values, saving a gather), and the new rows and momentum rows are written back. The
        arithmetic is :meth:`step`'s, so the result is bit-identical to a gradient + ``step()``.
        """
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        buffer = self.state[param].get("momentum_buffer")
        if isinstance(rows, slice):
            first, last, _ = rows.indices(param.shape[0])
            for start in range(first, last, self.chunk_rows):
                stop = min(start + self.chunk_rows, last)
                self._update_rows(param[start:stop], None if buffer is None else buffer[start:stop],
                                  grad[start - first:stop - first], group)
            return
        for start in range(0, rows.numel(), self.chunk_rows):
            stop = min(start + self.chunk_rows, rows.numel())
            index = rows[start:stop]
            weight_chunk = weight_rows[start:stop] if weight_rows is not None else torch.index_select(
                param, 0, index, out=self._scratch.get("weight", stop - start, param))
            buffer_chunk = None if buffer is None else torch.index_select(
                buffer, 0, index, out=self._scratch.get("momentum", stop - start, buffer))
            self._update_rows(weight_chunk, buffer_chunk, grad[start:stop], group)
            param.index_copy_(0, index, weight_chunk)
            if buffer is not None:
                buffer.index_copy_(0, index, buffer_chunk)

    def _update_rows(self, weight, buffer, grad, group):
        step = grad
        if group["weight_decay"]:
            step = torch.add(grad, weight, alpha=group["weight_decay"], out=self._scratch.get("step", len(grad), grad))
        if buffer is None:
            weight.add_(step, alpha=-group["lr"])
            return
        if buffer.dtype == weight.dtype:
            buffer.mul_(group["momentum"]).add_(step)
            weight.add_(buffer, alpha=-group["lr"])
        else:
            velocity = self._scratch.get("velocity", len(buffer), weight)
            velocity.copy_(buffer).mul_(group["momentum"]).add_(step)
            buffer.copy_(velocity)
            weight.add_(velocity, alpha=-group["lr"])


def _row_gradient(grad: torch.Tensor):
    """``(rows, values)`` of a row gradient: rows ``None`` for a dense one. A sparse gradient whose
    rows are already strictly increasing (the head's, even after autograd drops the coalesced
    flag) is used as it is; anything else is coalesced, summing duplicate rows."""
    if not grad.is_sparse:
        return None, grad
    stored = uncoalesced_rows(grad) if not grad.is_coalesced() and grad.sparse_dim() == 1 else None
    if stored is not None:
        rows, values = stored
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, values
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


@dataclass(frozen=True)
class UpdateInBackward:
    """The update-in-backward seam: the head's backward hands it the gradient of the sampled rows
    ``weight[index]`` (``index`` None: all rows) instead of returning it, and it applies
    :meth:`SparseRowSGD.update_rows`, with a result bit-identical to a backward and ``step()``.

    Made by :meth:`begin` once per backward. When every row's gradient is final as soon as its
    chunk is done, the backward calls :meth:`chunk` for each chunk (``by_chunk``: the rows are
    updated in place while they are still in cache, and no gradient block is needed); otherwise
    (MHE adds to the positive rows after the loop) it fills a gradient block and calls
    :meth:`finish` once. A non-finite loss updates nothing.
    """

    optimizer: SparseRowSGD
    weight: torch.Tensor
    index: torch.Tensor | None
    active: bool     # False after a non-finite loss
    by_chunk: bool

    @classmethod
    def begin(cls, optimizer: SparseRowSGD, weight: torch.Tensor, index: torch.Tensor | None,
              upstream: torch.Tensor, loss: torch.Tensor, by_chunk: bool) -> UpdateInBackward:
        """Check that the loss is backpropagated as it is (``upstream`` gradient 1: the update
        uses the gradient of the loss itself) and decide whether anything is updated."""
        if float(upstream) != 1.0:
            raise ValueError(f"the head's optimizer updates the centers in the backward, which needs the "
                             f"head's loss backpropagated as it is (upstream gradient 1, got {float(upstream):g}); "
                             "for loss scaling or gradient accumulation use head.optimizer(update_in_backward=False)")
        active = bool(torch.isfinite(loss))
        return cls(optimizer, weight, index, active, by_chunk and active)

    def chunk(self, start: int, stop: int, grad_rows: torch.Tensor, rows: torch.Tensor) -> None:
        """Update sampled rows ``[start, stop)`` given their gradient; ``rows`` holds their current
        values (``weight[index[start:stop]]``, overwritten; a view of ``weight`` when index is None)."""
        if not self.by_chunk:
            return
        if self.index is None:
            self.optimizer.update_rows(self.weight, slice(start, stop), grad_rows)
        else:
            self.optimizer.update_rows(self.weight, self.index[start:stop], grad_rows, weight_rows=rows)

    def finish(self, grad_values: torch.Tensor) -> None:
        """Update all sampled rows given their gradient ``[S, D]`` (when not done chunk by chunk)."""
        if self.active and not self.by_chunk:
            rows = slice(0, grad_values.shape[0]) if self.index is None else self.index
            self.optimizer.update_rows(self.weight, rows, grad_values)
