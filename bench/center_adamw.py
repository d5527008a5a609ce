"""Learning with AdamW on the centers: pfc's row-sparse ("lazy") AdamW against dense torch.optim.AdamW,
at ρ = 1 and ρ = 0.1, and SGD at AdamW's learning rate (what the centers got before
``--head.optimizer``), on the same synthetic identities in one process.

    python bench/center_adamw.py [--classes 5000] [--per 8] [--held-out 3] [--dim 32] [--batch 128]
                                 [--epochs 3] [--lr 1e-3] [--weight-decay 0.1] [--seeds 0 1]

The identities live in feature space (fast enough to run every variant on a CPU): class ``c`` has a
random unit prototype ``p_c`` in ``--dim`` dimensions, its samples are ``p_c + σ·noise`` (σ = 1 /
sqrt(dim): the noise is as large as the prototype), ``--per`` for training and ``--held-out`` more
for testing. A small MLP backbone (dim → 128 → dim, AdamW at ``--lr``/``--weight-decay``, the
ViT recipes' optimizer) feeds a PartialFC head (CosFace s = 32, m = 0.3, the centers initialised
as pfc does); every variant sees the same data order, seed and backbone optimizer and differs
only in the centers' optimizer:

- ``adamw-sparse``: ``head.adamw(lr, weight_decay)`` (pfc.head.adamw.SparseRowAdamW, what
  ``--head.optimizer adamw`` trains with);
- ``adamw-dense``: ``torch.optim.AdamW`` over the centers with the head's gradient made dense (at
  ρ < 1 it decays every center each step and keeps moving unsampled ones with their momentum);
- ``sgd``: ``head.optimizer(lr, momentum 0.9, weight_decay)``, the old behaviour under an AdamW recipe.

Prints a markdown table: the training loss (mean of the last 10 % of the steps), the held-out
accuracy (nearest center among all classes, mean over seeds; and per seed) and the wall time.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.head.margins import CosFace  # noqa: E402
from pfc.head.partial_fc import PartialFC  # noqa: E402

VARIANTS = ("adamw-sparse", "adamw-dense", "sgd")


def make_data(classes: int, per: int, held_out: int, dim: int, seed: int):
    """Training and held-out samples (features, labels) of ``classes`` identities."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.nn.functional.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    sigma = 1.0 / math.sqrt(dim)

    def samples(count):
        labels = torch.arange(classes).repeat_interleave(count)
        return prototypes[labels] + sigma * torch.randn(labels.numel(), dim, generator=generator), labels

    return samples(per), samples(held_out)


def train(variant: str, sample_rate: float, center_lr: float, data, args, seed: int) -> dict:
    (features, labels), (test_features, test_labels) = data
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(args.dim, 128), torch.nn.ReLU(), torch.nn.Linear(128, args.dim))
    head = PartialFC(args.classes, args.dim, margin=CosFace(s=32.0, m=0.3), sample_rate=sample_rate, seed=seed)
    backbone_optimizer = torch.optim.AdamW(backbone.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if variant == "adamw-sparse":
        center_optimizer = head.adamw(lr=center_lr, weight_decay=args.weight_decay)
    elif variant == "adamw-dense":
        center_optimizer = torch.optim.AdamW([head.weight], lr=center_lr, weight_decay=args.weight_decay)
    else:
        center_optimizer = head.optimizer(lr=center_lr, momentum=0.9, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(seed)
    losses, step, started = [], 0, time.perf_counter()
    for _ in range(args.epochs):
        permutation = torch.randperm(labels.numel(), generator=order)
        for start in range(0, labels.numel() - args.batch + 1, args.batch):
            batch = permutation[start:start + args.batch]
            head.set_iteration(step)
            loss = head(backbone(features[batch]), labels[batch])
            loss.backward()
            if variant == "adamw-dense" and head.weight.grad.is_sparse:
                head.weight.grad = head.weight.grad.to_dense()
            backbone_optimizer.step()
            center_optimizer.step()
            backbone_optimizer.zero_grad()
            center_optimizer.zero_grad()
            losses.append(float(loss.detach()))
            step += 1
    seconds = time.perf_counter() - started
    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(backbone(test_features), dim=1)
        centers = torch.nn.functional.normalize(head.weight.detach(), dim=1)
        accuracy = float((torch.argmax(embeddings @ centers.t(), dim=1) == test_labels).float().mean())
    tail = losses[-max(1, len(losses) // 10):]
    return {"loss": sum(tail) / len(tail), "accuracy": accuracy, "seconds": seconds, "steps": step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=5000)
    parser.add_argument("--per", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=3)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--center-lrs", type=float, nargs="+", default=None,
                        help="the centers' learning rates to try (head.lr; default: --lr)")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.classes} identities × {args.per} training / {args.held_out} held-out samples, D = {args.dim}, "
          f"batch {args.batch}, {args.epochs} epochs, lr {args.lr:g}, wd {args.weight_decay:g}, seeds {args.seeds}")
    print("| ρ | centers' optimizer | centers' lr | training loss (last 10 %) | held-out accuracy | per seed | "
          "s per run |")
    print("|---|---|---|---|---|---|---|")
    data = {seed: make_data(args.classes, args.per, args.held_out, args.dim, seed) for seed in args.seeds}
    for rate in args.rates:
        for variant in args.variants:
            for center_lr in args.center_lrs or [args.lr]:
                runs = [train(variant, rate, center_lr, data[seed], args, seed) for seed in args.seeds]
                mean = {key: sum(run[key] for run in runs) / len(runs) for key in ("loss", "accuracy", "seconds")}
                per_seed = " / ".join(f"{100 * run['accuracy']:.2f}" for run in runs)
                print(f"| {rate:g} | {variant} | {center_lr:g} | {mean['loss']:.3f} | {100 * mean['accuracy']:.2f} % | "
                      f"{per_seed} | {mean['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
