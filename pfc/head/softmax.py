"""The exact softmax cross-entropy over class centers sharded across ranks, as one fused pass.

Notation: ``B`` gathered rows (the same features ``X̂`` on every rank), this rank's ``S`` sampled
centers ``W_s``, logits kept classes-major ``[S, B]`` so that every chunk of centers is one
contiguous block; ``r_j = 1/‖w_j‖`` (no normalised copy of W is made).

Forward, in named steps (the vocab-parallel cross-entropy of Megatron-LM, done chunk by chunk
over the centers so that the ``[S, B]`` exps never exist at once):

0. the target cosines and the margin there, once for all rows (:meth:`Targets.measure`: the B
   target centers gathered, ``ŵ_y·x̂``), and the target cells of every chunk;
1. chunk logits (:func:`_chunk_cosines`, the chunk kernels' ``forward``): ``z = s·r·(w·x)`` in one pass,
   with the margin logits written into the target cells (:class:`pfc.head.targets.Targets`:
   dense, no host sync); a non-target logit above the inter-class filter leaves the softmax or
   becomes 0 (:class:`pfc.head.kernels.softmax_chunk.ChunkFilter`);
   with MHE the same GEMM yields the cosines against the positive centers, whose energy the MHE
   pieces sum (:class:`pfc.head.regularizers.ShardEnergy`). The GEMM runs in the centers'
   storage type with an fp32 result (:class:`pfc.head.gemm.StorageGemm`);
2. online row statistics (the same ``forward``, in the same pass): each row's local max and sum of exps;
3. global row max (:func:`_global_row_max`): one MAX all-reduce, no gradient through it;
4. sum of exps, target logits and MHE sums (:func:`_global_sums`): one SUM all-reduce;
5. loss ``mean_i(log Σ_j exp(z_ij − m_i) + m_i − z_i,y)`` and accuracy.

Backward (no collective, except MHE's one): per chunk, from the kept logits or, with
``keep_logits=False``, from the chunk's logits recomputed (the same GEMM and steps 1a–1b on the
same inputs: bit-identical, with the kept rows reused when updating in the backward, fp32 storage),

6. gradient chunk (the chunk kernels' ``backward``): ``G = c·(softmax − onehot)·dz_y/dcos``, its
   target cells computed once for all rows (:func:`_target_grad`);
7. MHE gradient (:meth:`ShardEnergy.chunk_grad`) beside it;
8. the center gradient (:func:`_center_grad_chunk`) and the feature gradient;
9. the update seam (:class:`pfc.head.update_in_backward.UpdateInBackward`): the optimizer applied to the
   chunk's rows instead of returning their gradient, when asked for; with the Triton kernels and
   the update by chunk, step 8 leaves out the radial term ``−r_j²·u_j·w_j`` and the row update's
   kernel adds it from the rows it loads (no pass over the gradient block for it).

Steps 1b–2 and 6 (the elementwise work on each chunk's ``[S_c, B]`` block) run through the
softmax chunk seam (:mod:`pfc.head.kernels.softmax_chunk`): torch ops, or one Triton launch per
chunk and pass, chosen by ``kernels``; the GEMMs, the MHE columns and the collectives stay here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pfc.distributed.collectives import all_reduce_
from pfc.head.gemm import StorageGemm
from pfc.head.kernels.softmax_chunk import FILTER_MODES, ChunkFilter, softmax_kernels
from pfc.head.margins import Margin
from pfc.head.norms import inverse_norms
from pfc.head.row_optimizer import SparseRowOptimizer
from pfc.head.update_in_backward import UpdateInBackward
from pfc.head.regularizers import MHE
from pfc.head.scratch import Workspace
from pfc.head.targets import Targets

__all__ = ["FILTER_MODES", "LOGITS_MODES", "SoftmaxOptions", "sharded_margin_softmax"]

LOGITS_MODES = ("auto", "keep", "recompute")


@dataclass(frozen=True, kw_only=True)
class SoftmaxOptions:
    """What the sharded softmax needs besides its tensors, as one argument of the autograd
    function (the fields are the arguments of :func:`sharded_margin_softmax`; ``kernels``: the
    softmax chunk's implementation, :func:`pfc.head.kernels.softmax_chunk.softmax_kernels`)."""

    margin: Margin
    group: Any = None
    chunk_rows: int = 2048
    kernels: str = "torch"
    workspace: Workspace = field(default_factory=Workspace)
    filter_threshold: float | None = None
    mhe: MHE | None = None
    optimizer: SparseRowOptimizer | None = None
    filter_mode: str = "exclude"
    keep_logits: bool = True
    check_upstream: bool = True
    keep_rows: bool = True


def _chunk_rows(weight, index, start, stop, workspace, kept=None):
    """The centers of sampled positions ``[start, stop)``: a view of ``weight`` when all rows
    take part, else gathered into ``kept`` (kept for the backward) or a scratch block."""
    if index is None:
        return weight[start:stop]
    out = kept[start:stop] if kept is not None else workspace.get("rows", stop - start, weight)
    return torch.index_select(weight, 0, index[start:stop], out=out)


def _chunk_cosines(rows, operand, block, gemm, inv_norm=None):
    """Step 1a: the products ``block = rows·operandᵀ`` (fp32 whatever the storage type; scaled
    into logits by the chunk kernels and into cosines by :func:`_mhe_cosines_`), and ``r = 1/‖row‖`` written to
    ``inv_norm`` when given (returned, else None)."""
    rows = gemm.rows(rows)
    inv = inverse_norms(rows, out=inv_norm) if inv_norm is not None else None
    gemm.mm(rows, operand.t(), out=block)
    return block, inv


def _mhe_cosines_(block, inv, num_rows):
    """Step 1b for the MHE columns of the products ``block [S_c, B+B]``: the cosines
    ``clamp(r·(w·p), −1, 1)`` in place (the softmax columns are the chunk kernels')."""
    if block.shape[1] > num_rows:
        block[:, num_rows:].mul_(inv[:, None]).clamp_(-1.0, 1.0)


def _global_row_max(local_max, group):
    """Step 3: each row's max logit over all ranks (MAX all-reduce; no gradient flows through it)."""
    return all_reduce_(local_max.clone(), dist.ReduceOp.MAX, group)


def _global_sums(local_max, local_sum, row_max, targets, scale, mhe_sum, mhe_count, group):
    """Step 4: one SUM all-reduce of the sums of exps rescaled to the global max, the target
    logits with and without margin (zero where another rank owns the class) and the MHE sum and
    count. Returns ``(sum_exp, target_logit, raw_target_logit, mhe_total [2])``."""
    num_rows = row_max.shape[0]
    target_logit = torch.where(targets.owned, scale * targets.value, 0.0)
    raw_target_logit = torch.where(targets.owned, scale * targets.cos, 0.0)
    sum_exp = local_sum * torch.exp(local_max - row_max)
    reduced = torch.cat([sum_exp, target_logit, raw_target_logit, mhe_sum[None], mhe_sum.new_full((1,), mhe_count)])
    all_reduce_(reduced, dist.ReduceOp.SUM, group)
    return reduced.split([num_rows, num_rows, num_rows, 2])


def _target_grad(targets, scale, row_max, shift, magnitude):
    """Step 6 at the target cells, for all rows at once: ``|c|·(softmax_y − 1)·dz_y/dcos`` [B],
    with ``softmax_y = exp(s·margin(cos_y) − max − log Σ)`` as the chunk computes it."""
    return (torch.exp((scale * targets.value - row_max) - shift) - magnitude) * targets.slope


def _center_grad_chunk(grad_block, grad_operand_block, block, rows, inv, operand, cells, target_correction,
                       scale, num_rows, workspace, gemm, out, row_sums=None, radial=False):
    """Step 8: ``out = ∂/∂w_j = r_j·A_j − r_j²·u_j·w_j`` for the chunk's centers, with
    ``A = Gᵀ·[X̂; P̂]`` and ``u_j = Σ_i G_ji·c_ji``, where ``c = z/s`` in the softmax block except at
    the targets (there the raw cosine, ``z/s + (cos_y − margin(cos_y))``: ``target_correction
    [B]`` holds ``G_jy·r_j`` times that difference, 0 where the cell is not in this chunk) and the
    cosine itself in the MHE block; ``grad_block`` holds ``G·r`` (fp32),
    ``grad_operand_block`` the same as the GEMM operand, ``inv`` is ``r [S_c]``. ``row_sums``:
    ``r_j·u_j`` over the softmax columns, targets included, when the chunk kernel summed them
    (Triton; ``target_correction`` is then unused), else None: summed here. ``radial``: leave the
    radial term out (``out = r_j·A_j``) and return its coefficient ``r_j²·u_j [S_c]`` (fp32), for
    the row update to add (:attr:`pfc.head.update_in_backward.UpdateInBackward.adds_radial_term`); else None."""
    if row_sums is None:
        product = torch.mul(grad_block, block, out=workspace.get("product", block.shape[0], block))
        u_scaled = product[:, :num_rows].sum(dim=1).div_(scale)  # r_j·u_j
        if block.shape[1] > num_rows:  # the MHE block
            u_scaled += product[:, num_rows:].sum(dim=1)
        u_scaled.index_add_(0, cells.local[0], target_correction)
    else:
        u_scaled = row_sums
        if block.shape[1] > num_rows:  # the MHE block (an fp32 gradient block then)
            u_scaled += (grad_block[:, num_rows:] * block[:, num_rows:]).sum(dim=1)
    gemm.mm(grad_operand_block, operand, out=out)  # r_j·A_j
    if radial:
        return u_scaled.mul_(inv)
    out.addcmul_(rows, u_scaled.mul_(inv)[:, None], value=-1.0)
    return None


class _ShardedMarginSoftmax(torch.autograd.Function):
    """Exact softmax cross-entropy over sharded, sampled class centers (two collectives), with the
    MHE energy of the same centers computed in the same pass when asked for (module docstring)."""

    @staticmethod
    def forward(ctx, features, weight, index, target, options: SoftmaxOptions):
        num_rows, workspace, scale = features.shape[0], options.workspace, options.margin.s
        num_sampled = weight.shape[0] if index is None else index.numel()
        if num_sampled == 0:
            raise ValueError("no class centers to take the softmax over: the sample (or the shard) is empty")
        targets = Targets.of(target, features)
        targets.measure(weight, index, features, options.margin)
        margin_logits = scale * targets.value
        energy = None if options.mhe is None else options.mhe.shard_energy(
            weight, index, targets, num_rows, options.group)
        # with MHE the positive centers join the features as a second block of the GEMM operand
        operand = features if energy is None else torch.cat([features, energy.centers])
        # updating in the backward: the sampled rows gathered here serve the backward and the update
        # (one random pass over W instead of three; no gradient is stored instead)
        update = options.optimizer is not None and index is not None and weight.requires_grad
        kept = workspace.keep_rows(num_sampled, weight) if update and options.keep_rows else None
        gemm = StorageGemm(weight.dtype, weight.device, workspace)
        gemm_operand = gemm.operand(operand)
        logits = features.new_empty(num_sampled, operand.shape[0]) if options.keep_logits else None
        scratch_logits = features.new_empty(0, operand.shape[0])  # the shape of a chunk's recomputed logits
        inv_norm = features.new_empty(num_sampled)
        scaled_inv = features.new_empty(num_sampled)
        filtering = ChunkFilter(options.filter_threshold, options.filter_mode, scale)
        chunk_kernels = softmax_kernels(options.kernels)
        stats = chunk_kernels.statistics(num_rows, features)
        mhe_sum = features.new_zeros(())
        chunk_cells = targets.in_chunks(options.chunk_rows, num_sampled)
        for start in range(0, num_sampled, options.chunk_rows):
            stop = min(start + options.chunk_rows, num_sampled)
            rows = _chunk_rows(weight, index, start, stop, workspace, None if kept is None else kept.rows)
            block = logits[start:stop] if logits is not None else workspace.get("logits", stop - start, scratch_logits)
            block, inv = _chunk_cosines(rows, gemm_operand, block, gemm, inv_norm[start:stop])
            cells = chunk_cells[start // options.chunk_rows]
            torch.mul(inv, scale, out=scaled_inv[start:stop])
            _mhe_cosines_(block, inv, num_rows)
            if energy is not None:  # Σ_{j ≠ y_i} f(ŵ_yi, ŵ_j) over this chunk's centers
                mhe_sum += energy.chunk_sum(block[:, num_rows:], start, cells)
            chunk_kernels.forward(block[:, :num_rows], scaled_inv[start:stop], margin_logits, cells, filtering,
                                  stats, workspace, keep=logits is not None)

        local_max, local_sum = stats.result()
        row_max = _global_row_max(local_max, options.group)
        sum_exp, target_logit, raw_target_logit, mhe_total = _global_sums(
            local_max, local_sum, row_max, targets, scale, mhe_sum, 0 if energy is None else energy.count, options.group)
        log_sum = sum_exp.log()
        loss = (log_sum + row_max - target_logit).mean()
        correct = (target_logit >= row_max) | (raw_target_logit >= row_max)
        accuracy = correct.to(features.dtype).mean()
        energy_value = energy.value(mhe_total[0], mhe_total[1], num_rows) if energy is not None else \
            mhe_total[0] / 1.0  # a zero tensor

        # the large tensors and the inputs go through save_for_backward; the small per-target and
        # MHE pieces ride on ctx in their typed objects
        ctx.save_for_backward(operand, weight, index, logits, inv_norm, scaled_inv, row_max, log_sum)
        ctx.options, ctx.targets, ctx.energy, ctx.kept, ctx.chunk_cells = options, targets, energy, kept, chunk_cells
        ctx.loss = loss.detach() if options.optimizer is not None else None
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy, energy_value

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy, grad_energy):
        operand, weight, index, logits, inv_norm, scaled_inv, row_max, log_sum = ctx.saved_tensors
        options, targets, energy = ctx.options, ctx.targets, ctx.energy
        workspace, scale, num_rows = options.workspace, options.margin.s, row_max.shape[0]
        num_sampled, weight_needs_grad = inv_norm.shape[0], ctx.needs_input_grad[1]
        # G = ∂loss/∂cos = c·(softmax − onehot) with c = s·grad/B, softmax = exp(z − max − log Σ);
        # |c| folds into the exponent, |c|·softmax = exp(z − max − (log Σ − log|c|)) (c = 0 gives
        # exp(−inf) = 0), and the sign of c joins the factor r below: decided on the device.
        # The max is subtracted on its own first: z − max is exact where it matters (near 0).
        coefficient = grad_loss * scale / num_rows
        magnitude, sign = coefficient.abs(), coefficient.sign()
        shift = log_sum - torch.log(magnitude)
        grad_target = _target_grad(targets, scale, row_max, shift, magnitude)
        margin_logits = scale * targets.value   # as the forward wrote them (recompute)
        # per chunk, what the target cells add to u_j (r_j·G_jy·(cos_y − margin(cos_y)))
        chunk_cells = ctx.chunk_cells
        chunk_kernels = softmax_kernels(options.kernels)
        target_corrections = None if chunk_kernels.name != "torch" else chunk_cells.masked(
            grad_target * sign * inv_norm[targets.positions] * (targets.cos - targets.value))
        inv_sign = inv_norm * sign   # r with the sign of c: the factor of G in both products below

        update = None
        if options.optimizer is not None and weight_needs_grad:
            update = _begin_update(options, weight, index, grad_loss, ctx.loss, by_chunk=energy is None)
        grad_values = None
        if weight_needs_grad and not (update is not None and update.by_chunk):
            grad_values = workspace.gradient(num_sampled, operand) if update is None else \
                workspace.get("grad_values", num_sampled, operand)
        # the Triton row update by chunk adds the radial term of the center gradient itself (from
        # the rows it loads): the gradient block is read by nothing else
        fuse_radial = update is not None and update.adds_radial_term
        kept = workspace.kept(ctx.kept)
        gemm = StorageGemm(weight.dtype, weight.device, workspace)
        gemm_operand = gemm.operand(operand)
        filtering = ChunkFilter(options.filter_threshold, options.filter_mode, scale)
        grad_operand = torch.zeros_like(operand)
        scratch_logits = operand.new_empty(0, operand.shape[0])
        scratch_grad = operand.new_empty((0, operand.shape[0]), dtype=chunk_kernels.grad_dtype(gemm, energy is not None))
        for start in range(0, num_sampled, options.chunk_rows):
            stop = min(start + options.chunk_rows, num_sampled)
            rows = kept[start:stop] if kept is not None else _chunk_rows(weight, index, start, stop, workspace)
            rows_operand = gemm.rows(rows)  # the stored rows as a GEMM operand (upcast on the CPU)
            chunk = start // options.chunk_rows
            inv, cells = inv_norm[start:stop], chunk_cells[chunk]
            if logits is not None:
                block = logits[start:stop]
            else:  # recompute the chunk's logits: one more GEMM instead of keeping [S, B]
                block, _ = _chunk_cosines(rows_operand, gemm_operand,
                                          workspace.get("logits", stop - start, scratch_logits), gemm)
                _mhe_cosines_(block, inv, num_rows)
            grad_block = workspace.get("grad", stop - start, scratch_grad)
            # G·r·sign(c) of the softmax columns (and r·sign(c)·u_j from the Triton kernel)
            row_sums = chunk_kernels.backward(
                block[:, :num_rows], logits is None, scaled_inv[start:stop], inv_sign[start:stop], row_max, shift,
                grad_target, margin_logits, targets.cos, cells, filtering, scale, workspace,
                out=grad_block[:, :num_rows])
            if energy is not None:
                energy.chunk_grad(block[:, num_rows:], start, cells, grad_energy, out=grad_block[:, num_rows:])
                grad_block[:, num_rows:].mul_(inv[:, None])
            grad_operand_block = gemm.operand(grad_block)  # cast once, used by both GEMMs
            grad_rows = radial = None
            if weight_needs_grad:
                grad_rows = grad_values[start:stop] if grad_values is not None else \
                    workspace.get("grad_rows", stop - start, operand)
                radial = _center_grad_chunk(
                    grad_block, grad_operand_block, block, rows_operand, inv, gemm_operand, cells,
                    None if target_corrections is None else target_corrections[chunk], scale, num_rows, workspace,
                    gemm, out=grad_rows, row_sums=row_sums, radial=fuse_radial)
            gemm.addmm_(grad_operand, grad_operand_block.t(), rows_operand)  # Σ_j G_j r_j w_j
            if update is not None:  # the rows are no longer needed as they were: update them in place
                update.chunk(start, stop, grad_rows, rows, rows_operand, radial=radial)

        if energy is not None and grad_values is not None:
            energy.return_center_grad(grad_operand[num_rows:], grad_values, options.group)
        grad_weight = None
        if update is not None:
            update.finish(grad_values)
        elif grad_values is not None:
            grad_weight = grad_values if index is None else torch.sparse_coo_tensor(
                index[None], grad_values, weight.shape, is_coalesced=True, check_invariants=False)
        return grad_operand[:num_rows], grad_weight, None, None, None


def _begin_update(options, weight, index, upstream, loss, by_chunk):
    """:meth:`UpdateInBackward.begin`, with the upstream check only when the head checks its inputs."""
    return UpdateInBackward.begin(options.optimizer, weight, index, upstream, loss, by_chunk=by_chunk,
                                  check_upstream=options.check_upstream)


def sharded_margin_softmax(features: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None,
                           target: torch.Tensor, margin: Margin, group=None, chunk_rows: int = 2048,
                           workspace: Workspace | None = None, filter_threshold: float | None = None,
                           mhe: MHE | None = None, optimizer: SparseRowOptimizer | None = None, *,
                           filter_mode: str = "exclude", keep_logits: bool = True, check_upstream: bool = True,
                           keep_rows: bool = True, kernels: str = "torch"):
    """Margin softmax cross-entropy over class centers sharded across the ranks of ``group``.

    Args:
        features: ``[B, D]`` normalised features, the same on every rank (the gathered batch).
        weight: ``[C_r, D]`` this rank's centers (unnormalised).
        index: ``[S]`` sorted local rows taking part this step, or ``None`` for all ``C_r``.
        target: ``[B]`` position of each row's class in this rank's sampled set, −1 elsewhere.
        margin: applied to the target cosine; logits are then scaled by ``margin.s``.
        chunk_rows: centers per chunk of the fused pass.
        workspace: scratch memory reused across calls (a :class:`pfc.head.scratch.Workspace`).
        filter_threshold: inter-class filtering: a non-target logit above ``s·filter_threshold`` is
            treated as label noise, on every rank alike, as ``filter_mode`` says: ``exclude`` leaves
            it out of its row's softmax, ``zero`` sets it to 0 (insightface's convention: it still
            adds exp(0)); no gradient reaches a filtered cell either way.
        mhe: the MHE energy of the sampled centers (:class:`pfc.head.regularizers.MHE`), computed in
            the same pass.
        optimizer: a :class:`pfc.head.row_optimizer.SparseRowOptimizer` over ``weight`` that the backward applies
            to the sampled rows instead of returning their gradient (see
            :meth:`pfc.head.PartialFC.optimizer`, ``update_in_backward``).
        keep_logits: keep the ``[S, B]`` logits for the backward (True) or recompute each chunk's
            there (one more GEMM; bit-identical results, no ``[S, B]`` block held).
        check_upstream: let the update in the backward check on the host that the upstream
            gradient is 1 (a host sync; off on steady-state steps).
        keep_rows: when updating in the backward, keep the sampled rows the forward gathers
            (``S × D`` in the storage type) for the backward and the update (True), or gather them
            again there (one more random pass over the rows, no block held).
        kernels: the softmax chunk's implementation, ``"torch"`` or ``"triton"``
            (:func:`pfc.head.kernels.softmax_chunk.softmax_kernels`; the head passes its resolved
            ``PartialFC.kernels``).

    Returns ``(loss, accuracy, energy)``, scalars: ``loss = mean_i(logsumexp_j z_ij − z_i,y)``
    over all ranks' sampled centers, identical on every rank; accuracy is the share of rows
    whose target cosine is the largest sampled logit; energy the MHE value (0 without ``mhe``).
    Two collectives (MAX of the row max, one SUM); the backward needs none (one all-reduce with
    MHE) and yields ``∂loss/∂features [B, D]`` from this rank's shard only (sum over ranks for
    the total) and ``∂loss/∂weight [C_r, D]`` (sparse COO over ``index`` when given).
    """
    options = SoftmaxOptions(margin=margin, group=group, chunk_rows=chunk_rows, kernels=kernels,
                             workspace=workspace if workspace is not None else Workspace(),
                             filter_threshold=filter_threshold, mhe=mhe, optimizer=optimizer, filter_mode=filter_mode,
                             keep_logits=keep_logits, check_upstream=check_upstream, keep_rows=keep_rows)
    return _ShardedMarginSoftmax.apply(features, weight, index, target, options)
