"""The backbone under DistributedDataParallel (or alone on one rank), with autocast and fp16 scaling.

The step decides on the device: the gradient norm's finiteness is a 0-d tensor, clipping uses that
norm as it is (``clip_grads_with_norm_``), and both optimizers skip a bad step through their
``found_inf`` attribute (torch's fused SGD/AdamW, as under GradScaler, and the head's
SparseRowSGD), so a step makes no host synchronisation. An optimizer that cannot skip on the
device is stepped after one host read of the mask.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfc.distributed.collectives import all_reduce_, get_world_size
from pfc.train.runners.deepspeed import read_module_weights

ENGINE = "ddp"


class DDPRunner:
    """A backbone made data-parallel by DDP (a :class:`pfc.train.runners.base.BackboneRunner`).

    The gradient is all-reduced only on the last micro-batch of a step (``no_sync`` before it).
    ``autocast_dtype`` (fp16/bf16 on GPU) wraps the backbone's forward; the head always computes
    in float32. ``grad_scaler`` (fp16) scales the loss of backbone and head alike and unscales both
    before clipping (the head's narrow center gradients in float32 inside its update:
    :meth:`_unscale_head`); a step whose backbone or center gradients (on any rank) overflow is
    skipped by both optimizers (on the device) and the scale backs off. ``wrap=False`` keeps the
    bare module (one rank, or a test that averages itself). While :meth:`set_frozen` holds the
    backbone (a fine-tuning run's first steps) only the head trains.
    """

    engine = ENGINE

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float = 0.0,
                 grad_accumulation: int = 1, autocast_dtype: torch.dtype | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, wrap: bool | None = None):
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.grad_accumulation = grad_accumulation
        self.autocast_dtype = autocast_dtype
        self.grad_scaler = grad_scaler
        if wrap is None:
            wrap = get_world_size() > 1
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        self.network = nn.parallel.DistributedDataParallel(model, device_ids=device_ids) if wrap else model
        # the head's loss reaches its backward as it is: no loss scale, no division by micro-batches
        self.head_update_in_backward = grad_accumulation == 1 and grad_scaler is None
        self._grad_norm: torch.Tensor | None = None  # of this step's gradients, when gradients_finite computed it
        self._probe: OverflowProbe | None = None     # the head's overflow, as GradScaler sees it
        self.training, self.frozen = True, False
        prime_momentum(optimizer)

    def train(self, mode: bool = True) -> None:
        self.training = mode
        self.network.train(mode and not self.frozen)

    def set_frozen(self, frozen: bool) -> None:
        """Hold the backbone (``frozen``) or let it train: while frozen it runs in eval mode
        (BatchNorm uses and keeps its running statistics, no dropout) under ``no_grad`` outside
        DDP (no backward, no gradient, no all-reduce), and :meth:`step` neither clips nor steps
        its optimizer; the head trains as always (see :mod:`pfc.train.finetune`)."""
        if frozen != self.frozen:
            self.frozen = frozen
            self.train(self.training)

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def forward_backward(self, images, labels, head, last_micro):
        if self.frozen:
            return self._head_backward(images, labels, head)
        wrapped = isinstance(self.network, nn.parallel.DistributedDataParallel)
        sync = contextlib.nullcontext() if last_micro or not wrapped else self.network.no_sync()
        with sync:
            with self._autocast(images.device):
                embeddings = self.network(images)
            loss = head(embeddings.float(), labels) / self.grad_accumulation
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
            else:
                loss.backward()
        return loss.detach()

    def _head_backward(self, images, labels, head):
        """A frozen backbone's micro-batch: embeddings without autograd, the head's backward only."""
        with torch.no_grad(), self._autocast(images.device):
            embeddings = self.model(images)
        loss = head(embeddings.float(), labels) / self.grad_accumulation
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()
        return loss.detach()

    def gradients_finite(self) -> torch.Tensor | None:
        """Whether this rank's backbone gradients (all-reduced after the last micro-batch) are all
        finite: a 0-d bool device tensor from their total 2-norm (one pass, kept for the clipping
        of :meth:`step`). None with fp16 loss scaling (an overflow is the scaler's to skip, see
        :meth:`step`) or without gradients."""
        self._grad_norm = None
        if self.grad_scaler is not None:
            return None
        self._grad_norm = self._gradient_norm()
        return None if self._grad_norm is None else torch.isfinite(self._grad_norm)

    def _gradient_norm(self) -> torch.Tensor | None:
        """The total 2-norm of the backbone's gradients (None when it has none)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return nn.utils.get_total_norm(grads) if grads else None

    def step(self, head_optimizer, found_inf=None):
        scaler = self.grad_scaler
        if scaler is not None:  # unscaled on the device; the scaler records its own overflow check
            scaler.unscale_(self.optimizer)
            head_overflow = self._unscale_head(head_optimizer)
            self._grad_norm = self._gradient_norm()
            if self._grad_norm is not None:
                # one decision for both optimizers, the same on every rank (the backbone's gradients
                # are all-reduced): an fp16 overflow skips the head's update too
                overflow = (~torch.isfinite(self._grad_norm)).to(torch.float32)
                found_inf = overflow if found_inf is None else torch.maximum(found_inf, overflow)
            if head_overflow is not None:
                found_inf = head_overflow if found_inf is None else torch.maximum(found_inf, head_overflow)
        if not self.frozen:  # frozen: no backbone gradient, its optimizer (state, step count) left as it is
            if self.grad_clip > 0 and self._grad_norm is not None:  # the norm measured once
                nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, self._grad_norm)
            elif self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            masked_step(self.optimizer, found_inf)
        try:
            masked_step(head_optimizer, found_inf)
        finally:
            if scaler is not None and unscales_in_update(head_optimizer):
                head_optimizer.grad_unscale = None
        if scaler is not None:
            scaler.update()  # backs off the scale after an overflow it recorded in unscale_
        self._grad_norm = None
        self.optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        return True if found_inf is None else found_inf == 0

    def _unscale_head(self, head_optimizer) -> torch.Tensor | None:
        """Unscale the head's gradients for its step; returns its overflow flag (a 0-d float32
        device tensor, the same on every rank) or None when the scaler's own check decides (an
        optimizer without :func:`unscales_in_update`).

        A head optimizer that unscales inside its update (:func:`unscales_in_update`: the head's
        SparseRowSGD) gets the scale's inverse as a device tensor (``grad_unscale``: its narrow
        center gradients are multiplied in float32, where GradScaler.unscale_ refuses fp16
        gradients and would unscale them in their own type) and checks its gradients itself
        (:meth:`SparseRowSGD.nonfinite_gradients`). The ranks' flags are all-reduced over the
        default group, the backbone's (each rank holds other centers: one skip decision for the
        replicated backbone, one scale on every rank; a 4-byte collective per step) and handed to the
        scaler through :class:`OverflowProbe`, so that :meth:`GradScaler.update` backs off the
        scale as for any overflow it found. Any other optimizer goes through ``unscale_``."""
        scaler = self.grad_scaler
        if not unscales_in_update(head_optimizer):
            scaler.unscale_(head_optimizer)
            return None
        overflow = head_optimizer.nonfinite_gradients()
        if overflow is None:   # no gradient here: this rank still joins the all-reduce
            device = next(p for group in head_optimizer.param_groups for p in group["params"]).device
            overflow = torch.zeros((), dtype=torch.float32, device=device)
        head_optimizer.grad_unscale = scaler.scale(
            torch.ones((), dtype=torch.float64, device=overflow.device)).reciprocal().float()
        all_reduce_(overflow, op=torch.distributed.ReduceOp.MAX)
        if self._probe is None or self._probe.device != overflow.device:
            self._probe = OverflowProbe(overflow.device)
        self._probe.report(overflow)
        scaler.unscale_(self._probe)
        return overflow

    def checkpoint_state(self) -> dict[str, Any]:
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {str(key): value for key, value in optimizer["state"].items()}
        state = {"backbone": self.model.state_dict(), "backbone_optimizer": optimizer}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def save_engine_state(self, directory: Path) -> None:
        return None  # everything is in the state tree

    def parts_to_load(self, saved_engine: str) -> set[str]:
        if saved_engine != ENGINE:
            return set()  # the weights come from the other engine's files (see restore)
        return {"backbone", "backbone_optimizer"} | ({"grad_scaler"} if self.grad_scaler is not None else set())

    def restore(self, parts, engine_directory, saved_engine, same_world_size):
        if saved_engine != ENGINE:  # DeepSpeed's optimizer layout is not torch's: weights only
            self.model.load_state_dict(read_module_weights(engine_directory))
            return False
        self.model.load_state_dict(parts["backbone"])
        optimizer = parts["backbone_optimizer"]
        self.optimizer.load_state_dict({**optimizer, "state": {int(key): value
                                                               for key, value in optimizer["state"].items()}})
        if self.grad_scaler is not None and "grad_scaler" in parts:
            self.grad_scaler.load_state_dict(parts["grad_scaler"])
        prime_momentum(self.optimizer)
        return True


