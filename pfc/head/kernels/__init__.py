"""The head's kernels, one interface per step, two implementations, chosen once per head.

Seams (each a small interface with the torch code as the reference and the CPU path, and a
Triton implementation for CUDA beside it):

- the softmax chunk: the forward epilogue of each chunk's GEMM (scale, target cells, inter-class
  filter, running max and sum of exps) and the backward prologue (the gradient block with the
  target terms);
- the row update: gather → momentum SGD (or AdamW) → rounding → scatter of the sampled rows, and the values
  the rollback needs;
- rounding fp32 values into bf16/fp16 storage.

``kernels`` (``PartialFC(kernels=...)``, the trainer's ``head.kernels``) names the implementation:
``"torch"``, ``"triton"``, or ``"auto"`` (Triton on CUDA tensors when ``triton`` imports, torch
everywhere else: the CPU, ``meta`` and the planner's simulated device). :func:`resolve_kernels`
turns that choice into ``"torch"`` or ``"triton"`` once, in ``PartialFC.__init__``, and the head
hands the name to its optimizer, so a head's forward, backward and update always run on one
implementation (bit-identical recompute and the filter depend on it).

Every Triton kernel is registered as a torch custom op in the ``pfc`` namespace with a fake
implementation (so the planner's simulated GPU runs the real code path) and declares its cost
(:mod:`pfc.head.kernels.costs`) for the planner's roofline.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Literal, get_args

import torch

KernelChoice = Literal["auto", "torch", "triton"]
KERNEL_CHOICES: tuple[str, ...] = get_args(KernelChoice)


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its interpreter on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_kernels(choice: str, device) -> str:
    """``"torch"`` or ``"triton"``: the implementation of the head's kernels on ``device``.

    - ``"auto"``: Triton on a CUDA device when ``triton`` imports, torch everywhere else;
    - ``"torch"``: always torch;
    - ``"triton"``: Triton; ValueError when it cannot run there: ``triton`` missing on a CUDA
      device, or CPU tensors without ``TRITON_INTERPRET=1`` (the interpreter is the only way a
      Triton kernel runs on the CPU). Any other device type (``meta``, the planner's simulated
      GPU) is accepted: no kernel is launched there, the ops' fake implementations serve.
    """
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels={choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    device_type = torch.device(device).type if device is not None else "cpu"
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device_type == "cuda" and triton_available() else "torch"
    if device_type in ("cuda", "cpu") and not triton_available():
        raise ValueError("kernels='triton' needs the triton package (pip install triton), which does not import here")
    if device_type == "cpu" and not triton_interpreted():
        raise ValueError("kernels='triton' on CPU tensors runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
                         "(or use kernels='torch', the CPU path)")
    return "triton"
