"""What "a skipped step changes nothing" and "nothing non-finite is saved" cost, one process.

    python bench/step_rollback.py [--networks tiny iresnet50] [--batch-size 32] [--classes 1000000]
                                  [--ranks 8] [--sample-rate 0.1] [--device cpu|cuda]

Per step (side by side with the step itself: backbone forward + backward + SGD step at 112×112):
  * buffers copy: StepRollback.begin() (every backbone buffer, before the micro-batches);
  * buffers finite: StepRollback.buffers_finite() (part of the guard's decision);
  * gradient norm: DDPRunner.gradients_finite() (one pass; reused by clipping when it is on);
  * head rows copy: the forward hook's copy of the sampled center rows and momentum rows
    (update in backward only), for a shard of ``classes / ranks`` rows × 512 at ``sample_rate``.
Per save: check_state_finite's pass over one rank's center shard and its momentum.
Times are medians of repeated runs, in milliseconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.backbones import build_backbone  # noqa: E402
from pfc.train.finite import non_finite_names  # noqa: E402
from pfc.train.rollback import StepRollback  # noqa: E402
from pfc.train.runners.ddp import DDPRunner  # noqa: E402


def median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class _Head(torch.nn.Module):
    """Stands for the head in the row-copy measurement: a center shard and its last sample."""

    def __init__(self, rows: int, width: int, sampled: int, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(rows, width, device=device))
        self.last_sample = (torch.randperm(rows, device=device)[:sampled].sort().values, None)

    def forward(self):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="*", default=["tiny", "iresnet50"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, batch {args.batch_size}, {torch.get_num_threads()} threads; medians of {args.repeats}, ms")
    print(f"{'network':<10}{'buffers':>9}{'step':>10}{'buf copy':>10}{'buf finite':>11}{'grad norm':>10}{'overhead':>10}")
    for network in args.networks:
        model = build_backbone(network, 512, 0.0, 112).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runner = DDPRunner(model, optimizer, wrap=False)
        images = torch.randn(args.batch_size, 3, 112, 112, device=device)
        head = _Head(8, 512, 4, device)
        rollback = StepRollback(model, head, torch.optim.SGD(head.parameters(), lr=0.1), False)

        def step():
            model(images).square().mean().backward()
            optimizer.step()

        step()  # warm-up, and gradients for the norm below
        step_ms = median_ms(step, args.repeats, device)
        copy_ms = median_ms(rollback.begin, args.repeats * 20, device)
        finite_ms = median_ms(rollback.buffers_finite, args.repeats * 20, device)
        norm_ms = median_ms(runner.gradients_finite, args.repeats * 20, device)
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        overhead = (copy_ms + finite_ms + norm_ms) / step_ms
        print(f"{network:<10}{buffer_bytes / 1e6:>8.2f}M{step_ms:>10.1f}{copy_ms:>10.3f}{finite_ms:>11.3f}"
              f"{norm_ms:>10.3f}{overhead:>9.2%}")
        del model, optimizer, runner, rollback

    rows = args.classes // args.ranks
    sampled = int(rows * args.sample_rate)
    head = _Head(rows, 512, sampled, device)
    head_optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head_optimizer.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)
    rollback = StepRollback(torch.nn.Identity(), head, head_optimizer, True)
    copy_rows_ms = median_ms(lambda: rollback._snapshot_rows(head, (), None), args.repeats, device)
    check_ms = median_ms(lambda: non_finite_names([("weight", head.weight),
                                                   ("momentum", head_optimizer.state[head.weight]["momentum_buffer"])]),
                         args.repeats, device)
    print(f"\nhead shard {rows:,} x 512 ({args.classes:,} classes / {args.ranks} ranks), {sampled:,} sampled rows:")
    print(f"  head rows copy per step (weight + momentum rows): {copy_rows_ms:.2f} ms")
    print(f"  finiteness check per save (weight + momentum, {2 * rows * 512 * 4 / 1e9:.2f} GB): {check_ms:.1f} ms")


if __name__ == "__main__":
    main()
