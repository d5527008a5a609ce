"""How many sampled centers one chunk of the fused softmax holds: 2,048 on the CPU, a byte budget
on a GPU.

On the CPU a chunk of 2,048 rows keeps its ``[S_c, B]`` blocks in cache and costs nothing per
chunk. On a GPU every chunk costs kernel launches (5–10 µs each), so a fixed row count makes the
launches per step grow with S; there the chunk is as large as a budget for its scratch blocks
allows, :data:`GPU_CHUNK_BUDGET_BYTES` (1 GiB), at

    bytes per chunk row = 3·4·columns + D·(storage + 8)

(``columns`` = B, 2B with MHE): three fp32 ``[S_c, columns]`` blocks (the logits or products,
the gradient, and one elementwise scratch block of the torch path), and per row the gathered
center in its storage type and two fp32 rows (its gradient, and the fp32 copy or update scratch).
The row count is rounded down to a multiple of 1,024 and never below the CPU's 2,048.

The issue's job (S = 362,500 sampled centers per rank, B = 1,024, D = 512, fp16 centers):
12,288 + 5,120 = 17,408 bytes per row → 61,440 rows per chunk → 6 chunks per step. With the
Triton kernels (:mod:`pfc.head.kernels.softmax_ops`) a chunk launches, in the forward: the row
gather 1, the inverse norms 3, the GEMM 1, ``s·r`` 1, ``pfc::chunk_forward`` 1 = 7; in the
backward (narrow storage gathers the rows again, the logits are recomputed at this size): the
gather 1, the GEMM 1, ``pfc::chunk_backward`` 1, the center-gradient GEMM 1, ``r·u`` 1, the
feature-gradient ``addmm`` 1 = 6, plus the row update's launches ``U`` (one fused kernel, which
adds the center gradient's radial term; with MHE or without the update in the backward the
``addcmul`` does: 7). 6·(13 + U) = 84 at U = 1, against ≈ 16,000 with 2,048-row
chunks and the torch path; the per-step fixed part (sampling, the target measure, the
collectives and their packing, the loss) is about 100 more: ≈ 190–250 in all, within the 400 the
issue asks for. Launches still grow with S, by 13 + U per 61,440 rows per GiB of budget (not
per 2,048 rows): the budget is the memory/launch trade-off, ``chunk_rows`` overrides it.
"""
from __future__ import annotations

import torch

CPU_CHUNK_ROWS = 2048
GPU_CHUNK_BUDGET_BYTES = 1 << 30
_ROW_MULTIPLE = 1024


def chunk_bytes_per_row(columns: int, embedding_size: int, storage_dtype: torch.dtype) -> int:
    """The scratch bytes one chunk row costs (module docstring)."""
    storage_bytes = torch.empty((), dtype=storage_dtype).element_size()
    return 3 * 4 * columns + embedding_size * (storage_bytes + 8)


def auto_chunk_rows(device, columns: int, embedding_size: int, storage_dtype: torch.dtype,
                    budget_bytes: int = GPU_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk: :data:`CPU_CHUNK_ROWS` on the CPU; on any other device (CUDA, ``meta``, the
    planner's simulated GPU) ``budget_bytes`` / :func:`chunk_bytes_per_row`, rounded down to a
    multiple of 1,024, at least :data:`CPU_CHUNK_ROWS`."""
    if torch.device(device).type == "cpu":
        return CPU_CHUNK_ROWS
    rows = budget_bytes // chunk_bytes_per_row(columns, embedding_size, storage_dtype)
    return max(CPU_CHUNK_ROWS, rows // _ROW_MULTIPLE * _ROW_MULTIPLE)
