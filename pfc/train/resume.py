"""The trainer's checkpoint policy: when to save, what ``--resume`` means, where to continue."""
from __future__ import annotations

import os

from pfc.distributed.agree import broadcast_object, run_on_every_rank
from pfc.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from pfc.train.config import TrainConfig
from pfc.train.runtime import Runtime, seed_everything
from pfc.train.state import TrainState


def save_train_checkpoint(state: TrainState, config: TrainConfig) -> str:
    """Collective: write ``OUTPUT/checkpoint-STEP`` atomically, keep the newest ``keep_checkpoints``."""
    return str(save_checkpoint(config.output, state, keep_last=config.checkpoint.keep))


def resume_request(config: TrainConfig) -> str:
    """``config.checkpoint.resume``; after a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) an empty one means "auto"."""
    if not config.checkpoint.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return "auto"
    return config.checkpoint.resume


def restore_train_state(state: TrainState, config: TrainConfig, runtime: Runtime) -> str | None:
    """Load the checkpoint the config asks for (if any) into ``state``; returns its path or None.

    Rank 0 resolves the request (``auto``: the newest complete checkpoint), so every rank loads
    the same one. A checkpoint from another world size continues at the same number of samples
    into the epoch (``batch_in_epoch`` scaled by old/new world size) with freshly seeded RNGs.
    """
    request = resume_request(config)
    if not request:
        return None
    path = run_on_every_rank(lambda: resolve_resume(request, config.output) if runtime.is_main else None,
                             f"resuming from {request!r}")
    path = broadcast_object(path)
    if path is None:
        if runtime.is_main:
            print(f"resume auto: no complete checkpoint in {config.output}; starting fresh")
        return None
    info = load_checkpoint(path, state)
    progress = info.progress
    state.step, state.epoch = int(progress["step"]), int(progress["epoch"])
    state.skipped_steps = int(progress.get("skipped_steps", 0))
    position = int(progress["batch_in_epoch"]) * info.saved_world_size // runtime.world_size
    position = min(position, state.steps_per_epoch * config.optim.grad_accumulation)
    state.batch_in_epoch = position - position % config.optim.grad_accumulation
    if not info.rng_restored:
        seed_everything(config.seed + state.step, runtime.rank)
    if runtime.is_main:
        print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return str(path)
