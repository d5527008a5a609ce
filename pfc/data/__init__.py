"""Training data: webdataset shards → equal per-rank batches of aligned faces.

    loader.py    the pipeline (read, shuffle, decode in workers; float conversion where consumed)
    plan.py      the epoch plan: which positions each rank and worker reads (pure arithmetic)
    pk_plan.py   the P×K epoch plan: which identities and samples make each batch (pure arithmetic)
    pk.py        P×K batches read at random through the per-sample index (``sampler="pk"``)
    sample_index.py  the per-sample index beside ``dataset.json``: format, opening, staleness
    samples.py   raw samples into batch rows: label check, JPEG decode, replacements, skip counts
    augment.py   augmentation beside the flip: settings, per-image draws from (seed, epoch, position)
    image_ops.py the augmentation's image operations (resize, crop box, blur, colour, grey)
    tarstream.py the lean tar reader
    handoff.py   zero-copy hand-off of decoded batches from workers to the consumer
    manifest.py  ``dataset.json``: reading, validating, locating shards, image side

The public names are imported on first use: the offline packer reads :mod:`pfc.data.manifest`
in worker processes that should not pay for importing torch with the loader.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pfc.data.loader import make_loader
    from pfc.data.manifest import read_manifest

_EXPORTS = {"make_loader": "pfc.data.loader", "read_manifest": "pfc.data.manifest"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
