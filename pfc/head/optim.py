"""Row-sparse SGD for the class centers, and the seam through which the head's backward applies it.

Partial FC touches only the sampled rows of the center matrix each step. ``SparseRowSGD``
updates exactly those rows (weights and momentum of every other row stay bit-identical) and
never materialises a dense gradient; its work and memory traffic scale with the sampled rows.
:class:`UpdateInBackward` is what the head's backward calls instead of returning the rows'
gradient (``PartialFC.optimizer(update_in_backward=True)``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from pfc.distributed.collectives import get_rank
from pfc.head.rounding import check_rounding, is_narrow, round_into
from pfc.head.scratch import ScratchBlocks
from pfc.torch_private import fused_sgd_, uncoalesced_rows


class SparseRowSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay, applied row by row to the rows that have a gradient.

    For every row ``j`` present in ``p.grad`` (a sparse COO tensor over rows, or dense = all rows):

        d_j = grad_j + weight_decay · w_j
        v_j = momentum · v_j + d_j           (v starts at 0, as torch.optim.SGD's first step)
        w_j = w_j − lr · v_j

    Each chunk is one pass of torch's fused SGD kernel. With a dense gradient the result is
    bit-identical to ``torch.optim.SGD(lr, momentum, weight_decay=weight_decay)`` on the CPU when
    the row width D is a multiple of 16 (128, 512, ...: every chunk is whole vectors); otherwise
    the kernel's scalar tail may round a multiply-add once instead of twice (within an ulp), and
    results then depend on where chunks end. On CUDA the arithmetic is ``SGD(fused=True)``'s.
    Duplicate rows in an uncoalesced sparse gradient (gradient accumulation) are summed first.
    The momentum buffer is allocated eagerly as
    ``state[p]["momentum_buffer"]`` (dense, same shape as ``p``).

    Storage types: the parameter's dtype is the weights' storage (float32, or bfloat16 / float16
    for narrow class centers), ``momentum_dtype`` the momentum's (default: the parameter's). The
    update is computed in float32 (float64 for a float64 parameter) chunk by chunk: the rows are
    gathered, widened, updated with the formulas above, and written back rounded into their
    storage types (:mod:`pfc.head.rounding`): ``rounding="stochastic"`` (default; unbiased, so
    updates below the type's spacing are kept on average) or ``"nearest"``. float32 storage
    keeps the in-place float32 arithmetic bit for bit. The random numbers of stochastic
    rounding come from a generator on the parameter's device seeded by ``(seed, rank, update,
    parameter)``, ``update`` the optimizer's own counter (:attr:`updates`, in its state dict):
    a run resumed from a checkpoint rounds as the uninterrupted run would.

    Skipping without a host sync: ``optimizer.found_inf``, when set to a 0-d tensor on the
    parameters' device, makes every update leave the rows (weights and momentum) unchanged
    where it is nonzero, decided on the device: each chunk's update is one pass of torch's fused
    SGD kernel, which takes it as its ``found_inf`` (as torch's fused optimizers do under
    GradScaler; narrow storage then rounds the unchanged values back to themselves, exactly);
    the caller clears it (None).

    :meth:`update_rows` applies the same update to given rows and their gradient directly: the
    head calls it inside its backward when built with
    ``PartialFC.optimizer(update_in_backward=True)`` (no gradient stored, ``p.grad`` stays None),
    with a bit-identical result for float32 storage (D a multiple of 16, see above; the update in
    the backward works in the head's chunks). For narrow storage the two differ by
    rounding: ``p.grad`` is stored in the parameter's type (autograd rounds the head's gradient to
    it), while the backward hands its float32 gradient over directly.

    No method reads a tensor value on the host for the head's gradients: a sparse gradient that
    reaches the parameter flagged coalesced (the head's) while ``p.grad`` is None is noted on its
    way in (a gradient hook) and used as it is; any other sparse gradient is checked (one host
    read) and coalesced when needed.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 momentum_dtype: torch.dtype | None = None, chunk_rows: int = 1024,
                 rounding: str = "stochastic", seed: int = 0):
        if not lr >= 0:
            raise ValueError(f"learning rate {lr} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum {momentum} outside [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows {chunk_rows} must be >= 1")
        check_rounding(rounding)
        if momentum_dtype is not None and not momentum_dtype.is_floating_point:
            raise ValueError(f"momentum_dtype {momentum_dtype} is not a floating-point type")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.momentum_dtype = momentum_dtype
        self.chunk_rows = chunk_rows
        self.rounding = rounding
        self.seed = int(seed)
        self.rank = get_rank()
        self.updates = 0
        self.found_inf: torch.Tensor | None = None
        self._scratch = ScratchBlocks(min_rows=chunk_rows)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._noted_gradients: dict[torch.Tensor, tuple[int, int] | None] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.dtype not in _STORAGE_DTYPES:
                    raise ValueError(f"parameter dtype {param.dtype} is not one of float32, float64, bfloat16, float16")
                if group["momentum"]:
                    self.state[param]["momentum_buffer"] = torch.zeros_like(
                        param, dtype=momentum_dtype or param.dtype, memory_format=torch.contiguous_format)
                if param.requires_grad:
                    _note_gradients_of(self, param)

    def state_dict(self):
        state = super().state_dict()
        state["updates"] = self.updates
        return state

    def load_state_dict(self, state_dict):
        """Restore the state; each momentum buffer keeps its storage type and is cast from the
        saved one directly (a float32 buffer saved beside bfloat16 centers is not rounded twice)."""
        state_dict = dict(state_dict)
        self.updates = int(state_dict.pop("updates", 0))
        params = [param for group in self.param_groups for param in group["params"]]
        wanted = {index: self.state[param]["momentum_buffer"].dtype for index, param in enumerate(params)
                  if "momentum_buffer" in self.state[param]}
        saved = {int(key): entry.get("momentum_buffer") for key, entry in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)   # it casts every state to its parameter's dtype
        for index, param in enumerate(params):
            buffer = saved.get(index)
            if buffer is not None and index in wanted:
                self.state[param]["momentum_buffer"] = buffer.to(device=param.device, dtype=wanted[index],
                                                                 memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [(index, param) for index, param in
                     enumerate(p for group in self.param_groups for p in group["params"]) if param.grad is not None]
        if not with_grad:   # e.g. the update ran in the backward: nothing to do, no update counted
            return loss
        update = self.updates
        self.updates += 1
        for index, param in with_grad:
            rows, values = _row_gradient(param.grad, self._noted_gradients.get(param))
            rows = slice(0, values.shape[0]) if rows is None else rows
            self._apply(param, rows, values, None, self._start(param, index, update, None))
        return loss

    @torch.no_grad()
    def update_rows(self, param: torch.Tensor, rows: slice | torch.Tensor, grad: torch.Tensor,
                    weight_rows: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> None:
        """Apply the update to some rows of ``param`` given their gradient ``grad [n, D]``.

        ``rows`` is a slice (the rows are updated in place) or a LongTensor of distinct row ids;
        then ``weight_rows``, when given, must hold ``param[rows]`` (it is overwritten with the
        new values, saving a gather), and the new rows and momentum rows are written back. The
        arithmetic is :meth:`step`'s, so the result is bit-identical to a gradient + ``step()``
        (D a multiple of 16: see the class docstring).
        ``skip``: an optional 0-d tensor on the device, nonzero = leave the rows unchanged (as
        :attr:`found_inf` does). One call is one update of the counter.
        """
        update = self.updates
        self.updates += 1
        self._apply(param, rows, grad, weight_rows, self.start_update(param, update, skip))

    def start_update(self, param: torch.Tensor, update: int, skip: torch.Tensor | None = None) -> RowUpdate:
        """The :class:`RowUpdate` of update number ``update`` of ``param`` (its random stream
        seeded, its skip mask combined with :attr:`found_inf`); see :class:`UpdateInBackward`."""
        index = next(i for i, p in enumerate(p for group in self.param_groups for p in group["params"])
                     if p is param)
        return self._start(param, index, update, skip)

    def _start(self, param, index, update, skip) -> RowUpdate:
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        masks = [mask for mask in (self.found_inf, skip) if mask is not None]
        combined = None
        for mask in masks:
            mask = mask.to(torch.bool) if mask.dtype == torch.bool else mask != 0
            combined = mask if combined is None else combined | mask
        buffer = self.state[param].get("momentum_buffer")
        generator = None
        if self.rounding == "stochastic" and (is_narrow(param.dtype) or (buffer is not None and is_narrow(buffer.dtype))):
            generator = self._generators.get(param.device)
            if generator is None:
                generator = self._generators[param.device] = torch.Generator(device=param.device)
            generator.manual_seed(int(np.random.SeedSequence([self.seed, self.rank, update, index]).generate_state(1)[0]))
        found_inf = None if combined is None else combined.to(device=param.device, dtype=torch.float32)
        return RowUpdate(group, buffer, generator, found_inf)

    def _apply(self, param, rows, grad, weight_rows, update: RowUpdate, wide_rows=None, chunk_rows=None) -> None:
        """Update ``rows`` (a slice or row ids) chunk by chunk (``chunk_rows``, default
        :attr:`chunk_rows`); ``weight_rows`` holds ``param[rows]`` (row ids only; else gathered
        here), ``wide_rows`` optionally the same values in the compute type (narrow storage:
        spares the widening copy; overwritten)."""
        buffer = update.buffer
        chunk_rows = chunk_rows or self.chunk_rows
        if isinstance(rows, slice):
            first, last, _ = rows.indices(param.shape[0])
            for start in range(first, last, chunk_rows):
                stop = min(start + chunk_rows, last)
                self._update_rows(param[start:stop], None if buffer is None else buffer[start:stop],
                                  grad[start - first:stop - first], update,
                                  None if wide_rows is None else wide_rows[start - first:stop - first])
            return
        for start in range(0, rows.numel(), chunk_rows):
            stop = min(start + chunk_rows, rows.numel())
            index = rows[start:stop]
            weight_chunk = weight_rows[start:stop] if weight_rows is not None else torch.index_select(
                param, 0, index, out=self._scratch.get("weight", stop - start, param))
            buffer_chunk = None if buffer is None else torch.index_select(
                buffer, 0, index, out=self._scratch.get("momentum", stop - start, buffer))
            self._update_rows(weight_chunk, buffer_chunk, grad[start:stop], update,
                              None if wide_rows is None else wide_rows[start:stop])
            param.index_copy_(0, index, weight_chunk)
            if buffer is not None:
                buffer.index_copy_(0, index, buffer_chunk)

    def _update_rows(self, weight, buffer, grad, update: RowUpdate, wide=None):
        """One chunk: ``weight`` and ``buffer`` (storage types) updated in place from ``grad``, in
        one fused pass (:func:`_sgd_pass`) over the compute-type values: the storage itself, or
        widened (or made contiguous) copies in scratch blocks (``wide``: the caller's, for the
        weights) that are then rounded (or copied) back."""
        rows = len(grad)
        compute = _compute_dtype(weight.dtype)

        def operand(tensor, name):   # the kernel reads contiguous memory: else a scratch copy
            if tensor is None or (tensor.dtype == compute and tensor.is_contiguous()):
                return tensor
            return self._scratch.get(name, rows, _like(tensor, compute)).copy_(tensor)

        w = wide if wide is not None and weight.dtype != compute else operand(weight, "w_compute")
        g, v = operand(grad, "g_compute"), operand(buffer, "v_compute")
        _sgd_pass(w, v, g, update.group, update.found_inf)
        # a skipped update leaves w and v as they were, which round back to themselves exactly
        if v is not buffer:
            round_into(buffer, v, self.rounding, update.generator, self._scratch)
        if w is not weight:
            round_into(weight, w, self.rounding, update.generator, self._scratch)


def _sgd_pass(weight, momentum, grad, group, found_inf) -> None:
    """``d = grad + wd·w; v = μ·v + d; w = w − lr·v`` in place on contiguous tensors, unless
    ``found_inf`` (a 0-d float32 tensor on their device, 1.0 = skip) says to leave both unchanged:
    one pass of torch's fused SGD kernel (:func:`pfc.torch_private.fused_sgd_`; ``torch.optim.SGD``'s
    arithmetic, bit for bit on the CPU over whole vectors, its scalar tail may fuse a multiply-add),
    the skip decided on the device. One pass instead of four and no ``torch.where`` for a possible
    skip (measured on a 2048 × 512 chunk, one thread: 0.68 ms against 1.89 ms). With μ = 0 the
    buffer is left alone, as ``torch.optim.SGD`` leaves it."""
    use_momentum = momentum is not None and group["momentum"] != 0
    fused_sgd_(weight, grad, momentum if use_momentum else None, lr=group["lr"],
               momentum_factor=group["momentum"] if use_momentum else 0.0, weight_decay=group["weight_decay"],
               found_inf=found_inf)


_STORAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-row stand-in with ``tensor``'s trailing shape and device and ``dtype``, for ScratchBlocks."""
    return tensor.new_empty((0, *tensor.shape[1:]), dtype=dtype)


@dataclass(frozen=True)
class RowUpdate:
    """One update of one parameter: its param group, momentum buffer, the seeded random stream
    of stochastic rounding (None when nothing is rounded stochastically) and the 0-d skip mask
    on the device as the fused kernel takes it (float32, 1.0 = skip, else 0.0; None: nothing to skip)."""

    group: dict
    buffer: torch.Tensor | None
    generator: torch.Generator | None
    found_inf: torch.Tensor | None


def _note_gradients_of(optimizer: SparseRowSGD, param: torch.Tensor) -> None:
    """Note each gradient on its way into ``param.grad``: a sparse one flagged coalesced (sorted,
    distinct rows: the head's) arriving while ``param.grad`` is None is then used as it is,
    although autograd drops the flag when it stores it. Weak references: the hook keeps neither
    the optimizer nor the parameter alive."""
    optimizer_ref, param_ref = weakref.ref(optimizer), weakref.ref(param)

    def note(grad):
        owner, target = optimizer_ref(), param_ref()
        if owner is None or target is None or grad is None:
            return
        stored = uncoalesced_rows(grad) if grad.is_sparse and grad.is_coalesced() and target.grad is None else None
        owner._noted_gradients[target] = None if stored is None else (stored[1].data_ptr(), stored[1].shape[0])

    param.register_hook(note)


