"""Regularisers for the Partial-FC head: MHE on the sampled centers, angular triplet on the batch.

Both follow the head's gradient convention: the value returned is the same on every rank, while
each rank back-propagates only its own share (its shard rows, its anchors), so that summed over
ranks the gradients are exact. Collectives inside are outside autograd except where noted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pfc.distributed.collectives import all_gather_tensor, all_reduce_, gather_rows, get_rank, get_world_size
from pfc.head.margins import SphereFace
from pfc.head.targets import TargetCells, Targets

_KERNELS = ("euclidean", "log", "angular")


def _global_value(local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``total`` as the value, ``local``'s gradient: every rank back-propagates its own share."""
    return local + (total - local).detach()


@dataclass
class MHE:
    """Minimum hyperspherical energy (SphereFace+) of the sampled class centers.

    The energy between each sample's class center and the other sampled centers of all ranks:

        E = 1/(B·(K−1)) · Σ_i Σ_{j ≠ y_i} f(ŵ_{y_i}, ŵ_j)

    over the B gathered rows and the K centers sampled this step on all ranks. With
    ``d = sqrt(2 − 2·ŵ_yᵀŵ_j + eps)`` and ``θ = acos(clamp(ŵ_yᵀŵ_j, −1 + eps, 1 − eps))``:
    ``euclidean``: ``f = d^(−power)`` (power 1 or 2 in the paper); ``log``: ``f = −log d``;
    ``angular``: ``f = θ^(−power)``. ``half_space=True`` also counts the reflections ``−ŵ_j``
    (``f(ŵ_y, ŵ_j) + f(ŵ_y, −ŵ_j)``, divided by ``2·B·(K−1)``). ``unbiased=True`` weights the
    sampled negatives of rank r by ``(C_r − P_r)/n_r`` (P_r local positives, n_r negatives drawn)
    and uses K = C, an unbiased estimate of the full-shard energy. The head adds ``weight·E``,
    computed inside its sharded softmax (:func:`pfc.head.sharded_margin_softmax`) by the pieces
    of :class:`ShardEnergy`: the batch's positive centers are gathered with one all-reduce, each
    rank evaluates the kernel against its own sampled shard in the same GEMM as the logits, the
    energy rides on the softmax's SUM all-reduce, and the positive centers' gradient returns to
    their owners with one all-reduce in the backward.
    """

    weight: float = 0.01
    """λ_MHE, the weight of E in the loss (the trainer's config: 0 = off)"""
    kernel: str = "euclidean"
    """euclidean: d^(−power) | log: −log d | angular: θ^(−power)"""
    power: float = 2.0
    """exponent of the euclidean and angular kernels"""
    half_space: bool = False
    """also count the reflections −ŵ_j of the other centers"""
    unbiased: bool = False
    """weight the sampled negatives by the inverse sampling ratio (unbiased full-shard estimate)"""
    eps: float = 1e-6
    """small constant inside the distance and the angle's clamp, in (0, 0.5)"""

    def __post_init__(self):
        if self.kernel not in _KERNELS:
            raise ValueError(f"MHE kernel {self.kernel!r} is not one of {_KERNELS}")
        if self.kernel != "log" and not self.power > 0:
            raise ValueError(f"MHE power={self.power} must be > 0")
        if not self.weight >= 0:
            raise ValueError(f"MHE weight={self.weight} must be >= 0")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"MHE eps={self.eps} outside (0, 0.5)")

    def kernel_value(self, cos: torch.Tensor) -> torch.Tensor:
        """``f`` as a function of the cosine between two unit vectors (half-space included)."""
        value = self._kernel(cos, want_grad=False)
        return value + self._kernel(-cos, want_grad=False) if self.half_space else value

    def kernel_grad(self, cos: torch.Tensor) -> torch.Tensor:
        """``df/dcos`` in closed form (zero where the cosine is clamped); half-space included."""
        grad = self._kernel(cos, want_grad=True)
        return grad - self._kernel(-cos, want_grad=True) if self.half_space else grad

    def _kernel(self, cos, want_grad):
        if self.kernel == "angular":  # f = θ^−p, df/dc = p·θ^(−p−1)/sqrt(1 − c²)
            inside = (cos > -1.0 + self.eps) & (cos < 1.0 - self.eps)
            clamped = cos.clamp(-1.0 + self.eps, 1.0 - self.eps)
            theta = torch.acos(clamped)
            if not want_grad:
                return theta.pow(-self.power)
            return self.power * theta.pow(-self.power - 1) * torch.rsqrt(1.0 - clamped * clamped) * inside
        gap = 2.0 - 2.0 * cos  # d² = gap + eps
        squared = gap.clamp_min(0.0) + self.eps
        if self.kernel == "log":  # f = −½·log d², df/dc = 1/d²
            return -0.5 * torch.log(squared) if not want_grad else squared.reciprocal() * (gap > 0)
        # euclidean: f = (d²)^(−p/2), df/dc = p·(d²)^(−p/2 − 1)
        if not want_grad:
            return squared.pow(-0.5 * self.power)
        return self.power * squared.pow(-0.5 * self.power - 1.0) * (gap > 0)

    def denominator(self, num_rows: int, num_centers: torch.Tensor) -> torch.Tensor:
        """``B·(K−1)``, doubled with ``half_space``, from ``K`` as a 0-d tensor (no host read). With
        a single center in all (K = 1) the sum is empty and the denominator is taken as ``B``
        (E = 0); the head refuses MHE with fewer than two classes when it is built."""
        return num_rows * (num_centers - 1).clamp_min(1) * (2 if self.half_space else 1)

    def column_weights(self, index: torch.Tensor | None, targets: Targets, num_local: int):
        """``(weights [S] or None, count)``: the per-column factor of this rank's sampled centers and
        the number of centers this rank contributes to K (see ``unbiased``); static shapes, no
        host read."""
        if index is None:
            return None, num_local
        num_sampled = index.numel()
        if not self.unbiased:
            return None, num_sampled
        # mark the positive columns; rows owned elsewhere mark the spare last slot
        is_positive = torch.zeros(num_sampled + 1, dtype=torch.bool, device=index.device).index_fill_(
            0, torch.where(targets.owned, targets.positions, num_sampled), True)[:num_sampled]
        num_positive = is_positive.sum()
        num_negative = (num_sampled - num_positive).clamp_min(1)  # no negative drawn: nothing to weight
        weights = torch.where(is_positive, 1.0, (num_local - num_positive) / num_negative).float()
        return weights, num_local

    def shard_energy(self, weight: torch.Tensor, index: torch.Tensor | None, targets: Targets, num_rows: int,
                     group=None) -> ShardEnergy:
        """This rank's part of E in one step of the sharded softmax (collective: gathers the
        positive centers); see :class:`ShardEnergy`."""
        return ShardEnergy(self, weight, index, targets, num_rows, group)


