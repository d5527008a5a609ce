"""Learning-rate schedule per optimizer step: linear warmup, then polynomial or cosine decay.

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(...))
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    warmup (step < warmup_steps): (step + 1) / warmup_steps;
    then with progress p = (step − warmup_steps) / (total_steps − warmup_steps) ∈ [0, 1]:
      poly:     r + (1 − r)·(1 − p)^power
      cosine:   r + (1 − r)·(1 + cos(π·p)) / 2
      constant: 1
    where r = min_lr / lr (the floor as a fraction of the base lr).
    """

    total_steps: int
    warmup_steps: int = 0
    kind: str = "poly"
    power: float = 2.0
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.kind == "poly":
            decay = (1.0 - progress) ** self.power
        elif self.kind == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown lr schedule {self.kind!r} (poly, cosine, constant)")
        return self.min_ratio + (1.0 - self.min_ratio) * decay
