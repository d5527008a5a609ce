"""The exact softmax cross-entropy over class centers sharded across ranks, as one fused pass.

Notation: ``B`` gathered rows (the same features ``X̂`` on every rank), this rank's ``S`` sampled
centers ``W_s``, logits kept classes-major ``[S, B]`` so that every chunk of centers is one
contiguous block; ``r_j = 1/‖w_j‖`` (no normalised copy of W is made).

Forward, in named steps (the vocab-parallel cross-entropy of Megatron-LM, done chunk by chunk
over the centers so that the ``[S, B]`` exps never exist at once):

1. chunk logits (:func:`_chunk_cosines`, :func:`_margin_and_filter`): ``z = s·cos`` with the
   margin at the target cells; a non-target cosine above the inter-class filter leaves the
   softmax; with MHE the same GEMM yields the cosines against the positive centers, whose energy
   the MHE pieces sum (:class:`pfc.head.regularizers.ShardEnergy`);
2. online row statistics (:class:`_RowStatistics`): each row's local max and sum of exps;
3. global row max (:func:`_global_row_max`): one MAX all-reduce, no gradient through it;
4. sum of exps, target logits and MHE sums (:func:`_global_sums`): one SUM all-reduce;
5. loss ``mean_i(log Σ_j exp(z_ij − m_i) + m_i − z_i,y)`` and accuracy.

Backward (no collective, except MHE's one): per chunk, recomputed from the kept logits,

6. gradient chunk (:func:`_softmax_grad_chunk`): ``G = c·(softmax − onehot)·dz_y/dcos``;
7. MHE gradient (:meth:`ShardEnergy.chunk_grad`) beside it;
8. the center gradient (:func:`_center_grad_chunk`) and the feature gradient;
9. the update seam (:class:`pfc.head.optim.UpdateInBackward`): the optimizer applied to the
   chunk's rows instead of returning their gradient, when asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pfc.distributed.collectives import all_reduce_
from pfc.head.gemm import StorageGemm
from pfc.head.margins import Margin
from pfc.head.norms import inverse_norms
from pfc.head.optim import SparseRowSGD, UpdateInBackward
from pfc.head.regularizers import MHE, ShardEnergy
from pfc.head.scratch import KeptRows, Workspace

_EXCLUDED_LOGIT = -1e30  # a filtered logit: exp() is exactly 0 and 0·(−1e30) stays finite


@dataclass(frozen=True)
class SoftmaxOptions:
    """What the sharded softmax needs besides its tensors, as one argument of the autograd
    function (the fields are the arguments of :func:`sharded_margin_softmax`)."""

    margin: Margin
    group: Any = None
    chunk_rows: int = 2048
    workspace: Workspace = field(default_factory=Workspace)
    filter_threshold: float | None = None
    mhe: MHE | None = None
    optimizer: SparseRowSGD | None = None


@dataclass(frozen=True)
class _Targets:
    """The target cells of this rank's logits: batch row ``rows[k]`` has its class at sampled
    position ``positions[k]`` (rows whose class another rank owns are absent). ``cos``, ``value``
    and ``slope`` (the target cosine, the margin's value and derivative there) are filled by the
    forward chunk by chunk."""

    rows: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    value: torch.Tensor
    slope: torch.Tensor

    @classmethod
    def of(cls, target: torch.Tensor, like: torch.Tensor) -> _Targets:
        rows = (target >= 0).nonzero().squeeze(1)
        count = rows.numel()
        return cls(rows, target[rows], like.new_empty(count), like.new_empty(count), like.new_empty(count))

    def in_chunk(self, start: int, stop: int):
        """``(mask [T], cells)`` of the targets whose class is in ``[start, stop)``: ``cells =
        (positions − start, rows)`` index the chunk's ``[S_c, B]`` block."""
        mask = (self.positions >= start) & (self.positions < stop)
        return mask, (self.positions[mask] - start, self.rows[mask])


class _RowStatistics:
    """Step 2: each row's max and sum of ``exp(z − max)`` over the chunks seen so far."""

    def __init__(self, num_rows: int, like: torch.Tensor):
        self.max = like.new_full((num_rows,), -math.inf)
        self.sum = like.new_zeros(num_rows)

    def add(self, chunk: torch.Tensor, workspace: Workspace) -> None:
        chunk_max = torch.maximum(chunk.amax(dim=0), self.max)
        self.sum.mul_(torch.exp(self.max - chunk_max))
        self.max = chunk_max
        shifted = torch.sub(chunk, self.max, out=workspace.get("softmax", chunk.shape[0], chunk))
        self.sum += shifted.exp_().sum(dim=0)  # in place: the exps never need their own block


def _chunk_rows(weight, index, start, stop, workspace, kept=None):
    """The centers of sampled positions ``[start, stop)``: a view of ``weight`` when all rows
    take part, else gathered into ``kept`` (kept for the backward) or a scratch block."""
    if index is None:
        return weight[start:stop]
    out = kept[start:stop] if kept is not None else workspace.get("rows", stop - start, weight)
    return torch.index_select(weight, 0, index[start:stop], out=out)


def _chunk_cosines(rows, operand, logits, inv_norm, start, stop, gemm):
    """Step 1a: ``logits[start:stop] = clamp(r·(rows·operandᵀ), −1, 1)`` and
    ``inv_norm[start:stop] = r`` (fp32 whatever the storage type); returns the block."""
    block = logits[start:stop]
    rows = gemm.rows(rows)
    inv = inverse_norms(rows, out=inv_norm[start:stop])
    gemm.mm(rows, operand.t(), out=block)
    block.mul_(inv[:, None]).clamp_(-1.0, 1.0)  # in place: the block is the kept logits
    return block


def _margin_and_filter(chunk, targets, mask, cells, margin, filter_threshold):
    """Step 1b: cosines of ``chunk [S_c, B]`` → logits in place: ``s·cos``, ``s·margin(cos)`` at
    the target cells (recorded in ``targets``), and with a filter threshold t a non-target
    cosine above t set to a logit whose exp is 0."""
    targets.cos[mask] = chunk[cells]
    value, slope = margin.target_logit(targets.cos[mask])
    targets.value[mask], targets.slope[mask] = value, slope
    noisy = chunk > filter_threshold if filter_threshold is not None else None
    chunk.mul_(margin.s)
    chunk[cells] = margin.s * value
    if noisy is not None:
        noisy[cells] = False
        chunk.masked_fill_(noisy, _EXCLUDED_LOGIT)


def _global_row_max(local_max, group):
    """Step 3: each row's max logit over all ranks (MAX all-reduce; no gradient flows through it)."""
    return all_reduce_(local_max.clone(), dist.ReduceOp.MAX, group)


def _global_sums(stats, row_max, targets, scale, mhe_sum, mhe_count, group):
    """Step 4: one SUM all-reduce of the sums of exps rescaled to the global max, the target
    logits with and without margin (zero where another rank owns the class) and the MHE sum and
    count. Returns ``(sum_exp, target_logit, raw_target_logit, mhe_total [2])``."""
    num_rows = row_max.shape[0]
    target_logit = row_max.new_zeros(num_rows)
    target_logit[targets.rows] = scale * targets.value
    raw_target_logit = row_max.new_zeros(num_rows)
    raw_target_logit[targets.rows] = scale * targets.cos
    sum_exp = stats.sum * torch.exp(stats.max - row_max)
    reduced = torch.cat([sum_exp, target_logit, raw_target_logit, mhe_sum[None], mhe_sum.new_full((1,), mhe_count)])
    all_reduce_(reduced, dist.ReduceOp.SUM, group)
    return reduced.split([num_rows, num_rows, num_rows, 2])


def _softmax_grad_chunk(logits_chunk, row_max, shift, coefficient, fold, targets, mask, cells, out):
    """Step 6: ``out = c·(softmax − onehot)`` of one chunk ``[S_c, B]``, times the margin's
    derivative at the target cells; returns those target entries. ``c·softmax`` is
    ``exp(z − max − shift)`` with ``c`` folded into ``shift`` when ``fold``."""
    torch.sub(logits_chunk, row_max, out=out)
    out.sub_(shift).exp_()
    if not fold:
        out.mul_(coefficient)
    grad_target = (out[cells] - coefficient) * targets.slope[mask]
    out[cells] = grad_target
    return grad_target


def _center_grad_chunk(grad_block, block, rows, inv, operand, mask, cells, grad_target, target_shift,
                       scale, num_rows, workspace, gemm, out):
    """Step 8: ``out = ∂/∂w_j = r_j·A_j − r_j²·u_j·w_j`` for the chunk's centers, with
    ``A = Gᵀ·[X̂; P̂]`` and ``u_j = Σ_i G_ji·c_ji``, where ``c = z/s`` in the softmax block except at
    the targets (there the raw cosine, ``z/s + target_shift``) and the cosine itself in the MHE
    block; ``grad_block`` holds ``G·r``."""
    product = torch.mul(grad_block, block, out=workspace.get("product", block.shape[0], block))
    u_scaled = product[:, :num_rows].sum(dim=1).div_(scale)  # r_j·u_j
    if block.shape[1] > num_rows:  # the MHE block
        u_scaled += product[:, num_rows:].sum(dim=1)
    positions, _ = cells
    u_scaled.index_add_(0, positions, grad_target * inv[positions, 0] * target_shift[mask])
    gemm.mm(gemm.operand(grad_block), operand, out=out)  # r_j·A_j
    out.addcmul_(rows, u_scaled[:, None] * inv, value=-1.0)


class _ShardedMarginSoftmax(torch.autograd.Function):
    """Exact softmax cross-entropy over sharded, sampled class centers (two collectives), with the
    MHE energy of the same centers computed in the same pass when asked for (module docstring)."""

    @staticmethod
    def forward(ctx, features, weight, index, target, options: SoftmaxOptions):
        num_rows, workspace, scale = features.shape[0], options.workspace, options.margin.s
        num_sampled = weight.shape[0] if index is None else index.numel()
        targets = _Targets.of(target, features)
        energy = None if options.mhe is None else options.mhe.shard_energy(
            weight, index, targets.rows, targets.positions, num_rows, options.group)
        # with MHE the positive centers join the features as a second block of the GEMM operand
        operand = features if energy is None else torch.cat([features, energy.centers])
        # updating in the backward: the sampled rows gathered here serve the backward and the update
        # (one random pass over W instead of three; no gradient is stored instead)
        update = options.optimizer is not None and index is not None and weight.requires_grad
        kept = workspace.keep_rows(num_sampled, weight) if update else None

        gemm = StorageGemm(weight.dtype, weight.device, workspace)
        gemm_operand = gemm.operand(operand)
        logits = features.new_empty(num_sampled, operand.shape[0])
        inv_norm = features.new_empty(num_sampled)
        stats = _RowStatistics(num_rows, features)
        mhe_sum = features.new_zeros(())
        for start in range(0, num_sampled, options.chunk_rows):
            stop = min(start + options.chunk_rows, num_sampled)
            rows = _chunk_rows(weight, index, start, stop, workspace, None if kept is None else kept.rows)
            block = _chunk_cosines(rows, gemm_operand, logits, inv_norm, start, stop, gemm)
            mask, cells = targets.in_chunk(start, stop)
            if energy is not None:  # Σ_{j ≠ y_i} f(ŵ_yi, ŵ_j) over this chunk's centers
                mhe_sum += energy.chunk_sum(block[:, num_rows:], start, cells)
            chunk = block[:, :num_rows]
            _margin_and_filter(chunk, targets, mask, cells, options.margin, options.filter_threshold)
            stats.add(chunk, workspace)

        row_max = _global_row_max(stats.max, options.group)
        sum_exp, target_logit, raw_target_logit, mhe_total = _global_sums(
            stats, row_max, targets, scale, mhe_sum, 0 if energy is None else energy.count, options.group)
        log_sum = sum_exp.log()
        loss = (log_sum + row_max - target_logit).mean()
        correct = (target_logit >= row_max) | (raw_target_logit >= row_max)
        accuracy = correct.to(features.dtype).mean()
        energy_value = energy.value(mhe_total[0], mhe_total[1], num_rows) if energy is not None else \
            mhe_total[0] / 1.0  # a zero tensor

        # the large tensors and the inputs go through save_for_backward; the small per-target and
        # MHE pieces ride on ctx in their typed objects
        ctx.save_for_backward(operand, weight, index, logits, inv_norm, row_max, log_sum)
        ctx.options, ctx.targets, ctx.energy, ctx.kept = options, targets, energy, kept
        ctx.loss = loss.detach() if options.optimizer is not None else None
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy, energy_value

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy, grad_energy):
        operand, weight, index, logits, inv_norm, row_max, log_sum = ctx.saved_tensors
        options, targets, energy = ctx.options, ctx.targets, ctx.energy
        workspace, scale, num_rows = options.workspace, options.margin.s, row_max.shape[0]
        num_sampled, weight_needs_grad = logits.shape[0], ctx.needs_input_grad[1]
        # G = ∂loss/∂cos = c·(softmax − onehot) with c = s·grad/B, softmax = exp(z − max − log Σ);
        # for c > 0 the factor folds into the exponent: c·softmax = exp(z − max − (log Σ − log c)).
        # The max is subtracted on its own first: z − max is exact where it matters (near 0).
        coefficient = grad_loss * scale / num_rows
        fold = bool(coefficient > 0)
        shift = log_sum - torch.log(coefficient) if fold else log_sum
        target_shift = targets.cos - targets.value

        update = None
        if options.optimizer is not None and weight_needs_grad:
            update = UpdateInBackward.begin(options.optimizer, weight, index, grad_loss, ctx.loss,
                                            by_chunk=energy is None)  # MHE adds to rows after the loop
        grad_values = None
        if weight_needs_grad and not (update is not None and update.by_chunk):
            grad_values = workspace.gradient(num_sampled, operand) if update is None else \
                workspace.get("grad_values", num_sampled, operand)
        kept = workspace.kept(ctx.kept)
        gemm = StorageGemm(weight.dtype, weight.device, workspace)
        gemm_operand = gemm.operand(operand)
        grad_operand = torch.zeros_like(operand)
        for start in range(0, num_sampled, options.chunk_rows):
            stop = min(start + options.chunk_rows, num_sampled)
            rows = kept[start:stop] if kept is not None else _chunk_rows(weight, index, start, stop, workspace)
            rows_operand = gemm.rows(rows)  # the stored rows as a GEMM operand (upcast on the CPU)
            inv, block = inv_norm[start:stop, None], logits[start:stop]
            grad_block = workspace.get("grad", stop - start, logits)
            mask, cells = targets.in_chunk(start, stop)
            grad_target = _softmax_grad_chunk(block[:, :num_rows], row_max, shift, coefficient, fold, targets,
                                              mask, cells, out=grad_block[:, :num_rows])
            if energy is not None:
                energy.chunk_grad(block[:, num_rows:], start, cells, grad_energy, out=grad_block[:, num_rows:])
            grad_block.mul_(inv)  # in place: G·r, the factor of both products below
            grad_rows = None
            if weight_needs_grad:
                grad_rows = grad_values[start:stop] if grad_values is not None else \
                    workspace.get("grad_rows", stop - start, operand)
                _center_grad_chunk(grad_block, block, rows_operand, inv, gemm_operand, mask, cells, grad_target,
                                   target_shift, scale, num_rows, workspace, gemm, out=grad_rows)
            gemm.addmm_(grad_operand, gemm.operand(grad_block.t()), rows_operand)  # Σ_j G_j r_j w_j
            if update is not None:  # the rows are no longer needed as they were: update them in place
                update.chunk(start, stop, grad_rows, rows)

        if energy is not None and grad_values is not None:
            energy.return_center_grad(grad_operand[num_rows:], grad_values, options.group)
        grad_weight = None
        if update is not None:
            update.finish(grad_values)
        elif grad_values is not None:
            grad_weight = grad_values if index is None else torch.sparse_coo_tensor(
                index[None], grad_values, weight.shape, is_coalesced=True, check_invariants=False)
        return grad_operand[:num_rows], grad_weight, None, None, None


