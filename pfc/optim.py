"""Row-sparse SGD for the class centers.

Partial FC touches only the sampled rows of the center matrix each step. ``SparseRowSGD``
updates exactly those rows (weights and momentum of every other row stay bit-identical) and
never materialises a dense gradient; its work and memory traffic scale with the sampled rows.
"""
from __future__ import annotations

import torch


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
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 momentum_dtype: torch.dtype | None = None, chunk_rows: int = 4096):
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
                self._update(param, group)
        return loss

    def _update(self, param, group):
        grad = param.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        else:
            rows, values = None, grad
        buffer = self.state[param].get("momentum_buffer")
        num_rows = values.shape[0]
        for start in range(0, num_rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, num_rows)
            if rows is None:  # dense: update views in place
                self._update_rows(param[start:stop], None if buffer is None else buffer[start:stop],
                                  values[start:stop], group)
                continue
            index = rows[start:stop]
            weight_rows = param.index_select(0, index)
            buffer_rows = None if buffer is None else buffer.index_select(0, index)
            self._update_rows(weight_rows, buffer_rows, values[start:stop], group)
            param.index_copy_(0, index, weight_rows)
            if buffer is not None:
                buffer.index_copy_(0, index, buffer_rows)

    @staticmethod
    def _update_rows(weight, buffer, grad, group):
        step = grad.add(weight, alpha=group["weight_decay"]) if group["weight_decay"] else grad
        if buffer is None:
            weight.add_(step, alpha=-group["lr"])
            return
        if buffer.dtype == weight.dtype:
            buffer.mul_(group["momentum"]).add_(step)
            weight.add_(buffer, alpha=-group["lr"])
        else:
            velocity = buffer.to(weight.dtype).mul_(group["momentum"]).add_(step)
            buffer.copy_(velocity)
            weight.add_(velocity, alpha=-group["lr"])
