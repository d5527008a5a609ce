"""Learning-rate schedule per optimizer step: linear warmup, then polynomial or cosine decay.

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(...))

A schedule may start late (``start_step``): a backbone frozen for its first steps
(``--freeze_backbone_steps``) has a multiplier of 0 there, and its warmup and decay span the
steps after them, while the head's schedule spans the whole run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("poly", "cosine", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    before the start (step < start_step): 0; then with s = step − start_step and the span
    T = total_steps − start_step:
    warmup (s < warmup_steps): (s + 1) / warmup_steps;
    then with progress p = (s − warmup_steps) / (T − warmup_steps) ∈ [0, 1]:
      poly:     r + (1 − r)·(1 − p)^power
      cosine:   r + (1 − r)·(1 + cos(π·p)) / 2
      constant: 1
    where r = min_lr / lr (the floor as a fraction of the base lr). ValueError at construction for
    an unknown kind, start_step < 0, warmup_steps outside [0, T), power < 0 or r outside [0, 1].
    """

    total_steps: int
    warmup_steps: int = 0
    kind: str = "poly"
    power: float = 2.0
    min_ratio: float = 0.0
    start_step: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"lr schedule kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.start_step < 0:
            raise ValueError(f"start_step={self.start_step} must be >= 0")
        span = self.total_steps - self.start_step
        if not 0 <= self.warmup_steps < span:
            after = f" after the first {self.start_step} (start_step)" if self.start_step else ""
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, {max(span, 0)}), "
                             f"fewer than the run's {self.total_steps} training steps (total_steps){after}")
        if not self.power >= 0:
            raise ValueError(f"lr schedule power={self.power} must be >= 0")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio={self.min_ratio} (the lr floor over the base lr) must be in [0, 1]")

    def __call__(self, step: int) -> float:
        step -= self.start_step
        if step < 0:
            return 0.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.start_step - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.kind == "poly":
            decay = (1.0 - progress) ** self.power
        else:  # cosine
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay
