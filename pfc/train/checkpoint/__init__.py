"""Training checkpoints: atomic on disk, resumable on any world size, loaded without arbitrary pickles.

    save_checkpoint(output_dir, state, keep_last=3)        # collective
    load_checkpoint(select_checkpoint("auto", output_dir), state)   # collective

``store``: directories (layout, atomic publication, validation); ``dcp_planner``: the head's
rows in torch.distributed.checkpoint with explicit row ranges; ``save_load``: the two
collective entry points over a :class:`pfc.train.state.TrainState`.
"""
from pfc.errors import CheckpointError
from pfc.train.checkpoint.save_load import (
    LoadedCheckpoint,
    load_checkpoint,
    read_checkpoint_tensors,
    save_checkpoint,
    select_checkpoint,
    verify_checkpoint,
)
from pfc.train.checkpoint.store import (
    checkpoint_path,
    find_latest,
    list_checkpoints,
    validate_checkpoint,
)

__all__ = ["CheckpointError", "LoadedCheckpoint", "checkpoint_path", "find_latest", "list_checkpoints",
           "load_checkpoint", "read_checkpoint_tensors", "save_checkpoint", "select_checkpoint",
           "validate_checkpoint", "verify_checkpoint"]
