"""The head's memory traffic per op class, kernel launches and time, as the planner counts them.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/head_traffic.py [--kernels torch|triton] [--counter both|new]

Plans issue 19's job (8 × iresnet50 on V100, batch 128, ρ = 0.1, bf16 autocast, fp16 centers,
29M classes) and prints, per op class, the bytes one rank's head moves per step, with the work
counter of this branch ("new") and with the counter main had before it ("before": every op
charged its tensor inputs and outputs, metadata queries, allocations' "like" tensors and
``out=`` arguments included, the fused SGD unseen), then a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.planning.job import Job  # noqa: E402
from pfc.planning.plan import Planner  # noqa: E402
from pfc.planning.report import estimate  # noqa: E402
from pfc.planning.work import FUSED_OPTIMIZERS, WorkCounter, _aliases, _nbytes, _op_class, _tensors  # noqa: E402
from pfc.head.kernels.costs import KernelCost  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

import torch  # noqa: E402

_aten = torch.ops.aten
_GATHERS = {_aten.index_select, _aten.index, _aten.gather, _aten.embedding, _aten.take}
_SCATTERS = {_aten.index_copy_, _aten.index_copy, _aten.index_put_, _aten.index_put, _aten.index_add_,
             _aten.index_add, _aten.scatter_, _aten.scatter, _aten.scatter_add_, _aten.scatter_add,
             _aten._index_put_impl_, _aten.index_fill_, _aten.masked_fill_}


class CounterBefore(WorkCounter):
    """main's counter before this branch (pfc/planning/roofline.py at ee662f4), its bytes split by
    the same op classes; one launch per charged op, as the new counter would count them."""

    def cost(self, func, args, kwargs, out):
        name = func._overloadpacket.__name__
        if name in FUSED_OPTIMIZERS or func is _aten._local_scalar_dense.default:
            return None    # the fake GPU answered these before the counter saw them
        inputs = _tensors((args, kwargs))
        if not any(t.device.type != "cpu" for t in inputs) and not any(t.device.type != "cpu" for t in _tensors(out)):
            return None
        outputs = _tensors(out)
        if func.is_view or (_aliases(outputs, inputs) and not func._schema.is_mutable):
            return None
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        if packet in _GATHERS:
            read, written, kind = sum(_nbytes(t) for t in outputs) + sum(_nbytes(t) for t in inputs[1:]), \
                sum(_nbytes(t) for t in outputs), "gather"
        elif packet in _SCATTERS:
            read = written = sum(_nbytes(t) for t in inputs[1:])
            kind = "scatter"
        else:
            read, written = sum(_nbytes(t) for t in inputs), sum(_nbytes(t) for t in outputs)
            kind = "metadata" if not outputs else "allocation" if name in _ALLOCATIONS else _op_class(name, flops)
        return KernelCost(flops, read, written), kind


_ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "empty_permuted"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", default="torch", help="the head's kernels: torch | triton (default: torch)")
    parser.add_argument("--counter", default="both", help="both | new (default: both)")
    parser.add_argument("--classes", type=int, default=29_000_000)
    args = parser.parse_args(argv)
    job = Job(num_classes=args.classes, gpus=8, network="iresnet50", batch_size=128, sample_rate=0.1,
              precision="bf16", center_dtype="fp16", kernels=args.kernels)
    counters = {"before": CounterBefore, "new": WorkCounter} if args.counter == "both" else {"new": WorkCounter}
    results = {}
    for label, counter in counters.items():
        plan = Planner(job, counter=counter).plan(job.num_classes)
        time = estimate(plan, "v100")
        head = plan.by_class.get("head", {})
        results[label] = {"head_bytes_per_class": {k: round(v) for k, v in sorted(head.items(), key=lambda kv: -kv[1])},
                          "head_bytes": round(sum(head.values())), "head_launches": time.head_launches,
                          "roofline_head_s": time.roofline_head_s + time.head_comm_s,
                          "predicted_head_s": time.head_s + time.head_comm_s,
                          "roofline_backbone_s": time.roofline_backbone_s}
    classes = sorted({c for r in results.values() for c in r["head_bytes_per_class"]},
                     key=lambda c: -max(r["head_bytes_per_class"].get(c, 0) for r in results.values()))
    print(f"head traffic per step, one rank of 8 × iresnet50 at {job.num_classes:,} classes "
          f"(fp16 centers, {args.kernels} kernels), GB:")
    print(f"{'op class':<14}" + "".join(f"{label:>10}" for label in results))
    for name in classes:
        print(f"{name:<14}" + "".join(f"{r['head_bytes_per_class'].get(name, 0) / 1e9:10.1f}"
                                      for r in results.values()))
    print(f"{'total':<14}" + "".join(f"{r['head_bytes'] / 1e9:10.1f}" for r in results.values()))
    for label, r in results.items():
        print(f"{label}: head {1e3 * r['roofline_head_s']:.1f} ms roofline on V100, "
              f"{1e3 * r['predicted_head_s']:.1f} ms with {r['head_launches']:,} launches; "
              f"backbone roofline {1e3 * r['roofline_backbone_s']:.1f} ms")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
