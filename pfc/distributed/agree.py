"""One way for every rank to raise the same error: agree on failures before anyone moves on.

    error = None
    try:
        batch = next(loader)
    except Exception as exc:
        error = exc
    agree_on_error(error, "loading batch 7")     # collective: raises on every rank, or on none

    manifest = run_on_every_rank(lambda: validate(path), "reading checkpoint 120")
    latest = run_on_rank_zero(lambda: newest_in(folder), "listing checkpoints")   # rank 0's, everywhere

An error raised on one rank only leaves the others waiting in their next collective until the
process-group timeout. Every place that can fail on some ranks and not on others (a sample,
a file, the inputs of the head) goes through :func:`agree_on_error`: one MAX all-reduce of a
small flag vector when all is well; the messages are exchanged only on failure.

The raised class: when every failing rank raised the same :class:`pfc.errors.PfcError` class
(a user's config, data or checkpoint problem) that class; when each raised some ``ValueError``
(bad input) a ``ValueError``; anything else a ``RuntimeError``. On the rank that failed the
original exception is chained (``raise … from``), so its traceback is kept.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from pfc import errors
from pfc.distributed.collectives import all_gather_objects, get_world_size, is_distributed

Result = TypeVar("Result")

# classes a failure may travel as between ranks, most specific first
_FAMILY = (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.PfcError, ValueError)


def _family(error: BaseException) -> str:
    for kind in _FAMILY:
        if isinstance(error, kind):
            return kind.__name__
    return "RuntimeError"


def _message(error: BaseException) -> str:
    """The text of ``error``; a family member's message is the cause itself, anything else is
    prefixed with its type (``IndexError: …``)."""
    if isinstance(error, errors.PfcError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _raised_class(families: list[str]) -> type[Exception]:
    by_name = {kind.__name__: kind for kind in _FAMILY}
    if len(set(families)) == 1 and families[0] in by_name:
        return by_name[families[0]]
    if all(family in by_name for family in families):
        return ValueError
    return RuntimeError


def agree_on_error(error: BaseException | None, what: str, group=None, *, device=None,
                   must_match: dict[str, int] | None = None) -> None:
    """Collective: every rank of ``group`` calls it once with its own ``error`` (or None); if any
    rank has one, every rank raises ``"{what} failed on rank R: message; rank S: …"`` (in a world
    of one process ``"{what} failed: message"``).

    ``must_match`` names integers that must be equal on every rank (a batch size, a dtype code);
    a difference fails every rank with ``"{what}: NAME differs across ranks: [v0, v1, …]"``.
    ``device``: where the flag tensor lives (the group's device: ``cuda`` for a pure NCCL group;
    default CPU). In a world of size 1 no collective runs.
    """
    values = list((must_match or {}).values())
    mine = None if error is None else (_family(error), _message(error))
    if not is_distributed() or get_world_size(group) == 1:
        reports = [(mine, values)]
    else:
        flags = torch.tensor([0 if error is None else 1] + [v for value in values for v in (value, -value)],
                             dtype=torch.int64, device=device)
        reduced = flags.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
        if not bool((reduced != flags).any() or flags[0]):
            return  # no rank failed, and every rank's values equal this rank's
        reports = all_gather_objects((mine, values), group)
    failures = [(rank, report) for rank, (report, _) in enumerate(reports) if report is not None]
    if failures:
        kind = _raised_class([family for _, (family, _) in failures])
        if len(reports) == 1:
            raise kind(f"{what} failed: {failures[0][1][1]}") from error
        text = "; ".join(f"rank {rank}: {message}" for rank, (_, message) in failures)
        raise kind(f"{what} failed on {text}") from error
    for position, name in enumerate(must_match or {}):
        seen = [rank_values[position] for _, rank_values in reports]
        if len(set(seen)) > 1:
            raise ValueError(f"{what}: {name} differs across ranks: {seen}")


def run_on_every_rank(fn: Callable[[], Result], what: str, group=None) -> Result:
    """Collective: call ``fn()`` on every rank and return its result; an exception on any rank
    is raised on every rank by :func:`agree_on_error`."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    agree_on_error(error, what, group)
    return result


def run_on_rank_zero(fn: Callable[[], Result], what: str, group=None) -> Result:
    """Collective: call ``fn()`` on rank 0 of ``group`` only (a decision or a file operation that
    one rank makes for all, e.g. on a shared folder) and return its result on every rank; its
    exception is raised on every rank by :func:`agree_on_error`."""
    first = not is_distributed() or dist.get_rank(group) == 0
    return broadcast_object(run_on_every_rank(lambda: fn() if first else None, what, group), group)


def broadcast_object(value, group=None, src: int = 0):
    """Rank ``src``'s picklable ``value`` (a rank of ``group``) on every rank of ``group``."""
    if not is_distributed() or get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return box[0]
