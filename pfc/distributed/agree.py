"""One way for every rank to raise the same error: agree on failures before anyone moves on.

    error = None
    try:
        batch = next(loader)
    except Exception as exc:
        error = exc
    agree_on_error(error, "loading batch 7")     # collective: raises on every rank, or on none
    flags = agree_on_error(error, "loading batch 7", cpu_group, flags={"stop": 1})   # the MAX of each flag too

    manifest = run_on_every_rank(lambda: validate(path), "reading checkpoint 120")
    latest = run_on_rank_zero(lambda: newest_in(folder), "listing checkpoints")   # rank 0's, everywhere

An error raised on one rank only leaves the others waiting in their next collective until the
process-group timeout. Every place that can fail on some ranks and not on others (a sample,
a file, the inputs of the head) goes through :func:`agree_on_error`: one MAX all-reduce of a
small flag vector when all is well; the messages are exchanged only on failure. Other per-step
flags that every rank must act on alike (a stop signal, a save that is due) ride in the same
all-reduce (``flags``), so a step's control plane is one collective.

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
from pfc.host_syncs import read_host

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
                   must_match: dict[str, int] | None = None, flags: dict[str, int] | None = None) -> dict[str, int]:
    """Collective: every rank of ``group`` calls it once with its own ``error`` (or None); if any
    rank has one, every rank raises ``"{what} failed on rank R: message; rank S: …"`` (in a world
    of one process ``"{what} failed: message"``).

    ``must_match`` names integers that must be equal on every rank (a batch size, a dtype code);
    a difference fails every rank with ``"{what}: NAME differs across ranks: [v0, v1, …]"``.
    ``flags`` names non-negative integers to combine over the ranks in the same all-reduce (a
    control plane riding on the error check: "a stop was requested here", "a save is due");
    returned as ``{name: max over the ranks}`` when no rank failed.
    ``device``: where the flag tensor lives (the group's device: ``cuda`` for a pure NCCL group);
    default: the host, whose all-reduced values are read without a device synchronisation
    (:func:`pfc.host_syncs.read_host`; on a GPU job ``group`` must then be a CPU (gloo) group).
    Reading a tensor on a given ``device`` is a host sync. In a world of size 1 no collective runs.
    """
    values = list((must_match or {}).values())
    names, raised = list(flags or {}), list((flags or {}).values())
    if any(value < 0 for value in raised):
        raise ValueError(f"{what}: flags must be >= 0, got {flags}")
    mine = None if error is None else (_family(error), _message(error))
    if not is_distributed() or get_world_size(group) == 1:
        reports = [(mine, values)]
    else:
        local = [0 if error is None else 1] + raised + [v for value in values for v in (value, -value)]
        reduced = torch.tensor(local, dtype=torch.int64, device=device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
        reduced = read_host(reduced) if device is None else reduced.tolist()
        raised = reduced[1:1 + len(names)]
        checked = 1 + len(names)
        if not reduced[0] and reduced[checked:] == local[checked:]:
            return dict(zip(names, raised))  # no rank failed, and every rank's values equal this rank's
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
    return dict(zip(names, raised))


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
