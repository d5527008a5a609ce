"""Reusable scratch blocks: freshly allocated memory costs a page fault per 4 KiB, every step."""
from __future__ import annotations

import torch


class ScratchBlocks:
    """Named ``[rows, …]`` blocks kept across calls. ``get`` returns the first ``rows`` rows of the
    block for ``name``, allocating anew (at least ``min_rows`` rows) only when the block is too
    small or its trailing shape, dtype or device differ from ``like``'s."""

    def __init__(self, min_rows: int = 0):
        self.min_rows = min_rows
        self.blocks: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        block = self.blocks.get(name)
        if block is None or block.shape[0] < rows or block.shape[1:] != like.shape[1:] \
                or block.dtype != like.dtype or block.device != like.device:
            block = like.new_empty((max(rows, self.min_rows), *like.shape[1:]))
            self.blocks[name] = block
        return block[:rows]
