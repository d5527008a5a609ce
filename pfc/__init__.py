"""pfc: distributed Partial-FC training for face recognition.

    from pfc import PartialFC, ArcFace, make_loader, TrainConfig, train

The public API, one name per concept; each lives in its subpackage (see README "How pfc is
built"): the head (:mod:`pfc.head`), the data (:mod:`pfc.data`), the trainer (:mod:`pfc.train`).
Names are imported on first use, so ``import pfc`` costs nothing (the offline packer's worker
processes import parts of pfc without torch).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pfc.data.loader import make_loader
    from pfc.head.margins import ArcFace, CombinedMargin, CosFace, NormFace, SphereFace
    from pfc.head.partial_fc import PartialFC
    from pfc.head.regularizers import MHE, AngularTriplet
    from pfc.train.config import TrainConfig, load_config
    from pfc.train.loop import train

_EXPORTS = {
    "PartialFC": "pfc.head.partial_fc",
    "CombinedMargin": "pfc.head.margins", "ArcFace": "pfc.head.margins", "CosFace": "pfc.head.margins",
    "NormFace": "pfc.head.margins", "SphereFace": "pfc.head.margins",
    "MHE": "pfc.head.regularizers", "AngularTriplet": "pfc.head.regularizers",
    "make_loader": "pfc.data.loader",
    "TrainConfig": "pfc.train.config", "load_config": "pfc.train.config",
    "train": "pfc.train.loop",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
