"""Where a training process runs: the process group, its rank and device, and the seeds.

    runtime = init_runtime()        # joins torchrun's group when launched by torchrun, else alone
    seed_everything(config.seed, runtime.rank)
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pfc.distributed.collectives import get_rank, get_world_size
from pfc.distributed.fault import init_process_group


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, local rank and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(timeout_minutes: float = 30.0) -> Runtime:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set), else run alone.

    Backend: NCCL with one GPU per local rank when CUDA is available, with gloo beside it for
    the few CPU tensors the trainer exchanges (the per-step fault flags); gloo on CPU otherwise.
    An already initialised default group is reused.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", datetime.timedelta(minutes=timeout_minutes))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Runtime(get_rank(), get_world_size(), local_rank, device)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch; the rank is mixed in so that ranks draw different augmentations."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
