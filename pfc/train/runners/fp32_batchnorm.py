"""BatchNorm in fp32 inside a backbone whose parameters an engine keeps in bf16 or fp16.

    engine = deepspeed.initialize(...)       # bf16: parameters cast to bf16, buffers left in fp32
    keep_batchnorm_in_fp32(engine.module)    # every BatchNorm layer: fp32 statistics and arithmetic

A DeepSpeed engine with bf16 (or fp16) enabled casts the module's parameters to that dtype and
leaves its buffers as they are (deepspeed 0.19). A BatchNorm layer then holds a bf16 scale and
shift beside fp32 running statistics, and ``F.batch_norm`` refuses the mix ("expected scalar type
BFloat16 but found Float"). Casting the statistics to bf16 as well would run, but a running
variance in bf16 keeps 8 significant bits: a momentum-0.1 update smaller than 1/256 of it is lost
at rounding, so the statistics that evaluation normalises with would stall and drift.

The choice here is the one of torch's autocast and apex's O2 mode: BatchNorm in fp32.

- The running mean and variance are fp32 buffers (made fp32 here if an engine cast them), updated
  in fp32, checkpointed in fp32.
- The layer normalises with its scale and shift upcast to fp32 for the call: the bf16 values
  exactly (the fp32 master weights are the optimizer's, as for every other layer), and their
  gradients flow back to the bf16 parameters through the cast.
- The input stays in the engine's dtype: torch's mixed-type kernel (a bf16/fp16 input with fp32
  parameters and statistics, on the CPU and on CUDA, what autocast runs) computes the batch
  statistics and the normalisation in fp32 and returns the input's dtype, which the next layer's
  bf16 weights expect.

A layer's ``forward`` is replaced on the instance (:func:`keep_batchnorm_in_fp32`); its class,
parameters, buffers and ``state_dict`` stay what they were, so checkpoints and ``backbone.pt``
do not change.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fp32(parameter: torch.Tensor | None) -> torch.Tensor | None:
    return None if parameter is None else parameter.float()


def batchnorm_forward_in_fp32(layer: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """``layer``'s BatchNorm with fp32 scale, shift and statistics on an input of any float dtype
    (the output has the input's dtype). The same semantics as torch's BatchNorm layers: in
    training mode the batch statistics normalise and, when ``track_running_stats``, update the
    running ones (``r ← (1 − m)·r + m·batch``, ``m = momentum``, or ``1/num_batches_tracked`` when
    ``momentum`` is None); in evaluation mode the running statistics normalise when there are any."""
    factor = 0.0 if layer.momentum is None else layer.momentum
    update = layer.training and layer.track_running_stats
    if update and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.add_(1)
        if layer.momentum is None:   # a cumulative average (a host read; pfc's layers have a momentum)
            factor = 1.0 / float(layer.num_batches_tracked)
    use_batch = layer.training or (layer.running_mean is None and layer.running_var is None)
    pass_running = not layer.training or layer.track_running_stats
    return F.batch_norm(input, layer.running_mean if pass_running else None,
                        layer.running_var if pass_running else None, _fp32(layer.weight), _fp32(layer.bias),
                        use_batch, factor, layer.eps)


def keep_batchnorm_in_fp32(module: nn.Module) -> int:
    """Make every BatchNorm layer of ``module`` compute in fp32 whatever its parameters' dtype (see
    the module docstring): its floating-point running statistics become fp32 (in place of the
    buffers, on their device) and its ``forward`` :func:`batchnorm_forward_in_fp32`. Returns the
    number of layers changed (a layer already changed is not counted again)."""
    changed = 0
    for layer in module.modules():
        if not isinstance(layer, BATCHNORM_TYPES) or getattr(layer, "_pfc_fp32_batchnorm", False):
            continue
        for name in ("running_mean", "running_var"):
            buffer = getattr(layer, name)
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                setattr(layer, name, buffer.float())
        layer.forward = types.MethodType(batchnorm_forward_in_fp32, layer)
        layer._pfc_fp32_batchnorm = True
        changed += 1
    return changed
