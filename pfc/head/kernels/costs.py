"""What each of pfc's own kernels costs, declared beside the kernel, for the planner's roofline.

A kernel that torch's counters cannot see into (a Triton kernel registered as a custom op in the
``pfc`` namespace, torch's fused SGD) states its floating-point operations, bytes read and
written and kernel launches as a formula of its arguments::

    @declare_cost("pfc::chunk_forward")
    def _(args, kwargs, out) -> KernelCost:
        block = args[0]
        return KernelCost(flops=4 * block.numel(), bytes_read=block.nbytes, bytes_written=0)

The planner (:mod:`pfc.planning.roofline`) looks a custom op up here by its qualified name
(``op._name``, e.g. ``"pfc::chunk_forward"``); the head never imports the planner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class KernelCost:
    """One call's work: floating-point operations, bytes read and written from device memory,
    and kernel launches."""

    flops: int
    bytes_read: int
    bytes_written: int
    launches: int = 1


CostFormula = Callable[[tuple, dict, Any], KernelCost]
_COSTS: dict[str, CostFormula] = {}


def declare_cost(qualified_name: str) -> Callable[[CostFormula], CostFormula]:
    """Decorator: ``formula(args, kwargs, out) -> KernelCost`` is the cost of one call of the op
    ``qualified_name`` (``"namespace::name"``); the arguments are the op's, fake tensors included."""
    def register(formula: CostFormula) -> CostFormula:
        _COSTS[qualified_name] = formula
        return formula
    return register


def declared_cost(qualified_name: str) -> CostFormula | None:
    """The formula declared for ``qualified_name``, or None."""
    return _COSTS.get(qualified_name)
