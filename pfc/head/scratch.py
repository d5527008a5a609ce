"""Reusable scratch blocks: freshly allocated memory costs a page fault per 4 KiB, every step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pfc.torch_private import storage_use_count


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


@dataclass(frozen=True)
class KeptRows:
    """The sampled center rows a forward gathered, kept for its backward; ``token`` says which
    forward of the workspace they belong to."""

    rows: torch.Tensor
    token: int


class Workspace(ScratchBlocks):
    """The sharded softmax's scratch blocks, reused across chunks and steps, the center-gradient
    memory, and the sampled rows kept from a forward for its backward.

    The center-gradient block is handed out as ``weight.grad``; a later backward reuses its
    memory only when nothing else holds it any more (after ``zero_grad``). Only the storage is
    kept here, so that autograd can adopt each step's gradient tensor without copying it.
    """

    def __init__(self):
        super().__init__()
        self.gradient_storage = None
        self.gradient_users: int | None = None
        self.kept_token = 0   # which forward the kept rows belong to

    def gradient(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A fresh ``[rows, D]`` tensor for the center gradient, on recycled memory when unshared."""
        shape = (rows, *like.shape[1:])
        needed = math.prod(shape) * like.element_size()
        storage = self.gradient_storage
        if (storage is not None and storage.nbytes() >= needed and storage.device == like.device
                and self.gradient_users is not None and storage_use_count(storage) == self.gradient_users):
            return like.new_empty(0).set_(storage, 0, shape)
        block = like.new_empty(shape)
        self.gradient_storage = block.untyped_storage()
        users = storage_use_count(self.gradient_storage)
        self.gradient_users = None if users is None else users - 1  # the holders besides ``block``
        return block

    def keep_rows(self, rows: int, like: torch.Tensor) -> KeptRows:
        """A ``[rows, D]`` block for the rows a forward gathers, valid until the next forward."""
        self.kept_token += 1
        return KeptRows(self.get("kept_rows", rows, like), self.kept_token)

    def kept(self, kept: KeptRows | None) -> torch.Tensor | None:
        """``kept.rows`` while no later forward has reused the block, else None."""
        return kept.rows if kept is not None and kept.token == self.kept_token else None
