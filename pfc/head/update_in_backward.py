"""The update-in-backward seam: the head's backward applies its row-sparse optimizer
(:class:`pfc.head.optim.SparseRowSGD`, :class:`pfc.head.adamw.SparseRowAdamW`) to the sampled
rows chunk by chunk instead of returning their gradient
(``PartialFC.optimizer(update_in_backward=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pfc.head.row_optimizer import RowUpdate, SparseRowOptimizer


@dataclass(frozen=True)
class UpdateInBackward:
    """The update-in-backward seam: the head's backward hands it the gradient of the sampled rows
    ``weight[index]`` (``index`` None: all rows) instead of returning it, and it applies
    :meth:`SparseRowSGD.update_rows`, with a result bit-identical to a backward and ``step()`` (for
    D a multiple of 16, as the class docstring says). It updates the head's chunks whole (the rows
    are in cache), so with narrow storage the seeded rounding draws per head chunk.

    Made by :meth:`begin` once per backward (one update of the optimizer's counter). When every
    row's gradient is final as soon as its chunk is done, the backward calls :meth:`chunk` for
    each chunk (``by_chunk``: the rows are updated in place while they are still in cache, and
    no gradient block is needed); otherwise (MHE adds to the positive rows after the loop) it
    fills a gradient block and calls :meth:`finish` once. A non-finite loss (or the optimizer's
    ``found_inf``) updates nothing, decided on the device: no host sync. When the optimizer keeps
    the old rows (:meth:`SparseRowOptimizer.keep_old_rows`), the update writes them in the same pass
    (``old``).
    """

    optimizer: SparseRowOptimizer
    weight: torch.Tensor
    index: torch.Tensor | None
    update: RowUpdate
    by_chunk: bool
    old: tuple[torch.Tensor | None, ...] | None = None

    @classmethod
    def begin(cls, optimizer: SparseRowOptimizer, weight: torch.Tensor, index: torch.Tensor | None,
              upstream: torch.Tensor, loss: torch.Tensor, by_chunk: bool,
              check_upstream: bool = True) -> UpdateInBackward:
        """Start the update of this backward. ``check_upstream``: check on the host that the loss
        is backpropagated as it is (``upstream`` gradient 1: the update uses the gradient of the
        loss itself); ValueError otherwise. The rows are left unchanged where ``loss`` is not
        finite (a device mask, ``skip = ~isfinite(loss)``)."""
        if check_upstream and float(upstream) != 1.0:
            raise ValueError(f"the head's optimizer updates the centers in the backward, which needs the "
                             f"head's loss backpropagated as it is (upstream gradient 1, got {float(upstream):g}); "
                             "for loss scaling or gradient accumulation use head.optimizer(update_in_backward=False)")
        number = optimizer.updates
        optimizer.updates += 1
        update = optimizer.start_update(weight, number, skip=~torch.isfinite(loss))
        old = None if optimizer.old_rows is None else optimizer.old_rows.prepare(weight, update.states, index)
        return cls(optimizer, weight, index, update, by_chunk, old)

    @property
    def adds_radial_term(self) -> bool:
        """Whether :meth:`chunk` takes the center gradient without its radial term and adds it in
        the row update (``radial``): by chunk with the Triton row kernel, whose pass computes it
        from the rows it loads (the head's backward then skips its own pass over the gradient)."""
        return self.by_chunk and self.optimizer.kernels == "triton"

    def chunk(self, start: int, stop: int, grad_rows: torch.Tensor, rows: torch.Tensor,
              wide_rows: torch.Tensor | None = None, radial: torch.Tensor | None = None) -> None:
        """Update sampled rows ``[start, stop)`` given their gradient; ``rows`` holds their current
        values (``weight[index[start:stop]]``, overwritten; a view of ``weight`` when index is None),
        ``wide_rows`` optionally the same values in float32 (narrow storage; overwritten);
        ``radial`` (``c [stop − start]`` fp32, when :attr:`adds_radial_term`): the gradient is
        ``grad_rows − c·w``, ``w`` the rows' values before the update."""
        if not self.by_chunk:
            return
        wide_rows = wide_rows if wide_rows is not None and wide_rows.dtype != rows.dtype else None
        # the head's chunk in one piece: its rows are in cache, and fewer, larger ops
        where = slice(start, stop) if self.index is None else self.index[start:stop]
        old = None if self.old is None else tuple(None if block is None else block[start:stop] for block in self.old)
        self.optimizer.apply_rows(self.weight, where, grad_rows, self.update, None if self.index is None else rows,
                                  wide_rows, old, chunk_rows=stop - start, radial=radial)

    def finish(self, grad_values: torch.Tensor) -> None:
        """Update all sampled rows given their gradient ``[S, D]`` (when not done chunk by chunk)."""
        if not self.by_chunk:
            rows = slice(0, grad_values.shape[0]) if self.index is None else self.index
            self.optimizer.apply_rows(self.weight, rows, grad_values, self.update, old_rows=self.old)
