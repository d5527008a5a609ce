"""Set-up shared by every test module.

Triton's interpreter: ``triton`` reads ``TRITON_INTERPRET`` when it is imported (its own library
functions are ``@triton.jit`` functions made then), and torch imports ``triton`` on its own (e.g.
``torch._dynamo`` probes for it, which ``torch.optim`` and custom ops load), so the variable must
be set before any test runs: here, on a machine without CUDA, where Triton kernels can only run
in the interpreter on CPU tensors (:mod:`tests.triton_interpret`). On a CUDA machine it is left
alone: the kernels compile for the device, and the interpreter tests skip.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
