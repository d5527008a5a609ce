"""The host's cost of one call of the row update's custom op, beside plain aten ops.

    python bench/row_update_dispatch.py [--calls 2000] [--rows 2048] [--dim 512]

On a GPU every call of ``pfc::apply_rows`` (one per head chunk) is a kernel launch plus Python
and dispatcher work on the host; when the host is slower than the kernels, that work is the
step's time. Measured on ``meta`` tensors (the op's fake implementation: everything but the
Triton launch itself, which adds its own ~20-40 µs on a GPU), side by side, one process:

- ``pfc::apply_rows`` through :func:`pfc.head.kernels.rows.row_kernels` (the wrapper, the
  ``torch.library.custom_op`` dispatch: its autograd, ADInplaceOrView and backend wrappers);
- the same schema registered with the lower-level ``torch.library.define`` / ``impl`` (no
  wrappers), for comparison;
- ``Tensor.add_`` (one aten op).

Prints a markdown table (microseconds per call, median of 5 rounds).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _per_call_us(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()

    from pfc.head.kernels.rows import RowStep, counter_seed, row_kernels

    kernels = row_kernels("triton")
    weight = torch.empty(100 * args.rows, args.dim, dtype=torch.bfloat16, device="meta")
    momentum = torch.empty_like(weight)
    rows = torch.empty(args.rows, dtype=torch.int64, device="meta")
    grad = torch.empty(args.rows, args.dim, device="meta")
    found_inf = torch.zeros((), device="meta")
    step = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, found_inf=found_inf, seed=counter_seed(0))
    schema = ("(Tensor(a!) weight, Tensor(b!)? momentum, Tensor? rows, SymInt row_start, Tensor grad, "
              "Tensor? found_inf, Tensor(c!)? old_weight, Tensor(d!)? old_momentum, float lr, "
              "float momentum_factor, float weight_decay, str rounding, SymInt seed) -> ()")
    torch.library.define("pfc_bench::apply_rows", schema)
    torch.library.impl("pfc_bench::apply_rows", "default")(lambda *call: None)
    torch.library.register_fake("pfc_bench::apply_rows")(lambda *call: None)
    plain = (weight, momentum, rows, 0, grad, found_inf, None, None, 0.1, 0.9, 5e-4, "stochastic", step.seed)
    other = torch.empty(16, device="meta")
    with torch.no_grad():
        results = [
            ("pfc::apply_rows (row_kernels('triton').apply_rows, torch.library.custom_op)",
             _per_call_us(lambda: kernels.apply_rows(weight, momentum, rows, grad, step), args.calls)),
            ("the same schema, torch.library.define + impl",
             _per_call_us(lambda: torch.ops.pfc_bench.apply_rows(*plain), args.calls)),
            ("Tensor.add_ (one aten op)", _per_call_us(lambda: other.add_(1.0), args.calls)),
        ]
    base = results[-1][1]
    print("| call (meta tensors, host only) | µs per call | × aten add_ |")
    print("|---|---|---|")
    for name, micros in results:
        print(f"| {name} | {micros:.1f} | {micros / base:.1f} |")


if __name__ == "__main__":
    main()