def _row_gradient(grad: torch.Tensor, noted: tuple[int, int] | None = None):
    """``(rows, values)`` of a row gradient: rows ``None`` for a dense one. A sparse gradient whose
    rows are already strictly increasing is used as it is: known without a look when it is the
    one noted on its way in (``noted``: its values' address and row count), else checked (a host
    read); anything else is coalesced, summing duplicate rows."""
    if not grad.is_sparse:
        return None, grad
    stored = uncoalesced_rows(grad) if not grad.is_coalesced() and grad.sparse_dim() == 1 else None
    if stored is not None:
        rows, values = stored
        if noted is not None and noted == (values.data_ptr(), values.shape[0]):
            return rows, values
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, values
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


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
    ``found_inf``) updates nothing, decided on the device: no host sync.
    """

    optimizer: SparseRowSGD
    weight: torch.Tensor
    index: torch.Tensor | None
    update: RowUpdate
    by_chunk: bool

    @classmethod
    def begin(cls, optimizer: SparseRowSGD, weight: torch.Tensor, index: torch.Tensor | None,
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
        return cls(optimizer, weight, index, update, by_chunk)

    def chunk(self, start: int, stop: int, grad_rows: torch.Tensor, rows: torch.Tensor,
              wide_rows: torch.Tensor | None = None) -> None:
        """Update sampled rows ``[start, stop)`` given their gradient; ``rows`` holds their current
        values (``weight[index[start:stop]]``, overwritten; a view of ``weight`` when index is None),
        ``wide_rows`` optionally the same values in float32 (narrow storage; overwritten)."""
        if not self.by_chunk:
            return
        wide_rows = wide_rows if wide_rows is not None and wide_rows.dtype != rows.dtype else None
        # the head's chunk in one piece: its rows are in cache, and fewer, larger ops
        where = slice(start, stop) if self.index is None else self.index[start:stop]
        self.optimizer._apply(self.weight, where, grad_rows, None if self.index is None else rows, self.update,
                              wide_rows, chunk_rows=stop - start)

    def finish(self, grad_values: torch.Tensor) -> None:
        """Update all sampled rows given their gradient ``[S, D]`` (when not done chunk by chunk)."""
        if not self.by_chunk:
            rows = slice(0, grad_values.shape[0]) if self.index is None else self.index
            self.optimizer._apply(self.weight, rows, grad_values, None, self.update)
