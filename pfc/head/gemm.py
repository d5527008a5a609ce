"""The head's GEMMs against centers stored in a narrow type, with fp32 results.

The centers may be stored in bf16 or fp16 (``PartialFC(dtype=...)``); features, logits, softmax
statistics and gradients stay fp32. Every product that involves the centers goes through one
:class:`StorageGemm`, which decides how, once per step:

- **fp32 (or fp64) storage**: a plain ``torch.mm`` in that type.
- **narrow storage on a GPU** (any device but the CPU; also ``meta`` and fake CUDA tensors, so the
  capacity planner sees the real kernels): ``torch.mm(a, b, out_dtype=torch.float32)`` (and
  ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` to accumulate): both
  operands in the storage type (the fp32 one is rounded to it), fp32 accumulation, fp32 output.
  Rounding the fp32 operand costs ≈ 2⁻⁹ relative per element, ≈ 2⁻⁹/√D on a cosine (1e-4 at
  D = 512, 0.006 of a logit at s = 64); the output is never rounded to the narrow type.
- **narrow storage on the CPU**: ``mm(out_dtype=)`` is not implemented there, and a bf16 GEMM
  with a bf16 output (≈ 3.5× faster with AMX) rounds each cosine to 8 bits, ≈ 0.1 of a logit at
  s = 64: not acceptable. The chunk's rows are upcast to fp32 into a scratch block and multiplied
  in fp32: exact fp32 arithmetic on the stored values. Measured at 2048 × 512 × 1024, one thread:
  the upcast is 0.5 ms beside a 43 ms GEMM (≈ 1 %); see docs/benchmarks.md.
"""
from __future__ import annotations

import torch

from pfc.head.scratch import ScratchBlocks

_WIDE = (torch.float32, torch.float64)
# torch's CUDA addmm(out_dtype=float32) first required ``self`` in the operands' type and later
# accepted an fp32 one: tried once, then the product and its addition as two ops (the same values)
_ADDMM_INTO_FP32 = True


class StorageGemm:
    """GEMMs between centers stored in ``storage_dtype`` and fp32 tensors, with fp32 results
    (module docstring). ``rows(...)`` turns a chunk of centers into the GEMM operand,
    ``operand(...)`` does the same for the fp32 side, ``mm(a, b, out)`` multiplies."""

    def __init__(self, storage_dtype: torch.dtype, device: torch.device, scratch: ScratchBlocks):
        self.storage_dtype = storage_dtype
        self.narrow = storage_dtype not in _WIDE
        # a narrow GEMM with an fp32 output exists everywhere but on the CPU
        self.native = self.narrow and torch.device(device).type != "cpu"
        self.scratch = scratch

    def rows(self, rows: torch.Tensor, name: str = "rows_fp32") -> torch.Tensor:
        """A chunk of stored centers as a GEMM operand: itself, or upcast into a scratch block
        (narrow storage on the CPU)."""
        if rows.dtype in _WIDE or self.native:
            return rows
        return self.scratch.get(name, rows.shape[0], rows.new_empty((0, rows.shape[1]), dtype=torch.float32)) \
            .copy_(rows)

    def operand(self, tensor: torch.Tensor) -> torch.Tensor:
        """An fp32 tensor as the other GEMM operand: rounded to the storage type when the GEMM
        runs in it (narrow storage on a GPU), else itself."""
        return tensor.to(self.storage_dtype) if self.native else tensor

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = a·b`` in fp32 (``out`` fp32); ``a`` and ``b`` from :meth:`rows` / :meth:`operand`."""
        if a.dtype in _WIDE:
            return torch.mm(a, b, out=out)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)

    def addmm_(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``out += a·b`` in fp32: one GEMM accumulating into ``out`` (narrow operands:
        ``addmm(out_dtype=float32)``, the GEMM's epilogue adds ``out``; no ``[n, m]`` product
        block and no second pass)."""
        global _ADDMM_INTO_FP32
        if a.dtype in _WIDE:
            return out.addmm_(a, b)
        if _ADDMM_INTO_FP32:
            try:
                return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            except RuntimeError as error:   # an fp32 ``self`` beside narrow operands: refused by older CUDA builds
                if "dtype" not in str(error):
                    raise
                _ADDMM_INTO_FP32 = False
        return out.add_(torch.mm(a, b, out_dtype=torch.float32))
