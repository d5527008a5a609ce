"""The swap-or-not permutation of :func:`pfc.head.sampling.swap_or_not` as one Triton kernel.

``torch.ops.pfc.swap_or_not(count, domain, key, rounds, device)``: ``π(0), …, π(count − 1)``,
bit for bit what the torch path computes (the same wrapping int32 arithmetic, the round keys
derived in the kernel from ``key`` exactly as :func:`pfc.head.sampling.round_keys` derives them),
in one launch instead of 15 torch ops per round. ``triton`` is imported on the first call
(:mod:`pfc.head.kernels.permutation_triton`); the fake implementation gives the shape on any
device (the planner's simulated GPU, ``meta``), and the declared cost counts the integer work.
"""
from __future__ import annotations

import torch

from pfc.head.kernels.costs import KernelCost, declare_cost

# integer operations per element and round: the partner (4), the round function (6), the swap (2),
# and the round keys, shared by a block (not counted)
_OPS_PER_ROUND = 12


@torch.library.custom_op("pfc::swap_or_not", mutates_args=(), device_types=("cuda", "cpu", "meta"))
def swap_or_not_op(count: int, domain: int, key: int, rounds: int, device: torch.device) -> torch.Tensor:
    """``π(0 … count−1)`` (int32 ``[count]``) of the swap-or-not permutation of ``[0, domain)``
    with ``rounds`` rounds keyed by ``key`` (in ``[0, 2^63)``), computed on ``device``."""
    out = torch.empty(count, dtype=torch.int32, device=device)
    if count and device.type != "meta":
        from pfc.head.kernels.permutation_triton import launch_swap_or_not

        launch_swap_or_not(out, domain, key, rounds)
    return out


@swap_or_not_op.register_fake
def _(count: int, domain: int, key: int, rounds: int, device: torch.device) -> torch.Tensor:
    return torch.empty(count, dtype=torch.int32, device=device)


@declare_cost("pfc::swap_or_not")
def _swap_or_not_cost(args, kwargs, out) -> KernelCost:
    count, _, _, rounds = args[:4]
    return KernelCost(flops=_OPS_PER_ROUND * rounds * count, bytes_read=0, bytes_written=4 * count)
