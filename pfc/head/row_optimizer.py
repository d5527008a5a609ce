"""What the row-sparse center optimizers share (:class:`SparseRowOptimizer`): the gradient's rows,
chunks, storage types and rounding streams, the on-device skip, loss unscaling, the update counter
and the old rows for the rollback. A subclass says which per-row states it keeps
(:attr:`SparseRowOptimizer.ROW_STATES`), how one update starts and which row kernel applies it:
:class:`pfc.head.optim.SparseRowSGD`, :class:`pfc.head.adamw.SparseRowAdamW`. The seam through
which the head's backward applies them is :mod:`pfc.head.update_in_backward`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from pfc.distributed.collectives import get_rank
from pfc.head.kernels import KERNEL_CHOICES, resolve_kernels
from pfc.head.kernels.rows import AdamWStep, RowStep, counter_seed, row_kernels
from pfc.head.rounding import check_rounding
from pfc.head.scratch import ScratchBlocks
from pfc.torch_private import uncoalesced_rows

CenterOptimizer = Literal["sgd", "adamw"]
CENTER_OPTIMIZERS: tuple[str, ...] = get_args(CenterOptimizer)   # SparseRowSGD, pfc.head.adamw.SparseRowAdamW


class SparseRowOptimizer(torch.optim.Optimizer):
    """What the row-sparse optimizers share (see :class:`pfc.head.optim.SparseRowSGD` for the
    contract of each part: ``found_inf``, ``grad_unscale``, :meth:`update_rows`,
    :meth:`nonfinite_gradients`, :meth:`keep_old_rows`, the seeded rounding streams, ``kernels``).

    A subclass names its per-row states in :attr:`ROW_STATES` (tensors whose first dimension is
    the parameter's rows, created by :meth:`_init_row_states`; the checkpoint reshards them with
    the centers and the rollback restores their sampled rows), builds one update's
    :class:`RowUpdate` in :meth:`_start` and applies it in :meth:`apply_rows`.
    """

    ROW_STATES: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, chunk_rows: int, rounding: str, seed: int, kernels: str):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows {chunk_rows} must be >= 1")
        check_rounding(rounding)
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
        super().__init__(params, defaults)
        self.chunk_rows = chunk_rows
        self.rounding = rounding
        self.seed = int(seed)
        self.rank = get_rank()
        self.updates = 0
        self.found_inf: torch.Tensor | None = None
        self.grad_unscale: torch.Tensor | None = None
        self.old_rows: OldRows | None = None
        self._scratch = ScratchBlocks(min_rows=chunk_rows)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._noted_gradients: dict[torch.Tensor, tuple[int, int] | None] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.dtype not in _STORAGE_DTYPES:
                    raise ValueError(f"parameter dtype {param.dtype} is not one of float32, float64, bfloat16, float16")
                self._init_row_states(param, group)
                if param.requires_grad:
                    _note_gradients_of(self, param)
        first = next((p for group in self.param_groups for p in group["params"]), None)
        self.kernels = resolve_kernels(kernels, None if first is None else first.device)
        self.row_kernels = row_kernels(self.kernels)

    def _init_row_states(self, param: torch.Tensor, group: dict) -> None:
        """Create ``param``'s per-row states in ``self.state[param]`` (the subclass's)."""

    def row_states(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """``param``'s per-row states by name (:attr:`ROW_STATES` that it has)."""
        state = self.state.get(param, {})
        return {name: state[name] for name in self.ROW_STATES if isinstance(state.get(name), torch.Tensor)}

    def state_dict(self):
        state = super().state_dict()
        state["updates"] = self.updates
        return state

    def load_state_dict(self, state_dict):
        """Restore the state; each per-row state keeps its type and is cast from the saved one
        directly (a float32 buffer saved beside bfloat16 centers is not rounded twice; integer
        step counts stay integers)."""
        state_dict = dict(state_dict)
        self.updates = int(state_dict.pop("updates", 0))
        params = [param for group in self.param_groups for param in group["params"]]
        wanted = {(index, name): tensor.dtype for index, param in enumerate(params)
                  for name, tensor in self.row_states(param).items()}
        saved = {int(key): entry for key, entry in state_dict.get("state", {}).items()}
        for index, name in wanted:
            found = sorted(saved.get(index, {}))
            if name not in saved.get(index, {}) and found:
                raise ValueError(f"the saved optimizer state of parameter {index} holds {', '.join(found)}, not "
                                 f"{', '.join(self.ROW_STATES)}: it was saved by another center optimizer "
                                 f"({type(self).__name__} needs its own; head.optimizer)")
        super().load_state_dict(state_dict)   # it casts every state to its parameter's dtype
        for (index, name), dtype in wanted.items():
            value = saved.get(index, {}).get(name)
            if value is not None:
                self.state[params[index]][name] = value.to(device=params[index].device, dtype=dtype,
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
            self.apply_rows(param, rows, values, self._start(param, index, update, None))
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
        self.apply_rows(param, rows, grad, self.start_update(param, update, skip), weight_rows=weight_rows)

    @torch.no_grad()
    def nonfinite_gradients(self) -> torch.Tensor | None:
        """1.0 where some value of the stored gradients is ±inf or NaN, else 0.0: a 0-d float32
        tensor on the parameters' device, decided there (the largest magnitude of each gradient,
        one read of it); None when no parameter has a gradient. A sparse gradient is read as
        :meth:`step` uses it: rows given twice (gradient accumulation) are summed first, in its
        type, and kept summed in ``p.grad`` (as GradScaler does for fp16 gradients), so a sum that
        overflows is seen here."""
        flags = []
        for param in (p for group in self.param_groups for p in group["params"]):
            if param.grad is None:
                continue
            noted = self._noted_gradients.get(param)
            rows, values = _row_gradient(param.grad, noted)
            if rows is not None and (noted is None or noted != (values.data_ptr(), values.shape[0])):
                # summed here: stored flagged coalesced, noted, so that step() takes it as it is
                param.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, param.shape, is_coalesced=True,
                                                     check_invariants=False)
                self._noted_gradients[param] = (values.data_ptr(), values.shape[0])
            if values.numel():
                peak = torch.linalg.vector_norm(values, float("inf"), dtype=torch.float32)
                flags.append((~torch.isfinite(peak)).to(torch.float32))
            else:
                flags.append(torch.zeros((), dtype=torch.float32, device=values.device))
        if not flags:
            return None
        return torch.stack(flags).amax() if len(flags) > 1 else flags[0]

    def start_update(self, param: torch.Tensor, update: int, skip: torch.Tensor | None = None) -> RowUpdate:
        """The :class:`RowUpdate` of update number ``update`` of ``param`` (its random stream
        seeded, its skip mask combined with :attr:`found_inf`); see :class:`pfc.head.update_in_backward.UpdateInBackward`."""
        index = next(i for i, p in enumerate(p for group in self.param_groups for p in group["params"])
                     if p is param)
        return self._start(param, index, update, skip)

    def keep_old_rows(self) -> OldRows:
        """From now on, each update in the head's backward (:class:`pfc.head.update_in_backward.UpdateInBackward`) also writes
        the values its rows had before it (weights and momentum) into the returned
        :class:`OldRows`, in the same pass (:class:`pfc.train.rollback.StepRollback` puts them back
        when the guard skips the step); :meth:`drop_old_rows` stops it."""
        self.old_rows = OldRows()
        return self.old_rows

    def drop_old_rows(self) -> None:
        """Stop writing the old rows (see :meth:`keep_old_rows`)."""
        self.old_rows = None

    def _skip_mask(self, skip: torch.Tensor | None, device) -> torch.Tensor | None:
        """:attr:`found_inf` or ``skip`` (either nonzero: leave the rows as they are) as a 0-d
        float32 tensor on ``device``, None when neither is set; decided on the device."""
        combined = None
        for mask in (self.found_inf, skip):
            if mask is None:
                continue
            mask = mask.to(torch.bool) if mask.dtype == torch.bool else mask != 0
            combined = mask if combined is None else combined | mask
        return None if combined is None else combined.to(device=device, dtype=torch.float32)

    def _rounding_stream(self, param: torch.Tensor, index: int, update: int, narrow: bool) -> torch.Generator | None:
        """The torch path's generator for update ``update`` of parameter ``index``, seeded by
        ``(seed, rank, update, index)``; None unless something is stored narrow (``narrow``) and
        rounded stochastically."""
        if self.rounding != "stochastic" or not narrow:
            return None
        generator = self._generators.get(param.device)
        if generator is None:
            generator = self._generators[param.device] = torch.Generator(device=param.device)
        generator.manual_seed(int(np.random.SeedSequence([self.seed, self.rank, update, index]).generate_state(1)[0]))
        return generator

    def _philox_seed(self, index: int, update: int) -> int:
        """The Triton path's key for the same update (0 on the torch path)."""
        return counter_seed(self.seed, self.rank, update, index) if self.kernels == "triton" else 0

    def _start(self, param, index, update, skip) -> RowUpdate:
        """One update's :class:`RowUpdate` (the subclass's arithmetic)."""
        raise NotImplementedError

    def apply_rows(self, param, rows, grad, update: RowUpdate, weight_rows=None, wide_rows=None, old_rows=None,
                   chunk_rows=None, radial=None) -> None:
        """Apply ``update`` to ``rows`` of ``param`` and its row states (the subclass's kernel)."""
        raise NotImplementedError


_STORAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RowUpdate:
    """One update of one parameter: its arithmetic, skip mask and randomness
    (:class:`pfc.head.kernels.rows.RowStep` or :class:`pfc.head.kernels.rows.AdamWStep`, fixed
    when the update starts: an LR scheduler's change shows at the next update) and its per-row
    states by name (:attr:`SparseRowOptimizer.ROW_STATES`; a value None: not kept, e.g. SGD
    without momentum)."""

    step: RowStep | AdamWStep
    states: dict[str, torch.Tensor | None]

    @property
    def buffer(self) -> torch.Tensor | None:
        """SGD's momentum buffer (None without momentum, or for another optimizer)."""
        return self.states.get("momentum_buffer")


class OldRows:
    """The values the rows of the last update in the backward had before it
    (:meth:`SparseRowOptimizer.keep_old_rows`): ``rows`` the row ids updated (None: all rows),
    ``weight`` ``[n, D]`` and ``states`` (each per-row state's rows by name: SGD's momentum,
    AdamW's moments and step counts; None where the optimizer keeps none) in their storage types,
    in the order of ``rows``; ``filled`` says whether an update wrote them since the owner last
    cleared it. The blocks are reused across updates (grown when too small)."""

    def __init__(self):
        self.rows: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.states: dict[str, torch.Tensor | None] = {}
        self.filled = False
        self._blocks = ScratchBlocks()

    @property
    def momentum(self) -> torch.Tensor | None:
        """SGD's momentum rows (None without momentum)."""
        return self.states.get("momentum_buffer")

    def prepare(self, weight: torch.Tensor, states: dict[str, torch.Tensor | None],
                index: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Blocks for an update of rows ``index`` (None: all rows) of ``weight`` and of each of
        ``states`` (by name), marked filled (the update writes them before it writes anything
        else): ``(weight block, *state blocks)`` in the order of ``states``."""
        count = weight.shape[0] if index is None else index.numel()
        self.rows = index
        self.weight = self._blocks.get("weight", count, weight)
        self.states = {name: None if live is None else self._blocks.get(name, count, live)
                       for name, live in states.items()}
        self.filled = True
        return (self.weight, *self.states.values())


def _note_gradients_of(optimizer: SparseRowOptimizer, param: torch.Tensor) -> None:
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