class ShardEnergy:
    """MHE's part in one step of the sharded softmax (:mod:`pfc.head.softmax`), on one rank.

    Notation: ``B`` gathered rows, this rank's ``S`` sampled centers ``W_s``; batch row i has its
    class among them at ``targets.positions[i]`` where ``targets.owned[i]``
    (:class:`pfc.head.targets.Targets`, dense over the B rows: no host sync).

    1. Made in the forward: ``centers = P̂ [B, D]``, the batch's normalised class centers (fp32
       whatever the storage type), each row filled by the rank that owns the class, then one SUM
       all-reduce. The softmax appends them to the features, so one GEMM yields the logits and
       the cosines ``ŵ_jᵀp̂_i``.
    2. :meth:`chunk_sum`: ``Σ_i Σ_{j ≠ y_i} f(ŵ_yi, ŵ_j)`` over a chunk of ``W_s`` (the target
       cells masked, columns weighted when ``unbiased``); the softmax adds the chunks up and
       reduces the sum and :attr:`count` (this rank's share of K) on its SUM all-reduce.
    3. :meth:`value`: ``E = total / (B·(K−1))`` (doubled with half-space).
    4. :meth:`chunk_grad`: ``∂E/∂cos`` of a chunk (the softmax turns it into the gradients of
       ``W_s`` and of ``P̂`` with its own).
    5. :meth:`return_center_grad`: the backward of step 1: every rank's share of ``∂E/∂P̂``
       summed (one all-reduce), taken through ``p̂ = w/‖w‖`` and added to the owners' rows.
    """

    def __init__(self, mhe: MHE, weight: torch.Tensor, index: torch.Tensor | None, targets: Targets,
                 num_rows: int, group=None):
        self.mhe = mhe
        self.targets = targets
        # the positive centers as Targets.measure gathered them (the features' type)
        self.own_inv_norm = targets.inv_norm
        self.own_unit = targets.centers * self.own_inv_norm[:, None]
        centers = torch.where(targets.owned[:, None], self.own_unit, 0.0)
        self.centers = all_reduce_(centers, dist.ReduceOp.SUM, group)
        self.column_weight, self.count = mhe.column_weights(index, targets, weight.shape[0])
        self.denominator = None

    def chunk_sum(self, cos: torch.Tensor, start: int, cells: TargetCells) -> torch.Tensor:
        """``Σ f`` over ``cos [S_c, B]``, the cosines of sampled centers ``[start, start + S_c)``
        against ``P̂``; ``cells`` the target cells of the chunk (left out)."""
        energy = self.mhe.kernel_value(cos)
        cells.put(energy, 0.0)
        if self.column_weight is not None:
            energy.mul_(self.column_weight[start:start + cos.shape[0], None])
        return energy.sum()

    def value(self, total: torch.Tensor, count: torch.Tensor, num_rows: int) -> torch.Tensor:
        """E from the reduced ``total`` of the chunk sums and the reduced ``count`` (K), both 0-d tensors."""
        self.denominator = self.mhe.denominator(num_rows, count.round())
        return total / self.denominator

    def chunk_grad(self, cos: torch.Tensor, start: int, cells: TargetCells, grad_energy: torch.Tensor,
                   out: torch.Tensor) -> None:
        """``out = grad_energy · ∂E/∂cos`` for the chunk of :meth:`chunk_sum`."""
        torch.mul(self.mhe.kernel_grad(cos), grad_energy / self.denominator, out=out)
        cells.put(out, 0.0)
        if self.column_weight is not None:
            out.mul_(self.column_weight[start:start + cos.shape[0], None])

    def return_center_grad(self, grad_centers: torch.Tensor, grad_values: torch.Tensor, group=None) -> None:
        """Add ``∂/∂w`` of the positive centers to ``grad_values [S, D]`` (collective), given this
        rank's share ``grad_centers [B, D]`` of the gradient of ``P̂``."""
        grad_centers = all_reduce_(grad_centers.contiguous(), dist.ReduceOp.SUM, group)
        own_grad = torch.where(self.targets.owned[:, None], grad_centers, 0.0)  # rows owned elsewhere add 0
        # p̂ = w·r: ∂/∂w = r·(g − p̂·(p̂ᵀg)), in place on the masked copy
        own_grad.sub_(self.own_unit * (own_grad * self.own_unit).sum(dim=1, keepdim=True))
        own_grad.mul_(self.own_inv_norm[:, None])
        grad_values.index_add_(0, self.targets.positions, own_grad)