def unscales_in_update(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` unscales its gradients inside its update (a ``grad_unscale``
    attribute, as :class:`pfc.head.optim.SparseRowSGD` has) and checks them itself
    (``nonfinite_gradients``)."""
    return hasattr(optimizer, "grad_unscale") and hasattr(optimizer, "nonfinite_gradients")


class OverflowProbe(torch.optim.Optimizer):
    """An optimizer that is never stepped, whose one parameter's gradient is 0 or inf: handed to
    :meth:`GradScaler.unscale_`, it makes the scaler record an overflow found elsewhere (the head's
    own check, :meth:`DDPRunner._unscale_head`), through public API only, so that
    :meth:`GradScaler.update` backs off (or grows) the scale as it would for its own finding."""

    def __init__(self, device: torch.device):
        super().__init__([torch.zeros((), dtype=torch.float32, device=device)], {})
        self.device = device

    def report(self, overflow: torch.Tensor) -> None:
        """Set the gradient from ``overflow`` (a 0-d float32 device tensor, nonzero = overflow): inf or 0."""
        param = self.param_groups[0]["params"][0]
        param.grad = torch.where(overflow != 0, math.inf, 0.0).to(torch.float32)

    def step(self, closure=None):
        raise RuntimeError("the overflow probe is not an optimizer to step")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours an ``optimizer.found_inf`` tensor on the device: torch's
    fused optimizers (what GradScaler relies on) and the head's SparseRowSGD (whose ``update_rows``
    takes a ``skip`` mask in the same release)."""
    if optimizer.defaults.get("fused"):
        return True
    update_rows = getattr(optimizer, "update_rows", None)
    return update_rows is not None and "skip" in inspect.signature(update_rows).parameters


def masked_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor | None) -> None:
    """``optimizer.step()``, changing nothing where ``found_inf`` (a 0-d tensor) is nonzero: on the
    device when the optimizer can (:func:`skips_on_device`), else after one host read of it."""
    if found_inf is None or not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
        optimizer.step()  # nothing to mask (no gradient: the head's centers were updated inside its backward)
    elif skips_on_device(optimizer):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None  # the caller clears it (SparseRowSGD's contract; torch reads None as unset)
    elif not bool(found_inf):  # a host synchronisation: this optimizer cannot skip on the device
        optimizer.step()


@torch.no_grad()
def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give a fused ``torch.optim.SGD`` with momentum zero momentum buffers before its first step.

    Its first step allocates the buffers uninitialised and lets the kernel fill them; when that
    step is skipped through ``found_inf`` they stay uninitialised and the next step reads garbage
    (torch 2.13, CPU). With zeros the first step computes ``momentum · 0 + grad = grad``, what an
    unprimed first step stores (dampening 0), bit for bit.
    """
    if not (isinstance(optimizer, torch.optim.SGD) and optimizer.defaults.get("fused")):
        return
    for group in optimizer.param_groups:
        if not group["momentum"]:
            continue
        if group["dampening"]:
            raise ValueError("a fused SGD with dampening cannot be primed (its first step skips the dampening)")
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
