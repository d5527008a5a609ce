"""Everything that changes during training, in one place: what a checkpoint saves and restores."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pfc.train.runners.base import BackboneRunner


@dataclass
class TrainState:
    """The training state; :func:`pfc.train.checkpoint.save_checkpoint` writes it and
    :func:`pfc.train.checkpoint.load_checkpoint` restores it in place.

    - ``runner``: the backbone in its data-parallel engine (it names its own checkpoint parts);
    - ``head`` and ``head_optimizer``: the Partial-FC head (``weight`` [num_local, D],
      ``class_start``, ``num_local``, ``num_classes``, ``embedding_size``) and its optimizer; the
      head's tensors and the optimizer state of ``head.weight``'s shape are row-sharded
      (resharded on load), the rest is replicated;
    - ``schedulers``: name → an object with ``state_dict()``/``load_state_dict()`` (LR
      schedulers); a LambdaLR keeps its current lambdas on load, so the schedule follows the
      current config (e.g. a longer ``max_steps``) while its counters are restored;
    - ``config``: the resolved configuration as a JSON-ready dict (written into the manifest);
    - the position: ``step`` (optimizer steps done), ``epoch``, ``batch_in_epoch`` (micro-batches
      consumed in the epoch), ``skipped_steps`` (updates skipped for a non-finite loss);
      ``total_steps`` and ``steps_per_epoch`` are the run's plan (not saved).
    """

    runner: BackboneRunner
    head: nn.Module
    head_optimizer: torch.optim.Optimizer
    schedulers: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    total_steps: int = 0
    steps_per_epoch: int = 0
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0

    def progress(self) -> dict[str, int]:
        """The position, as saved in a checkpoint's manifest."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped_steps": self.skipped_steps}
