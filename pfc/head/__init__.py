"""The model-parallel Partial-FC head: sharded class centers, an exact distributed margin softmax,
margins, regularisers and the row-sparse center optimizer. Usable without the trainer.

    partial_fc.py    PartialFC: sharding, sampling, input checks (start here)
    sampling.py      which centers a step takes: positives + a keyed permutation's first rows, O(S)
    softmax.py       the fused sharded softmax as named steps (sharded_margin_softmax)
    targets.py       the target cells of the logits, dense over the batch (no host sync)
    gemm.py          GEMMs against centers stored in bf16/fp16, with fp32 results
    margins.py       target-logit margins in closed form (CombinedMargin and presets, SphereFace)
    regularizers.py  MHE (its math, forward and backward), AngularTriplet
    optim.py         SparseRowSGD; adamw.py SparseRowAdamW; row_optimizer.py what they share;
                     update_in_backward.py the seam the backward applies them through
    partition.py     which rows of the centers each rank owns
    scratch.py       scratch memory; norms.py the norm floor (torch internals: pfc/torch_private.py)
"""
from pfc.head.margins import ArcFace, CombinedMargin, CosFace, Margin, NormFace, SphereFace
from pfc.head.adamw import SparseRowAdamW
from pfc.head.optim import SparseRowSGD
from pfc.head.partial_fc import PartialFC
from pfc.head.regularizers import MHE, AngularTriplet
from pfc.head.softmax import sharded_margin_softmax

__all__ = ["PartialFC", "sharded_margin_softmax", "CombinedMargin", "ArcFace", "CosFace", "NormFace", "SphereFace",
           "Margin", "MHE", "AngularTriplet", "SparseRowSGD", "SparseRowAdamW"]
