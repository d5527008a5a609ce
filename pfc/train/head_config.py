"""The head's part of the trainer's configuration (:mod:`pfc.train.config`, group ``head``): the
Partial-FC head, its margin, regularisers and the centers' storage types and optimizer.

    margin = config.head.margin.build()                       # pfc.head.margins
    head = config.head.build(num_classes, embedding_size, seed=…)   # pfc.head.partial_fc.PartialFC
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pfc.head.adamw import SparseRowAdamW
from pfc.head.margins import CombinedMargin, Margin, SphereFace
from pfc.head.partial_fc import PartialFC
from pfc.head.regularizers import MHE, AngularTriplet
from pfc.head.row_optimizer import CENTER_OPTIMIZERS

# storage types of the centers and their momentum (the long names are accepted too)
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUNDINGS = ("stochastic", "nearest")


@dataclass
class MarginConfig:
    """Margin on the target logit (pfc.head.margins); ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.4)."""

    kind: str = "combined"
    """combined: cos(m1·θ + m2) − m3 | sphereface: multiplicative margin m1 with λ-annealing"""
    s: float = 64.0
    """scale of the logits"""
    m1: float = 1.0
    """angle multiplier (sphereface: the integer margin m)"""
    m2: float = 0.5
    """additive angular margin (combined only)"""
    m3: float = 0.0
    """additive cosine margin (combined only)"""
    base: float = 1000.0
    """sphereface λ = max(base·(1 + gamma·iteration)^(−power), lambda_min): base"""
    gamma: float = 0.12
    """sphereface λ annealing: gamma"""
    power: float = 1.0
    """sphereface λ annealing: power"""
    lambda_min: float = 5.0
    """sphereface λ annealing: the floor of λ"""
    fallback: str = "cap"
    """combined past m1·θ + m2 > π: cap (angle held at π) | insightface (c − m2·sin m2; ArcFace only)"""
    straight_through: bool = False
    """margin in the forward value only; the gradient is that of s·cos θ (insightface since 2022)"""
    g_max: float = 2.0
    """combined: the clamp of the margin's derivative dz/dcos θ (finite at |cos θ| = 1)"""

    def build(self) -> Margin:
        """:class:`pfc.head.margins.CombinedMargin` or :class:`pfc.head.margins.SphereFace`."""
        if self.kind == "sphereface":
            return SphereFace(s=self.s, m=self.m1, base=self.base, gamma=self.gamma, power=self.power,
                              lambda_min=self.lambda_min, straight_through=self.straight_through)
        if self.kind != "combined":
            raise ValueError(f"margin kind {self.kind!r} is not one of combined, sphereface")
        return CombinedMargin(s=self.s, m1=self.m1, m2=self.m2, m3=self.m3, g_max=self.g_max,
                              fallback=self.fallback, straight_through=self.straight_through)


def _enabled(regularizer):
    """A fresh copy of ``regularizer`` (its checks run again), or None when its weight is 0."""
    return dataclasses.replace(regularizer) if regularizer.weight else None


@dataclass
class HeadConfig:
    """The Partial-FC head: sharded class centers, sampling, margin, regularisers and the centers' optimizer."""

    sample_rate: float = 1.0
    """ρ in (0, 1]: share of each rank's negative centers sampled per step (1: full softmax)"""
    interclass_filter: float = 0.0
    """a cosine t: non-target cosines above t are filtered (label-noise filter); 0: off"""
    interclass_filter_mode: str = "exclude"
    """exclude: a filtered logit leaves the softmax | zero: it is 0, still adds exp(0) (insightface)"""
    logits: str = "auto"
    """keep | recompute | auto: keep the [S, B] logits for the backward or recompute them (one more GEMM);
    auto recomputes when they would exceed 10 % of the center storage"""
    chunk_rows: int = 0
    """rows of centers per chunk of the fused softmax (memory vs. launches); 0: automatic (2048 on the CPU,
    from a 1 GiB scratch budget on a GPU, pfc/head/chunking.py)"""
    kernels: str = "auto"
    """auto | torch | triton: the head's kernels (auto: Triton on CUDA when it imports, else torch)"""
    center_dtype: str = "fp32"
    """fp32 | bf16 | fp16: storage of the class centers (bf16: half the memory; see README "Center storage type")"""
    momentum_dtype: str = ""
    """fp32 | bf16 | fp16: storage of the centers' momentum (adamw: both moments, fp16 refused); "": the centers' type"""
    rounding: str = "stochastic"
    """stochastic | nearest: how updates are rounded into bf16/fp16 centers and momentum"""
    optimizer: str = "sgd"
    """sgd | adamw: the centers' row-sparse optimizer (sgd: optim.momentum; adamw: lazy, a step count per row)"""
    lr: float | None = None
    """the centers' base learning rate, times the run's schedule from step 0 (frozen steps included); none: optim.lr"""
    weight_decay: float | None = None
    """the centers' weight decay (sgd: L2; adamw: decoupled, w −= lr·wd·w); none: optim.weight_decay"""
    betas: tuple[float, ...] = (0.9, 0.999)
    """adamw: β1,β2 (torch.optim.AdamW's defaults)"""
    eps: float = 1e-8
    """adamw: the denominator's epsilon"""
    margin: MarginConfig = field(default_factory=MarginConfig)
    mhe: MHE = field(default_factory=lambda: MHE(weight=0.0))
    triplet: AngularTriplet = field(default_factory=lambda: AngularTriplet(weight=0.0))

    @property
    def storage_dtype(self) -> torch.dtype:
        """``center_dtype`` as a torch dtype."""
        return STORAGE_DTYPES[self.center_dtype]

    @property
    def momentum_storage_dtype(self) -> torch.dtype:
        """``momentum_dtype`` as a torch dtype (the centers' when empty)."""
        return STORAGE_DTYPES[self.momentum_dtype] if self.momentum_dtype else self.storage_dtype

    def check(self, embedding_size: int) -> None:
        """The head's own option checks (:meth:`PartialFC.check_options`) and its optimizer's, on a 1×1 parameter."""
        if self.optimizer == "adamw":
            SparseRowAdamW([torch.zeros(1, 1)], lr=self.lr or 0.0, betas=self.betas, eps=self.eps,
                           weight_decay=self.weight_decay or 0.0, moment_dtype=self.momentum_storage_dtype)
        elif self.optimizer != "sgd":
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(CENTER_OPTIMIZERS)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr {self.lr} must be > 0 (none: optim.lr)")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay {self.weight_decay} must be >= 0 (none: optim.weight_decay)")
        PartialFC.check_options(sample_rate=self.sample_rate, embedding_size=embedding_size,
                                chunk_rows=self.chunk_rows or None, interclass_filter=self.interclass_filter or None,
                                interclass_filter_mode=self.interclass_filter_mode, logits=self.logits,
                                kernels=self.kernels)

    def build(self, num_classes: int, embedding_size: int, *, seed: int, group=None, device=None) -> PartialFC:
        """:class:`PartialFC` over ``num_classes`` centers with this margin and these regularisers."""
        return PartialFC(num_classes=num_classes, embedding_size=embedding_size, margin=self.margin.build(),
                         sample_rate=self.sample_rate, group=group, seed=seed, chunk_rows=self.chunk_rows or None,
                         dtype=self.storage_dtype, device=device, mhe=_enabled(self.mhe), triplet=_enabled(self.triplet),
                         interclass_filter=self.interclass_filter or None,
                         interclass_filter_mode=self.interclass_filter_mode, logits=self.logits,
                         kernels=self.kernels)
