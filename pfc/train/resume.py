"""The trainer's checkpoint policy: when to save, what ``--resume`` means, where to continue."""
from __future__ import annotations

import os

from pfc.distributed.agree import run_on_rank_zero
from pfc.train.checkpoint import load_checkpoint, save_checkpoint, select_checkpoint, store
from pfc.train.config import TrainConfig
from pfc.train.finite import check_state_finite
from pfc.train.runtime import Runtime, seed_everything
from pfc.train.state import TrainState


def save_train_checkpoint(state: TrainState, config: TrainConfig) -> str:
    """Collective: write ``OUTPUT/checkpoint-STEP`` atomically, keep the newest ``keep_checkpoints``;
    a state holding inf/NaN is refused on every rank first (:func:`pfc.train.finite.check_state_finite`)."""
    check_state_finite(state, f"saving the checkpoint of step {state.step}")
    return str(save_checkpoint(config.output, state, keep_last=config.checkpoint.keep))


def resume_request(config: TrainConfig) -> str:
    """``config.checkpoint.resume``; after a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) an empty one means "auto"."""
    if not config.checkpoint.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return "auto"
    return config.checkpoint.resume


def restore_train_state(state: TrainState, config: TrainConfig, runtime: Runtime) -> str | None:
    """Load the checkpoint the config asks for (if any) into ``state``; returns its path or None.

    The ranks resolve the request together (:func:`pfc.train.checkpoint.select_checkpoint`:
    ``auto`` is the newest complete and undamaged checkpoint, skipping damaged ones with a
    warning; an error listing each when there are checkpoints and none is usable; a path must
    be complete and undamaged), so every rank loads the same one. A checkpoint from another
    world size continues at the same number of samples into the epoch (``batch_in_epoch``
    scaled by old/new world size) with freshly seeded RNGs. Checkpoints newer than the one
    resumed from (``--resume PATH`` to an earlier step) are set aside as ``.superseded``: this run
    writes its own at those steps.
    """
    request = resume_request(config)
    if not request:
        return None
    path = select_checkpoint(request, config.output)
    if path is None:
        if runtime.is_main:
            print(f"resume auto: no checkpoint in {config.output}; starting fresh")
        return None
    info = load_checkpoint(path, state, check_content=False)  # select_checkpoint has just checked it
    progress = info.progress
    state.step, state.epoch = int(progress["step"]), int(progress["epoch"])
    run_on_rank_zero(lambda: store.set_aside_newer(config.output, state.step),
                     f"setting aside the checkpoints after step {state.step} in {config.output}")
    state.skipped_steps = int(progress.get("skipped_steps", 0))
    position = int(progress["batch_in_epoch"]) * info.saved_world_size // runtime.world_size
    position = min(position, state.steps_per_epoch * config.optim.grad_accumulation)
    state.batch_in_epoch = position - position % config.optim.grad_accumulation
    if not info.rng_restored:
        seed_everything(config.seed + state.step, runtime.rank)
    if runtime.is_main:
        print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return str(path)
