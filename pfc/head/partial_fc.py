"""PartialFC: the model-parallel margin-softmax head over sharded class centers.

Data flow of one step on N ranks with b rows each (B = N·b):

1. inputs are checked collectively (shapes, dtypes, label range), so every rank raises the
   same error instead of hanging in a collective;
2. the normalised features and the labels are all-gathered: ``X̂ [B, D]``, ``Y [B]``;
3. each rank samples its centers: every positive (a label in ``Y`` it owns) plus
   ``⌈ρ·C_r⌉ − #positives`` others drawn uniformly (none when ρ = 1);
4. :func:`sharded_margin_softmax` computes the exact softmax cross-entropy over all ranks'
   sampled centers with the margin on the target logit.

Gradient convention (it makes DDP's averaging of the backbone exact): the returned loss is the
mean over the B gathered rows, identical on every rank; ``weight.grad = ∂loss/∂W_r`` (a sparse
COO tensor over the sampled rows when ρ < 1, dense when ρ = 1); ``x.grad`` on rank r is
``N · ∂loss/∂x_r``. With ``head.optimizer(update_in_backward=True)`` the backward applies the
optimizer to the sampled rows itself instead, and ``weight.grad`` stays None.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pfc.distributed.collectives import all_gather_tensor, all_reduce_, class_partition, gather_rows, get_rank, get_world_size
from pfc.head.margins import ArcFace, Margin
from pfc.head.optim import SparseRowSGD
from pfc.head.regularizers import MHE, AngularTriplet
from pfc.head.scratch import ScratchBlocks

_NORM_EPS = 1e-12
_EXCLUDED_LOGIT = -1e30  # a filtered logit: exp() is exactly 0 and 0·(−1e30) stays finite
_INIT_BLOCK_ROWS = 4096


def init_centers(num_classes: int, embedding_size: int, class_start: int, num_local: int,
                 seed: int = 0, std: float = 0.01, dtype=torch.float32) -> torch.Tensor:
    """Rows ``[class_start, class_start + num_local)`` of a ``num_classes × D`` matrix drawn from
    ``N(0, std²)``. Rows are generated in fixed global blocks seeded by ``(seed, block)``, so the
    full matrix is the same whatever the world size (a 2-rank run and a 1-rank run start equal).
    """
    out = torch.empty(num_local, embedding_size, dtype=dtype)
    generator = torch.Generator()
    first_block = class_start // _INIT_BLOCK_ROWS
    last_block = (class_start + num_local - 1) // _INIT_BLOCK_ROWS
    for block in range(first_block, last_block + 1):
        block_start = block * _INIT_BLOCK_ROWS
        block_rows = min(_INIT_BLOCK_ROWS, num_classes - block_start)
        generator.manual_seed(int(np.random.SeedSequence([seed, block]).generate_state(1)[0]))
        values = torch.randn(block_rows, embedding_size, generator=generator, dtype=torch.float32)
        lo, hi = max(block_start, class_start), min(block_start + block_rows, class_start + num_local)
        out[lo - class_start:hi - class_start] = values[lo - block_start:hi - block_start] * std
    return out


def sample_classes(labels: torch.Tensor, class_start: int, num_local: int, sample_rate: float,
                   generator: torch.Generator | None = None):
    """Choose this rank's centers for one step and remap the labels to them.

    ``labels`` are the gathered global labels ``[B]``. Returns ``(index, target)``: ``index`` the
    sorted local rows sampled (``None`` when every row is used), ``target[i]`` the position of
    row i's class in the sampled set, or −1 when another rank owns it. Every local positive is
    kept; the number sampled is ``max(⌈ρ·C_r⌉, #positives)``, the rest drawn uniformly without
    replacement from the other local classes.
    """
    local = labels - class_start
    owned = (local >= 0) & (local < num_local)
    if sample_rate >= 1.0:
        return None, torch.where(owned, local, torch.full_like(local, -1))
    positives = torch.unique(local[owned])
    num_sample = max(math.ceil(sample_rate * num_local - 1e-9), positives.numel())
    if num_sample >= num_local:
        index = torch.arange(num_local, device=labels.device)
    else:
        score = torch.rand(num_local, generator=generator, device=labels.device)
        score[positives] = 2.0  # above every uniform draw: positives are always taken
        index = torch.topk(score, num_sample, sorted=False).indices.sort().values
    target = torch.full_like(local, -1)
    target[owned] = torch.searchsorted(index, local[owned])
    return index, target


def _storage_users(storage) -> int | None:
    """How many holders an untyped storage has (None where torch does not tell)."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return None if counter is None else counter(storage._cdata)


class _Workspace(ScratchBlocks):
    """Scratch blocks reused across chunks and steps, and the center-gradient memory.

    The center-gradient block is handed out as ``weight.grad``; a later backward reuses its
    memory only when nothing else holds it any more (after ``zero_grad``). Only the storage is
    kept here, so that autograd can adopt each step's gradient tensor without copying it.
    """

    def __init__(self):
        super().__init__()
        self.gradient_storage = None
        self.gradient_users: int | None = None
        self.kept_token = 0   # which forward the kept rows belong to

    def gradient(self, rows, like):
        """A fresh ``[rows, D]`` tensor for the center gradient, on recycled memory when unshared."""
        shape = (rows, *like.shape[1:])
        needed = math.prod(shape) * like.element_size()
        storage = self.gradient_storage
        if (storage is not None and storage.nbytes() >= needed and storage.device == like.device
                and self.gradient_users is not None and _storage_users(storage) == self.gradient_users):
            return like.new_empty(0).set_(storage, 0, shape)
        block = like.new_empty(shape)
        self.gradient_storage = block.untyped_storage()
        users = _storage_users(self.gradient_storage)
        self.gradient_users = None if users is None else users - 1  # the holders besides ``block``
        return block


def _center_rows(weight, index, start, stop, workspace):
    if index is None:
        return weight[start:stop]
    return torch.index_select(weight, 0, index[start:stop], out=workspace.get("rows", stop - start, weight))


def _positive_centers(weight, index, owned_rows, owned_cols, num_rows, group):
    """The batch's normalised class centers ``[B, D]``: each owner fills its rows, one SUM
    all-reduce. Returns ``(centers, own_unit, own_inv_norm)`` for the owner's backward."""
    own_local = owned_cols if index is None else index[owned_cols]
    own = weight.index_select(0, own_local)
    own_inv_norm = torch.linalg.vector_norm(own, dim=1).clamp_min_(_NORM_EPS).reciprocal_()
    own_unit = own * own_inv_norm[:, None]
    centers = weight.new_zeros(num_rows, weight.shape[1])
    centers[owned_rows] = own_unit
    return all_reduce_(centers, dist.ReduceOp.SUM, group), own_unit, own_inv_norm


class _ShardedMarginSoftmax(torch.autograd.Function):
    """Exact softmax cross-entropy over sharded, sampled class centers (two collectives), with the
    MHE energy of the same centers computed in the same pass when asked for."""

    @staticmethod
    def forward(ctx, features, weight, index, target, margin, group, chunk_rows, workspace, filter_threshold, mhe,
                optimizer):
        num_rows = features.shape[0]
        num_local = weight.shape[0]
        num_sampled = num_local if index is None else index.numel()
        scale = margin.s

        owned_rows = (target >= 0).nonzero().squeeze(1)
        owned_cols = target[owned_rows]
        cos_target = features.new_empty(owned_rows.numel())
        margin_value = features.new_empty(owned_rows.numel())
        margin_grad = features.new_empty(owned_rows.numel())

        # MHE: the positive centers join the features as a second block of the GEMM operand
        operand, own_unit, own_inv_norm, column_weight, mhe_count = features, None, None, None, 0
        if mhe is not None:
            centers, own_unit, own_inv_norm = _positive_centers(weight, index, owned_rows, owned_cols,
                                                                num_rows, group)
            operand = torch.cat([features, centers])
            column_weight, mhe_count = mhe.column_weights(index, owned_cols, num_local)
        mhe_sum = features.new_zeros(())

        # One pass over chunks of centers. Logits are kept classes-major [S, B] (every chunk a
        # contiguous block) as z = s·cos with the margin at the targets; cos = (W·X̂ᵀ)/‖w‖ so no
        # normalised copy of W is made. The local log-sum-exp is accumulated online.
        logits = features.new_empty(num_sampled, operand.shape[0])
        inv_norm = features.new_empty(num_sampled)
        # Updating in the backward: the sampled rows gathered here are kept for the backward and
        # the update (one random pass over W instead of three; no gradient is stored instead)
        kept = None
        if optimizer is not None and index is not None and weight.requires_grad:
            kept = workspace.get("kept_rows", num_sampled, weight)
            workspace.kept_token += 1
        local_max = features.new_full((num_rows,), -math.inf)
        local_sum = features.new_zeros(num_rows)
        for start in range(0, num_sampled, chunk_rows):
            stop = min(start + chunk_rows, num_sampled)
            if kept is not None:
                rows = torch.index_select(weight, 0, index[start:stop], out=kept[start:stop])
            else:
                rows = _center_rows(weight, index, start, stop, workspace)
            block = logits[start:stop]
            inv = torch.linalg.vector_norm(rows, dim=1, out=inv_norm[start:stop])
            inv.clamp_min_(_NORM_EPS).reciprocal_()
            torch.mm(rows, operand.t(), out=block)
            block.mul_(inv[:, None]).clamp_(-1.0, 1.0)
            chunk = block[:, :num_rows]
            in_chunk = (owned_cols >= start) & (owned_cols < stop)
            cols, batch_rows = owned_cols[in_chunk] - start, owned_rows[in_chunk]
            if mhe is not None:  # Σ_{j ≠ y_i} f(ŵ_yi, ŵ_j) over this chunk's centers
                energy = mhe.kernel_value(block[:, num_rows:])
                energy[cols, batch_rows] = 0.0
                if column_weight is not None:
                    energy.mul_(column_weight[start:stop, None])
                mhe_sum += energy.sum()
            cos_target[in_chunk] = chunk[cols, batch_rows]
            value, grad = margin.target_logit(cos_target[in_chunk])
            margin_value[in_chunk], margin_grad[in_chunk] = value, grad
            noisy = chunk > filter_threshold if filter_threshold is not None else None
            chunk.mul_(scale)
            chunk[cols, batch_rows] = scale * value
            if noisy is not None:  # inter-class filtering: non-target cosines above t leave the softmax
                noisy[cols, batch_rows] = False
                chunk.masked_fill_(noisy, _EXCLUDED_LOGIT)
            chunk_max = torch.maximum(chunk.amax(dim=0), local_max)
            local_sum.mul_(torch.exp(local_max - chunk_max))
            local_max = chunk_max
            shifted = torch.sub(chunk, local_max, out=workspace.get("softmax", stop - start, chunk))
            local_sum += shifted.exp_().sum(dim=0)

        # 1. logits max over all ranks (no gradient flows through it)
        row_max = local_max.clone()
        all_reduce_(row_max, dist.ReduceOp.MAX, group)

        # 2. sum of exps rescaled to the global max, the target logits (with and without margin;
        #    zero where another rank owns the class) and the MHE sums: one SUM all-reduce
        target_logit = logits.new_zeros(num_rows)
        target_logit[owned_rows] = scale * margin_value
        raw_target_logit = logits.new_zeros(num_rows)
        raw_target_logit[owned_rows] = scale * cos_target
        sum_exp = local_sum * torch.exp(local_max - row_max)
        reduced = torch.cat([sum_exp, target_logit, raw_target_logit, mhe_sum[None], mhe_sum.new_full((1,), mhe_count)])
        all_reduce_(reduced, dist.ReduceOp.SUM, group)
        sum_exp, target_logit, raw_target_logit, mhe_total = reduced.split([num_rows, num_rows, num_rows, 2])

        # 3. loss = logsumexp − z_y, mean over the gathered rows
        loss = (sum_exp.log() + row_max - target_logit).mean()
        correct = (target_logit >= row_max) | (raw_target_logit >= row_max)
        mhe_denominator = mhe.denominator(num_rows, int(round(float(mhe_total[1])))) if mhe is not None else 1.0
        energy = mhe_total[0] / mhe_denominator

        ctx.save_for_backward(operand, weight, index, logits, inv_norm, row_max, sum_exp.log(), owned_rows,
                              owned_cols, cos_target - margin_value, margin_grad, own_unit, own_inv_norm,
                              column_weight)
        ctx.scale, ctx.chunk_rows, ctx.workspace, ctx.group = scale, chunk_rows, workspace, group
        ctx.mhe, ctx.mhe_denominator, ctx.num_rows = mhe, mhe_denominator, num_rows
        ctx.weight_needs_grad = weight.requires_grad
        ctx.optimizer, ctx.kept, ctx.kept_token = optimizer, kept, workspace.kept_token
        ctx.loss = loss.detach() if optimizer is not None else None
        accuracy = correct.to(features.dtype).mean()
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy, energy

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy, grad_energy):
        (operand, weight, index, logits, inv_norm, row_max, log_sum, owned_rows, owned_cols,
         target_shift, margin_grad, own_unit, own_inv_norm, column_weight) = ctx.saved_tensors
        num_sampled = logits.shape[0]
        num_rows, mhe = ctx.num_rows, ctx.mhe
        scale, workspace = ctx.scale, ctx.workspace
        # G = ∂loss/∂cos = c·(softmax − onehot) with c = s·grad/B, softmax = exp(z − max − log Σ);
        # for c > 0 the factor folds into the exponent: c·softmax = exp(z − max − (log Σ − log c)).
        # The max is subtracted on its own first: z − max is exact where it matters (near 0).
        coefficient = grad_loss * scale / num_rows
        fold = bool(coefficient > 0)
        shift = log_sum - torch.log(coefficient) if fold else log_sum
        mhe_coefficient = grad_energy / ctx.mhe_denominator if mhe is not None else None

        optimizer = ctx.optimizer if ctx.weight_needs_grad else None
        if optimizer is not None and float(grad_loss) != 1.0:
            raise ValueError(f"the head's optimizer updates the centers in the backward, which needs the "
                             f"head's loss backpropagated as it is (upstream gradient 1, got {float(grad_loss):g}); "
                             "for loss scaling or gradient accumulation use head.optimizer(update_in_backward=False)")
        update = optimizer is not None and bool(torch.isfinite(ctx.loss))   # a non-finite loss updates nothing
        kept = ctx.kept if ctx.kept is not None and ctx.kept_token == workspace.kept_token else None
        # the fused update: chunk by chunk, unless MHE adds to the positive rows after the loop
        chunk_update = update and mhe is None
        grad_operand = torch.zeros_like(operand)
        grad_values = None
        if ctx.weight_needs_grad and not chunk_update:
            grad_values = workspace.gradient(num_sampled, operand) if optimizer is None else \
                workspace.get("grad_values", num_sampled, operand)
        for start in range(0, num_sampled, ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, num_sampled)
            rows = kept[start:stop] if kept is not None else _center_rows(weight, index, start, stop, workspace)
            inv = inv_norm[start:stop, None]
            block = logits[start:stop]
            grad_block = workspace.get("grad", stop - start, logits)
            grad_cos = grad_block[:, :num_rows]
            torch.sub(block[:, :num_rows], row_max, out=grad_cos)
            grad_cos.sub_(shift).exp_()
            if not fold:
                grad_cos.mul_(coefficient)
            in_chunk = (owned_cols >= start) & (owned_cols < stop)
            cols, batch_rows = owned_cols[in_chunk] - start, owned_rows[in_chunk]
            grad_target = (grad_cos[cols, batch_rows] - coefficient) * margin_grad[in_chunk]
            grad_cos[cols, batch_rows] = grad_target
            if mhe is not None:
                grad_energy_block = grad_block[:, num_rows:]
                torch.mul(mhe.kernel_grad(block[:, num_rows:]), mhe_coefficient, out=grad_energy_block)
                grad_energy_block[cols, batch_rows] = 0.0
                if column_weight is not None:
                    grad_energy_block.mul_(column_weight[start:stop, None])
            grad_block.mul_(inv)  # in place: G·r, the factor of both products below
            if ctx.weight_needs_grad:
                # ∂/∂w_j = r_j·A_j − r_j²·u_j·w_j with A = Gᵀ·[X̂; P̂] and u_j = Σ_i G_ji·c_ji, where
                # c = z/s in the softmax block except at the targets (there the raw cosine,
                # z/s + target_shift), and the cosine itself in the MHE block
                product = torch.mul(grad_block, block, out=workspace.get("product", stop - start, logits))
                u_scaled = product[:, :num_rows].sum(dim=1).div_(scale)  # r_j·u_j
                if mhe is not None:
                    u_scaled += product[:, num_rows:].sum(dim=1)
                u_scaled.index_add_(0, cols, grad_target * inv[cols, 0] * target_shift[in_chunk])
                grad_rows = grad_values[start:stop] if grad_values is not None else \
                    workspace.get("grad_rows", stop - start, operand)
                torch.mm(grad_block, operand, out=grad_rows)  # r_j·A_j
                grad_rows.addcmul_(rows, u_scaled[:, None] * inv, value=-1.0)
            grad_operand.addmm_(grad_block.t(), rows)  # Σ_j G_j r_j w_j
            if chunk_update:  # rows are no longer needed as they were: update them in place
                if index is None:
                    optimizer.update_rows(weight, slice(start, stop), grad_rows)
                else:
                    optimizer.update_rows(weight, index[start:stop], grad_rows, weight_rows=rows)

        if mhe is not None and grad_values is not None:
            # the positive centers: every rank's share summed, then through p̂ = w·r to the owner's
            # row, which is in this rank's sampled set at position target
            grad_centers = all_reduce_(grad_operand[num_rows:].contiguous(), dist.ReduceOp.SUM, ctx.group)
            own_grad = grad_centers[owned_rows]
            own_grad.sub_(own_unit * (own_grad * own_unit).sum(dim=1, keepdim=True)).mul_(own_inv_norm[:, None])
            grad_values.index_add_(0, owned_cols, own_grad)

        grad_weight = None
        if optimizer is not None:
            if update and not chunk_update:
                optimizer.update_rows(weight, slice(0, num_sampled) if index is None else index, grad_values)
        elif grad_values is not None:
            if index is None:
                grad_weight = grad_values
            else:
                grad_weight = torch.sparse_coo_tensor(index[None], grad_values, weight.shape,
                                                      is_coalesced=True, check_invariants=False)
        return grad_operand[:num_rows], grad_weight, None, None, None, None, None, None, None, None, None


