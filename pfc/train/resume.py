"""The trainer's checkpoint policy: when to save, what ``--resume`` means, where to continue."""
from __future__ import annotations

import os
from pathlib import Path

from pfc.distributed.agree import run_on_rank_zero
from pfc.train.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint, select_checkpoint, store
from pfc.train.config import TrainConfig
from pfc.train.finite import check_state_finite
from pfc.train.runtime import Runtime, seed_everything
from pfc.train.state import TrainState

INIT_RECORD = "init_backbone"   # the key of the run's config dict that says where its weights came from


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


def checkpoint_to_resume(config: TrainConfig, runtime: Runtime) -> Path | None:
    """Collective: the checkpoint the config asks to resume from, or None for a fresh start.

    The ranks resolve the request together (:func:`pfc.train.checkpoint.select_checkpoint`:
    ``auto`` is the newest complete and undamaged checkpoint, skipping damaged ones with a
    warning; an error listing each when there are checkpoints and none is usable; a path must
    be complete and undamaged), so every rank loads the same one. Decided before the model is
    built: a fresh run may start from other weights (``--init_backbone``), a resumed one never."""
    request = resume_request(config)
    if not request:
        return None
    path = select_checkpoint(request, config.output)
    if path is None and runtime.is_main:
        print(f"resume auto: no checkpoint in {config.output}; starting fresh")
    return path


def restore_train_state(state: TrainState, config: TrainConfig, runtime: Runtime,
                        path: Path | None) -> LoadedCheckpoint | None:
    """Load the checkpoint at ``path`` (from :func:`checkpoint_to_resume`; None: nothing to do)
    into ``state``; returns what was loaded.

    A checkpoint from another world size continues at the same number of samples into the epoch
    (``batch_in_epoch`` scaled by old/new world size) with freshly seeded RNGs. Checkpoints newer
    than the one resumed from (``--resume PATH`` to an earlier step) are set aside as
    ``.superseded``: this run writes its own at those steps. The record of the weights the run
    first started from (``init_backbone``) is carried from the checkpoint into ``state.config``;
    ``backbone.init`` is not applied again (the checkpoint's weights win).
    """
    if path is None:
        return None
    info = load_checkpoint(path, state, check_content=False)  # checkpoint_to_resume has just checked it
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
    if INIT_RECORD in info.config:
        state.config[INIT_RECORD] = info.config[INIT_RECORD]
    if runtime.is_main:
        print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
        if config.backbone.init:
            print(f"note: --init_backbone {config.backbone.init} is not applied to a resumed run: the "
                  f"checkpoint's backbone weights are used")
    return info
