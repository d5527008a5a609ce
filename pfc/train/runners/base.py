"""What the training loop asks of the data-parallel backbone, whichever engine runs it.

    runner = build_runner(config, runtime, model, optimizer)   # DDPRunner or DeepSpeedRunner
    for each micro-batch:
        loss = runner.forward_backward(images, labels, head, last_micro)
    found_inf = guard.found_inf(loss, runner.gradients_finite(), …)   # the step guard's mask
    applied = runner.step(head_optimizer, found_inf)   # masked: nothing changes where found_inf

The runner owns the engine's policy: how micro-batches accumulate, loss scaling, clipping,
whether the head may update its centers inside its backward, and which parts of a checkpoint
are the backbone's (and how to read a checkpoint the other engine wrote). The loop and the
checkpoint code never ask which engine runs.

Host synchronisation: the DDP runner decides on the device (``gradients_finite`` and ``step``'s
result are 0-d tensors; its optimizer skips on ``found_inf`` as torch's fused optimizers do), so a
steady-state step waits for the device nowhere. DeepSpeed's engine reads its overflow flag on
the host inside its own step; its runner decides on the host too (Python bools).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class BackboneRunner(Protocol):
    """The backbone's engine seen from the loop and the checkpoint code.

    ``engine`` names it in checkpoints ("ddp", "deepspeed"); ``model`` is the bare network
    (evaluation, export); ``optimizer`` the torch optimizer whose ``param_groups`` the LR
    schedule sets; ``head_update_in_backward`` whether the head's loss reaches ``backward``
    unscaled and undivided, one backward per forward (then the head may update its centers
    inside its backward, see :meth:`pfc.head.PartialFC.optimizer`).
    """

    engine: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    head_update_in_backward: bool

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode of the network (evaluation while frozen, whatever ``mode``)."""

    def set_frozen(self, frozen: bool) -> None:
        """Hold the backbone or let it train: while frozen, :meth:`forward_backward` embeds in
        eval mode without autograd and back-propagates through the head only, and :meth:`step`
        leaves the backbone and its optimizer as they are (a fine-tuning run's first steps,
        :mod:`pfc.train.finetune`)."""

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                         last_micro: bool) -> torch.Tensor:
        """Embed ``images``, compute ``head(embeddings, labels)`` and back-propagate it; returns
        this micro-batch's share of the step loss (divided by the accumulation steps), detached.
        ``last_micro``: the last micro-batch of the step (gradients are all-reduced then)."""

    def gradients_finite(self) -> torch.Tensor | bool | None:
        """After the last micro-batch: whether this rank's backbone gradients are free of inf/NaN,
        a 0-d bool device tensor (part of the step guard's mask, no host synchronisation); True or
        None where the engine checks them itself."""

    def step(self, head_optimizer: torch.optim.Optimizer, found_inf: torch.Tensor | None = None
             ) -> torch.Tensor | bool:
        """Clip the backbone gradient and step the backbone and the head optimizers, then clear
        the gradients; where ``found_inf`` (the guard's 0-d mask, the same on every rank) is
        nonzero, neither optimizer changes anything. Returns whether the update was applied (a 0-d
        bool tensor, or a bool where the engine decides on the host): False where ``found_inf``
        or the engine itself (an fp16 overflow) skipped it; the head's update is then skipped too."""

    def checkpoint_state(self) -> dict[str, Any]:
        """The backbone's parts of the checkpoint's state tree (names → state dicts)."""

    def save_engine_state(self, directory: Path) -> None:
        """Collective: write what the engine keeps outside the state tree into ``directory``."""

    def parts_to_load(self, saved_engine: str) -> set[str]:
        """Which parts of a checkpoint written by ``saved_engine`` this runner reads."""

    def restore(self, parts: dict[str, Any], engine_directory: Path, saved_engine: str,
                same_world_size: bool) -> bool:
        """Load the backbone from ``parts`` (those of :meth:`parts_to_load`) or from the engine
        files in ``engine_directory`` (see :meth:`save_engine_state`); True when the backbone
        optimizer state was restored too (else it starts fresh)."""