def sharded_margin_softmax(features: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None,
                           target: torch.Tensor, margin: Margin, group=None, chunk_rows: int = 2048,
                           workspace: _Workspace | None = None, filter_threshold: float | None = None,
                           mhe: MHE | None = None, optimizer: SparseRowSGD | None = None):
    """Margin softmax cross-entropy over class centers sharded across the ranks of ``group``.

    Args:
        features: ``[B, D]`` normalised features, the same on every rank (the gathered batch).
        weight: ``[C_r, D]`` this rank's centers (unnormalised).
        index: ``[S]`` sorted local rows taking part this step, or ``None`` for all ``C_r``.
        target: ``[B]`` position of each row's class in this rank's sampled set, −1 elsewhere.
        margin: applied to the target cosine; logits are then scaled by ``margin.s``.
        filter_threshold: inter-class filtering; a non-target cosine above it is left out of its
            row's softmax (treated as label noise), on every rank alike.
        mhe: the MHE energy of the sampled centers (:class:`pfc.head.regularizers.MHE`), computed in
            the same pass.
        optimizer: a :class:`pfc.head.optim.SparseRowSGD` over ``weight`` that the backward applies
            to the sampled rows instead of returning their gradient (see
            :meth:`PartialFC.optimizer`, ``update_in_backward``).

    Returns ``(loss, accuracy, energy)``: ``loss = mean_i(logsumexp_j z_ij − z_i,y)`` over all
    ranks' sampled centers, identical on every rank; accuracy is the share of rows whose target
    cosine is the largest sampled logit; energy the MHE value (0 without ``mhe``). Two collectives (MAX of the row max, one SUM); the backward
    needs none and yields ``∂loss/∂features`` from this rank's shard only (sum over ranks for
    the total) and ``∂loss/∂weight`` (sparse COO over ``index`` when given).
    """
    return _ShardedMarginSoftmax.apply(features, weight, index, target, margin, group, chunk_rows,
                                       workspace if workspace is not None else _Workspace(), filter_threshold,
                                       mhe, optimizer)


_DTYPE_CODES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _dtype_name(code: int) -> str:
    return str(_DTYPE_CODES[code]).replace("torch.", "") if 0 <= code < len(_DTYPE_CODES) else "other"


class PartialFC(nn.Module):
    """Sharded class centers with Partial-FC sampling and an exact distributed margin softmax.

    Rank r of N owns rows ``[class_start, class_start + num_local)`` of the ``C × D`` center
    matrix, ``num_local = C//N + (r < C%N)``. ``forward(x, labels)`` takes this rank's
    embeddings ``[b, D]`` and global labels ``[b]`` and returns the loss (the same scalar on
    every rank); see the module docstring for the gradient convention. ``sample_rate`` ρ < 1
    samples ``max(⌈ρ·C_r⌉, #positives)`` centers per rank per step in training mode (all
    centers in eval mode); the sample is reproducible from ``(seed, rank, iteration)``.

    Optional terms, added to the returned loss: ``mhe`` (:class:`pfc.head.regularizers.MHE`, weight·E
    on the sampled centers), ``triplet`` (:class:`pfc.head.regularizers.AngularTriplet`, weight·term on
    the gathered batch); ``interclass_filter=t`` leaves non-target cosines above t out of the
    softmax (label-noise filtering as in the WebFace42M recipes), identically on every rank.

    After a forward, ``last_stats`` holds its parts as floats and ``last_sample`` the
    ``(index, target)`` of :func:`sample_classes` (which local rows took part, where each row's
    class sits among them).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: Margin | None = None,
                 sample_rate: float = 1.0, group=None, seed: int = 0, init_std: float = 0.01,
                 chunk_rows: int = 2048, dtype: torch.dtype = torch.float32, device=None,
                 mhe: MHE | None = None, triplet: AngularTriplet | None = None,
                 interclass_filter: float | None = None):
        super().__init__()
        self.check_options(sample_rate=sample_rate, embedding_size=embedding_size, chunk_rows=chunk_rows,
                           interclass_filter=interclass_filter)
        self.group = group
        self.rank = get_rank(group)
        self.world_size = get_world_size(group)
        partition = class_partition(num_classes, self.world_size, self.rank)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.class_start = partition.class_start
        self.num_local = partition.num_local
        self.margin = margin if margin is not None else ArcFace()
        self.sample_rate = float(sample_rate)
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.mhe = mhe
        self.triplet = triplet
        self.interclass_filter = interclass_filter
        self.weight = nn.Parameter(init_centers(num_classes, embedding_size, self.class_start,
                                                self.num_local, seed, init_std, dtype).to(device))
        self.iteration = 0
        self._forwards_this_iteration = 0
        self._stats: dict[str, torch.Tensor] = {}
        self._workspace = _Workspace()
        self._optimizer_in_backward: SparseRowSGD | None = None
        self.last_sample: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @staticmethod
    def check_options(*, sample_rate: float, embedding_size: int, chunk_rows: int,
                      interclass_filter: float | None) -> None:
        """ValueError naming the option when one of these constructor options cannot be used."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} outside (0, 1]")
        if embedding_size < 1:
            raise ValueError(f"embedding_size={embedding_size} must be >= 1")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
        if interclass_filter is not None and not -1.0 <= interclass_filter <= 1.0:
            raise ValueError(f"interclass_filter={interclass_filter} outside [-1, 1] (it is a cosine)")

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"rows=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, margin={self.margin}")

    def set_iteration(self, iteration: int) -> None:
        """Set the training iteration: seeds the sampling and advances the margin's schedule."""
        self.iteration = int(iteration)
        self._forwards_this_iteration = 0
        self.margin.set_iteration(iteration)
        if self.triplet is not None:
            self.triplet.set_iteration(iteration)

    @property
    def last_stats(self) -> dict[str, float]:
        """Parts of the last forward as floats: ``loss`` (the total), ``ce`` (the cross-entropy),
        ``accuracy`` (share of the gathered batch whose target is the top sampled logit), and
        when enabled ``mhe`` (E, unweighted), ``triplet`` (the term, unweighted) and
        ``triplet_pairs``. Reading it synchronises with the device."""
        return {name: float(value) for name, value in self._stats.items()}

    def optimizer(self, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                  update_in_backward: bool = False, **options) -> SparseRowSGD:
        """The center optimizer: SGD that updates only the rows sampled this step
        (see :class:`pfc.head.optim.SparseRowSGD`; ``options``: ``momentum_dtype``, ``chunk_rows``).

        ``update_in_backward=True``: the update is applied inside the head's backward, chunk by
        chunk, with the same result bit for bit, and ``weight.grad`` is never stored (``step()``
        and ``zero_grad()`` then have nothing to do for the centers). The rows gathered by the
        forward serve the backward and the update, so a sampled step moves its rows at random
        four times instead of six, and holds no gradient: the fastest and leanest way to train.
        It needs the head's loss backpropagated as it is (no loss scaling, no division for
        gradient accumulation: the backward raises ValueError otherwise) and one backward per
        forward; a non-finite loss leaves the centers as they were. The learning rate, momentum
        and weight decay are read from the optimizer's param group at each backward, so LR
        schedulers work unchanged. The trainer uses it unless fp16 loss scaling, gradient
        accumulation or DeepSpeed is on.
        """
        optimizer = SparseRowSGD([self.weight], lr=lr, momentum=momentum, weight_decay=weight_decay, **options)
        self._optimizer_in_backward = optimizer if update_in_backward else None
        return optimizer

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of this step; ``x [b, D]`` this rank's embeddings, ``labels [b]`` global ids."""
        self._check_inputs(x, labels)
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            features = F.normalize(x.to(self.weight.dtype), dim=1, eps=_NORM_EPS)
            features = gather_rows(features, self.group, grad_scale=self.world_size)
            labels = all_gather_tensor(labels.to(self.weight.device, torch.int64), self.group)
            index, target = self._sample(labels)
            ce, accuracy, energy = sharded_margin_softmax(
                features, self.weight, index, target, self.margin, self.group, self.chunk_rows, self._workspace,
                self.interclass_filter, self.mhe, self._optimizer_in_backward if self.training else None)
            loss = ce
            stats = {"ce": ce.detach(), "accuracy": accuracy}
            if self.mhe is not None:
                loss = loss + self.mhe.weight * energy
                stats["mhe"] = energy.detach()
            if self.triplet is not None:
                triplet, pairs = self.triplet.term(features, labels, self.group)
                loss = loss + self.triplet.weight * triplet
                stats["triplet"], stats["triplet_pairs"] = triplet.detach(), torch.tensor(pairs)
        self._stats = {"loss": loss.detach(), **stats}
        self.last_sample = (index, target)
        return loss

    def _sample(self, labels):
        if not self.training or self.sample_rate >= 1.0:
            return sample_classes(labels, self.class_start, self.num_local, 1.0)
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed(int(np.random.SeedSequence(
            [self.seed, self.rank, self.iteration, self._forwards_this_iteration]).generate_state(1)[0]))
        self._forwards_this_iteration += 1
        return sample_classes(labels, self.class_start, self.num_local, self.sample_rate, generator)

    def _check_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Gather a few facts about every rank's inputs and raise the same error on all ranks."""
        def code(dtype):
            return _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else -1

        integer_labels = not labels.dtype.is_floating_point and labels.dtype != torch.bool
        has_labels = integer_labels and labels.numel() > 0
        facts = torch.tensor([
            x.dim(), x.shape[0] if x.dim() else -1, x.shape[-1] if x.dim() else -1, code(x.dtype),
            labels.dim(), labels.shape[0] if labels.dim() else -1, code(labels.dtype), int(integer_labels),
            int(labels.min()) if has_labels else 0, int(labels.max()) if has_labels else 0,
        ], dtype=torch.int64, device=self.weight.device)
        table = all_gather_tensor(facts[None], self.group).tolist()

        problems = []
        for rank, (x_dim, rows, width, x_code, label_dim, label_rows, label_code, is_int, low, high) in enumerate(table):
            where = f"rank {rank}: " if self.world_size > 1 else ""
            if x_dim != 2:
                problems.append(f"{where}embeddings must be [batch, {self.embedding_size}], got a {x_dim}-d tensor")
            elif width != self.embedding_size:
                problems.append(f"{where}embedding width {width} does not match embedding_size={self.embedding_size}")
            elif rows == 0:
                problems.append(f"{where}empty batch")
            if _dtype_name(x_code) not in ("float32", "float64", "float16", "bfloat16"):
                problems.append(f"{where}embeddings must be floating point, got {_dtype_name(x_code)}")
            if not is_int:
                problems.append(f"{where}labels must be an integer tensor, got {_dtype_name(label_code)}")
            elif label_dim != 1 or label_rows != rows:
                problems.append(f"{where}labels must have shape [{rows}] to match the embeddings")
            elif low < 0 or high >= self.num_classes:
                bad = low if low < 0 else high
                problems.append(f"{where}label {bad} outside [0, {self.num_classes})")
        if not problems:
            sizes = [row[1] for row in table]
            if len(set(sizes)) > 1:
                problems.append(f"batch sizes differ across ranks: {sizes}; every rank must pass the same batch size")
            dtypes = [_dtype_name(row[3]) for row in table]
            if len(set(dtypes)) > 1:
                problems.append(f"embedding dtypes differ across ranks: {dtypes}")
        if problems:
            raise ValueError("PartialFC input: " + "; ".join(problems))
