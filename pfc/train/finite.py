"""Nothing non-finite is saved as good: the check of the whole training state before a save.

    check_state_finite(state, "saving the checkpoint of step 120")   # collective; raises on every rank

A checkpoint is "the last good state" that ``--resume auto`` continues from, and ``backbone.pt``
is the model; one NaN in a BatchNorm statistic or a class center puts the model at chance.
Before either is written, every rank checks its part of the state (backbone parameters and
buffers, both optimizers' state, its shard of the class centers) and all ranks agree: if any
rank holds an inf/NaN, every rank raises :class:`NonFiniteStateError` naming the rank and the
first tensors, and nothing is written (the previous checkpoints stay).

Cost: one read of the state, no copy (``torch.aminmax`` per tensor, which propagates NaN), one
device synchronisation and one all-reduce of a flag. At 1M classes × 512 the head's shard and its
momentum are what counts: on one CPU thread 95 ms per save on 8 ranks (0.5 GB per rank), 330 ms on
2 ranks (2 GB per rank) (``python bench/step_rollback.py``); on a GPU a fraction of a millisecond.
The save itself writes the same bytes to disk.
"""
from __future__ import annotations

from typing import Iterable

import torch

from pfc.distributed.agree import agree_on_error
from pfc.errors import PfcError
from pfc.train.state import TrainState

_NAMES_SHOWN = 4


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``max_nonfinite_skips`` consecutive non-finite losses (a checkpoint was written)."""


class NonFiniteStateError(NonFiniteLossError):
    """The model state holds inf/NaN: it is not saved (raised on every rank, before anything is written)."""


def non_finite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding an inf or a NaN (one pass each, one sync in all);
    a tensor met twice under two names is checked once."""
    names, extremes, seen = [], [], set()
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        low, high = torch.aminmax(tensor.detach())
        names.append(name)
        extremes.append(torch.stack([low, high]).float())
    if not extremes:
        return []
    finite = torch.isfinite(torch.stack([value.to(extremes[0].device) for value in extremes])).all(dim=1)
    return [name for name, ok in zip(names, finite.tolist()) if not ok]


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d bool tensor on the tensors' device: whether every floating-point tensor of
    ``tensors`` is free of inf and NaN (None when there is none); no host synchronisation."""
    checks = [torch.isfinite(tensor.detach()).all() for tensor in tensors
              if tensor.is_floating_point() and tensor.numel() > 0]
    return torch.stack(checks).all() if checks else None


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer):
    for number, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            yield f"{prefix}.state.{number}.{key}", value
    for group_number, group in enumerate(optimizer.param_groups):  # DeepSpeed's fp32 masters live here
        for number, parameter in enumerate(group["params"]):
            yield f"{prefix}.param_groups.{group_number}.params.{number}", parameter


def state_tensors(state: TrainState):
    """``(name, tensor)`` of everything a checkpoint and backbone.pt take from this rank's state."""
    yield from ((f"backbone.{name}", value) for name, value in state.runner.model.state_dict(keep_vars=True).items())
    yield from _optimizer_tensors("backbone_optimizer", state.runner.optimizer)
    yield from ((f"head.{name}", value) for name, value in state.head.state_dict(keep_vars=True).items())
    yield from _optimizer_tensors("head_optimizer", state.head_optimizer)


def check_state_finite(state: TrainState, what: str) -> None:
    """Collective: raise :class:`NonFiniteStateError` on every rank when any rank's state (see
    :func:`state_tensors`) holds an inf or a NaN; ``what`` names the save it guards."""
    bad = non_finite_names(state_tensors(state))
    shown = ", ".join(bad[:_NAMES_SHOWN]) + (f" and {len(bad) - _NAMES_SHOWN} more" if len(bad) > _NAMES_SHOWN else "")
    error = PfcError(f"inf/NaN in {shown}") if bad else None
    try:
        agree_on_error(error, f"the finiteness check before {what}")
    except ValueError as exc:
        raise NonFiniteStateError(f"{exc}; refusing to save a non-finite model (nothing written, earlier "
                                  f"checkpoints kept): the training diverged (lower --lr, or resume from "
                                  f"an earlier checkpoint)") from None
