"""Process-group helpers and a differentiable all-gather.

Every function takes the process group explicitly (``None`` means the default group); when
torch.distributed is not initialised they behave as a world of size 1, so the library runs
unchanged in a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised (process groups can then be used)."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    """This process's rank in ``group``, 0 when not distributed."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group=None) -> int:
    """Number of ranks in ``group``, 1 when not distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


# torch ≥ 2.11 renames the flat-tensor collectives; older releases have only the old names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0 in rank order. No autograd."""
    world_size = get_world_size(group)
    if world_size == 1:
        return tensor
    out = torch.empty((world_size * tensor.shape[0], *tensor.shape[1:]),
                      dtype=tensor.dtype, device=tensor.device)
    _all_gather_flat(out, tensor.contiguous(), group=group)
    return out


class _GatherRows(torch.autograd.Function):
    """all-gather along dim 0; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, group, grad_scale):
        ctx.group = group
        ctx.grad_scale = grad_scale
        ctx.rows = tensor.shape[0]
        return all_gather_tensor(tensor, group)

    @staticmethod
    def backward(ctx, grad_output):
        world_size = get_world_size(ctx.group)
        grad = grad_output.contiguous()
        if world_size > 1:
            local = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            _reduce_scatter_flat(local, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            grad = local
        if ctx.grad_scale != 1.0:
            grad = grad * ctx.grad_scale
        return grad, None, None


def gather_rows(tensor: torch.Tensor, group=None, grad_scale: float = 1.0) -> torch.Tensor:
    """Differentiable all-gather: ``[b, …]`` on each of N ranks → ``[N·b, …]`` in rank order.

    Backward (a reduce-scatter): rank r receives ``grad_scale · Σ_ranks grad[r·b:(r+1)·b]``,
    the gradient of its own rows summed over every rank's graph.
    """
    return _GatherRows.apply(tensor, group, float(grad_scale))


_LABEL_SPLIT = 1 << 20  # labels travel as two exact floats: label // 2²⁰ and label % 2²⁰


class _GatherRowsAndLabels(torch.autograd.Function):
    """all-gather of ``[b, D]`` features with their ``[b]`` labels as two extra columns (one
    collective); backward as :class:`_GatherRows` on the feature columns."""

    @staticmethod
    def forward(ctx, features, labels, group, grad_scale):
        ctx.group, ctx.grad_scale, ctx.rows = group, grad_scale, features.shape[0]
        labels = labels.to(torch.int64)
        packed = torch.cat([features, torch.stack([labels // _LABEL_SPLIT, labels % _LABEL_SPLIT], dim=1)
                            .to(features.dtype)], dim=1)
        gathered = all_gather_tensor(packed, group)
        label_parts = gathered[:, -2:].to(torch.int64)
        ctx.mark_non_differentiable(label_parts)
        return gathered[:, :-2], label_parts[:, 0] * _LABEL_SPLIT + label_parts[:, 1]

    @staticmethod
    def backward(ctx, grad_output, _grad_labels):
        grad, _, _ = _GatherRows.backward(ctx, grad_output)
        return grad, None, None, None


def gather_rows_and_labels(features: torch.Tensor, labels: torch.Tensor, group=None, grad_scale: float = 1.0):
    """:func:`gather_rows` of ``features [b, D]`` (fp32 or fp64) and :func:`all_gather_tensor` of
    ``labels [b]`` (integers in ``[0, 2⁴⁴)``) in ONE collective: the labels ride as two columns
    holding ``label // 2²⁰`` and ``label % 2²⁰``, exact in fp32. Returns ``(features [N·b, D],
    labels [N·b] int64)``; the labels carry no gradient."""
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gather_rows_and_labels needs fp32 or fp64 features, got {features.dtype}")
    if get_world_size(group) == 1:
        return gather_rows(features, group, grad_scale), labels.to(torch.int64)
    return _GatherRowsAndLabels.apply(features, labels, group, float(grad_scale))


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group``; a no-op in a world of size 1."""
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_objects(value, group=None) -> list:
    """Every rank's picklable ``value``, in rank order (``[value]`` in a world of one process)."""
    if get_world_size(group) == 1:
        return [value]
    gathered = [None] * get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered
