"""Fine-tuning: a run that starts from a trained backbone, and the backbone's frozen first steps.

    init = read_init_backbone(config, runtime, image_size)     # collective; None without backbone.init
    state = build_train_state(..., init_weights=init.state_dict)

``backbone.init`` (``--init_backbone PATH``) names a ``backbone.pt`` (or a training output folder
holding one), read as :func:`pfc.evaluation.export.load_backbone` reads it: its sha256 checked,
inf/NaN refused; a file without a checksum (one written before pfc checksummed them) is used with a note. The run then
starts from those weights with freshly initialised class centers and optimizer states. The
file must be made for the run's network, embedding size and image size (a network of another
name is accepted when its weights fit the configured one exactly, key for key and shape for
shape: an alias of the same architecture); anything else is a ConfigError naming both, on every
rank. A run that resumes from a checkpoint does not read the file at all: the checkpoint's
weights win, and the record of where the weights first came from (:meth:`InitBackbone.record`,
``init_backbone`` in ``config.json`` and in every checkpoint's manifest) is carried over from
the checkpoint.

``backbone.freeze_steps`` (``--freeze_backbone_steps N``): for optimizer steps ``0 … N−1`` only
the head trains. The runner's :meth:`set_frozen` puts the backbone in eval mode (BatchNorm
normalises with its running statistics and does not update them; dropout is off: the
features the pretrained network gives at inference, as insightface-style fine-tuning keeps
them) and runs it under ``torch.no_grad()``: no backbone backward, no gradient, no all-reduce,
its optimizer not stepped (its state stays as it was). The decision is the host's step
counter, so it adds no host synchronisation, and a run resumed inside the frozen phase
continues it from the checkpoint's step. Learning rates: the head follows the run's schedule
from step 0; the backbone's multiplier is 0 during the frozen steps and its warmup and decay
span the steps after them (``LRSchedule.start_step``), so an unfrozen backbone warms up
instead of meeting the full learning rate at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pfc.backbones import build_backbone
from pfc.distributed.agree import run_on_every_rank
from pfc.errors import ConfigError
from pfc.evaluation.export import backbone_file, load_backbone, unchecked_note
from pfc.train.config import TrainConfig
from pfc.train.runtime import Runtime


@dataclass
class InitBackbone:
    """Weights a run starts from: the file read, its ``meta`` (network, embedding_size,
    image_size, sha256 or None) and its ``state_dict`` (CPU tensors)."""

    path: str
    meta: dict
    state_dict: dict[str, torch.Tensor]

    def record(self) -> dict:
        """What ``config.json`` and the checkpoints keep under :data:`pfc.train.resume.INIT_RECORD`."""
        return {"path": os.path.abspath(self.path), **{key: self.meta[key] for key in
                                                       ("network", "embedding_size", "image_size", "sha256")}}


def _describe(network: str, embedding_size: int, image_size: int) -> str:
    return f"{network} with embedding_size {embedding_size} at {image_size}x{image_size} px"


def fits_network(state_dict: dict[str, torch.Tensor], network: str, embedding_size: int, image_size: int) -> bool:
    """Whether ``state_dict`` loads into a fresh ``network`` exactly (same keys, same shapes)."""
    try:
        build_backbone(network, embedding_size, 0.0, image_size).load_state_dict(state_dict)
    except (RuntimeError, ValueError):
        return False
    return True


def load_init_backbone(path: str, network: str, embedding_size: int, image_size: int) -> InitBackbone:
    """The weights of the backbone file at ``path`` (or in the output folder ``path``), checked
    against the run's network: CheckpointError for a file that cannot be read (see
    :func:`load_backbone`), ConfigError naming both networks when it is made for another
    network, embedding size or image size."""
    file = backbone_file(path)
    model, meta = load_backbone(file)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    fits = meta["embedding_size"] == embedding_size and meta["image_size"] == image_size and (
        meta["network"] == network or fits_network(state, network, embedding_size, image_size))
    if not fits:
        raise ConfigError(f"{file} holds a "
                          f"{_describe(meta['network'], meta['embedding_size'], meta['image_size'])}; this run "
                          f"trains a {_describe(network, embedding_size, image_size)}: set --network and "
                          f"--embedding_size to the file's (the image size is the shards')")
    return InitBackbone(file, meta, state)


def read_init_backbone(config: TrainConfig, runtime: Runtime, image_size: int) -> InitBackbone | None:
    """Collective: every rank reads ``config.backbone.init`` (None when it is empty); an error
    on any rank (a missing or damaged file, another network) is raised on every rank. Rank 0
    prints where the weights come from, and the note for a file without a checksum."""
    path = config.backbone.init
    if not path:
        if config.backbone.freeze_steps and runtime.is_main:
            print(f"note: --freeze_backbone_steps {config.backbone.freeze_steps} without --init_backbone: the frozen "
                  f"backbone is the random initialisation")
        return None
    backbone = config.backbone
    init = run_on_every_rank(lambda: load_init_backbone(path, backbone.network, backbone.embedding_size, image_size),
                             f"reading --init_backbone {path}")
    if runtime.is_main:
        note = unchecked_note(init.path, init.meta)
        if note:
            print(note)
        digest = init.meta["sha256"]
        print(f"backbone initialised from {init.path} ({init.meta['network']}"
              f"{f', sha256 {digest[:12]}…' if digest else ''}); fresh class centers")
    return init