def sharded_margin_softmax(features: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None,
                           target: torch.Tensor, margin: Margin, group=None, chunk_rows: int = 2048,
                           workspace: Workspace | None = None, filter_threshold: float | None = None,
                           mhe: MHE | None = None, optimizer: SparseRowSGD | None = None):
    """Margin softmax cross-entropy over class centers sharded across the ranks of ``group``.

    Args:
        features: ``[B, D]`` normalised features, the same on every rank (the gathered batch).
        weight: ``[C_r, D]`` this rank's centers (unnormalised).
        index: ``[S]`` sorted local rows taking part this step, or ``None`` for all ``C_r``.
        target: ``[B]`` position of each row's class in this rank's sampled set, −1 elsewhere.
        margin: applied to the target cosine; logits are then scaled by ``margin.s``.
        chunk_rows: centers per chunk of the fused pass.
        workspace: scratch memory reused across calls (a :class:`pfc.head.scratch.Workspace`).
        filter_threshold: inter-class filtering; a non-target cosine above it is left out of its
            row's softmax (treated as label noise), on every rank alike.
        mhe: the MHE energy of the sampled centers (:class:`pfc.head.regularizers.MHE`), computed in
            the same pass.
        optimizer: a :class:`pfc.head.optim.SparseRowSGD` over ``weight`` that the backward applies
            to the sampled rows instead of returning their gradient (see
            :meth:`pfc.head.PartialFC.optimizer`, ``update_in_backward``).

    Returns ``(loss, accuracy, energy)``, scalars: ``loss = mean_i(logsumexp_j z_ij − z_i,y)``
    over all ranks' sampled centers, identical on every rank; accuracy is the share of rows
    whose target cosine is the largest sampled logit; energy the MHE value (0 without ``mhe``).
    Two collectives (MAX of the row max, one SUM); the backward needs none (one all-reduce with
    MHE) and yields ``∂loss/∂features [B, D]`` from this rank's shard only (sum over ranks for
    the total) and ``∂loss/∂weight [C_r, D]`` (sparse COO over ``index`` when given).
    """
    options = SoftmaxOptions(margin, group, chunk_rows, workspace if workspace is not None else Workspace(),
                             filter_threshold, mhe, optimizer)
    return _ShardedMarginSoftmax.apply(features, weight, index, target, options)