class TripletTerm(NamedTuple):
    """What :meth:`AngularTriplet.term` computed, as 0-d tensors on the features' device (no host
    sync): ``value`` (the term, the same on every rank; this rank's anchors carry its gradient),
    ``pairs`` (anchor–positive pairs kept on all ranks, float) and ``rows_with_positive`` (the
    share of gathered rows whose class appears on another row too: 0 means the term is idle)."""

    value: torch.Tensor
    pairs: torch.Tensor
    rows_with_positive: torch.Tensor


@dataclass
class AngularTriplet:
    """Angular triplet loss (ATL's "easy triplet") on the gathered batch.

    The batch's normalised features act as class centers. For an anchor a and each positive p
    (another row of the same class), the candidates are p with the SphereFace margin on the
    anchor–positive angle, ``z_p = s·ψ_λ(cos θ_ap)`` (:class:`pfc.head.margins.SphereFace` with
    ``m``, λ annealed), and every negative n (a row of another class), ``z_n = s·cos θ_an``:

        ℓ_ap = log(1 + Σ_n exp(z_n − z_p)),   term = mean of ℓ_ap over the kept pairs.

    ``semihard=True`` keeps only pairs that are right without the margin and wrong with it:
    ``cos θ_ap > max_n cos θ_an ≥ ψ_λ(cos θ_ap)``. As in ATL, positives and negatives are fixed
    centers (no gradient); only the anchor is updated. Pairs need a positive and a negative in
    the gathered batch: rows whose class appears once contribute nothing. With uniformly
    shuffled batches over many identities that is nearly every row, so the term needs
    identity-balanced batches: the loader's P×K sampler (``--sampler pk --pk_k K``, K images of
    each of b/K identities per rank batch). :meth:`term` reports the pairs it used and the share of
    rows with a positive, so a run can see when the term is idle.
    """

    weight: float = 1.0
    """weight of the term in the loss (the trainer's config: 0 = off)"""
    m: int = 2
    """SphereFace margin (an integer) on the anchor–positive angle"""
    s: float = 30.0
    """scale of the triplet logits"""
    semihard: bool = True
    """keep only pairs right without the margin and wrong with it"""
    base: float = 1000.0
    """λ annealing of the margin: base"""
    gamma: float = 0.12
    """λ annealing of the margin: gamma"""
    power: float = 1.0
    """λ annealing of the margin: power"""
    lambda_min: float = 5.0
    """λ annealing of the margin: the floor of λ"""

    def __post_init__(self):
        if not self.weight >= 0:
            raise ValueError(f"AngularTriplet weight={self.weight} must be >= 0")
        self.margin = SphereFace(s=self.s, m=self.m, base=self.base, gamma=self.gamma, power=self.power,
                                 lambda_min=self.lambda_min)

    def set_iteration(self, iteration: int) -> None:
        """Advance the λ schedule of the margin."""
        self.margin.set_iteration(iteration)

    def term(self, features: torch.Tensor, labels: torch.Tensor, group=None) -> TripletTerm:
        """The term on the gathered, normalised ``features [B, D]`` and ``labels [B]``; this rank's
        anchors are its own rows ``[rank·b, (rank+1)·b)``. One all-reduce of three numbers and no
        host sync: every pair is a cell of the static ``[b, B]`` anchor × row matrix, selected by
        masks (no ``nonzero``, no boolean indexing), so the shapes do not depend on the labels.
        Returns a :class:`TripletTerm` (value, pairs kept on all ranks, share of rows with a positive)."""
        world_size, rank = get_world_size(group), get_rank(group)
        rows_per_rank = features.shape[0] // world_size
        anchors = features.narrow(0, rank * rows_per_rank, rows_per_rank)
        anchor_labels = labels.narrow(0, rank * rows_per_rank, rows_per_rank)
        cos = anchors @ features.detach().t()  # [b, B]
        same = anchor_labels[:, None] == labels[None, :]
        columns = torch.arange(features.shape[0], device=features.device)
        itself = columns[None, :] == (rank * rows_per_rank + columns[:rows_per_rank])[:, None]
        positive = same & ~itself
        negative = ~same
        has_negative = negative.any(dim=1, keepdim=True)
        negative_cos = cos.masked_fill(~negative, -math.inf)
        # a row without negatives gets a finite stand-in (its cells are masked out below), so that
        # no -inf - -inf reaches the gradient
        negative_lse = torch.logsumexp(torch.where(has_negative, self.s * negative_cos, 0.0), dim=1, keepdim=True)
        # the margin on every cell; the cells that are no pair see cos 0 (finite value and derivative)
        z_positive = self.s * self.margin(torch.where(positive, cos, 0.0))
        pair = positive & has_negative
        if self.semihard:
            hardest = negative_cos.detach().amax(dim=1, keepdim=True)
            pair &= (cos.detach() > hardest) & (z_positive.detach() / self.s <= hardest)
        pair_loss = torch.where(pair, F.softplus(negative_lse - z_positive), 0.0)
        local_sum = pair_loss.sum()
        totals = torch.stack([local_sum.detach(), pair.sum().to(local_sum.dtype),
                              positive.any(dim=1).sum().to(local_sum.dtype)])
        all_reduce_(totals, dist.ReduceOp.SUM, group)
        value = _global_value(local_sum, totals[0]) / totals[1].clamp_min(1.0)
        return TripletTerm(value, totals[1], totals[2] / features.shape[0])

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
        """Standalone use: ``x [b, D]`` this rank's embeddings, ``labels [b]``; gathers both and
        returns the (unweighted) term, the same on every rank; ``x.grad`` follows the head's
        convention (N · ∂term/∂x_r)."""
        world_size = get_world_size(group)
        features = gather_rows(F.normalize(x, dim=1), group, grad_scale=world_size)
        return self.term(features, all_gather_tensor(labels, group), group).value
