"""PartialFC: the model-parallel margin-softmax head over sharded class centers.

Data flow of one step on N ranks with b rows each (B = N·b):

1. with ``check_inputs`` (the default; the trainer turns it off on steady-state steps), inputs
   are checked collectively (shapes, dtypes, label range), so every rank raises the same error
   instead of hanging in a collective; this reads values on the host;
2. the normalised features and the labels are all-gathered in one collective: ``X̂ [B, D]``,
   ``Y [B]`` (fp32 features whatever the center storage type);
3. each rank samples ``S_r = max(⌈ρ·C_r⌉, min(B, C_r))`` centers (a static count: no host
   read): every positive (a label in ``Y`` it owns) plus others drawn uniformly (all when ρ = 1;
   :mod:`pfc.head.sampling`);
4. :func:`pfc.head.softmax.sharded_margin_softmax` computes the exact softmax cross-entropy
   over all ranks' sampled centers with the margin on the target logit (and MHE's energy of the
   same centers, :class:`pfc.head.regularizers.MHE`, in the same pass).

Rank r owns rows ``[class_start, class_start + num_local)`` of the ``C × D`` center matrix
(:mod:`pfc.head.partition`), stored in ``dtype`` (fp32, bf16 or fp16: :mod:`pfc.head.gemm`).

Collectives of one training step (``check_inputs`` off): forward: the all-gather of features and
labels, the MAX and the SUM all-reduce of the softmax; backward: the reduce-scatter of the
feature gradient. Four in all; MHE adds one all-reduce in each pass, the triplet one in the
forward; ``check_inputs`` adds the collective input check. A steady-state step (``check_inputs``
off) reads no tensor value on the host: shapes are static, decisions are made on the device
(``step_stats`` holds the parts of the loss as device tensors).

Gradient convention (it makes DDP's averaging of the backbone exact): the returned loss is the
mean over the B gathered rows, identical on every rank; ``weight.grad = ∂loss/∂W_r`` (a sparse
COO tensor over the sampled rows when ρ < 1, dense when ρ = 1); ``x.grad`` on rank r is
``N · ∂loss/∂x_r``. With ``head.optimizer(update_in_backward=True)`` the backward applies the
optimizer to the sampled rows itself instead, and ``weight.grad`` stays None.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pfc.distributed.agree import agree_on_error
from pfc.distributed.collectives import gather_rows_and_labels, get_rank, get_world_size
from pfc.head.chunking import auto_chunk_rows
from pfc.head.kernels import KERNEL_CHOICES, resolve_kernels
from pfc.head.margins import ArcFace, Margin
from pfc.head.norms import NORM_EPS
from pfc.head.adamw import SparseRowAdamW
from pfc.head.optim import SparseRowSGD
from pfc.head.row_optimizer import SparseRowOptimizer
from pfc.head.partition import class_partition
from pfc.head.regularizers import MHE, AngularTriplet
from pfc.head.sampling import hashed_normal, sample_classes
from pfc.head.scratch import Workspace
from pfc.head.softmax import FILTER_MODES, LOGITS_MODES, sharded_margin_softmax

_INIT_BLOCK_ROWS = 4096
# the embedding dtypes the head takes, numbered for the cross-rank comparison of the inputs
_EMBEDDING_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_LEGEND = ", ".join(f"{code} {str(dtype).removeprefix('torch.')}" for code, dtype in enumerate(_EMBEDDING_DTYPES))


def init_centers(num_classes: int, embedding_size: int, class_start: int, num_local: int,
                 seed: int = 0, std: float = 0.01, dtype=torch.float32, device=None) -> torch.Tensor:
    """Rows ``[class_start, class_start + num_local)`` of a ``num_classes × D`` matrix drawn from
    ``N(0, std²)``, created on ``device``. Rows are generated in fixed global blocks seeded by
    ``(seed, block)``, so the full matrix is the same whatever the world size (a 2-rank run and a
    1-rank run start equal). On the CPU with torch's generator; on any other device from a
    counter-based hash (:func:`hashed_normal`, no generator object, so fake CUDA tensors work too).
    """
    if device is not None and torch.device(device).type != "cpu":
        # blocks joined by one cat (an in-place write into a slice breaks fake CUDA tensors): the
        # transient 2× storage comes before the momentum and scratch exist, below a step's peak
        blocks = [(hashed_normal(seed, class_start + start, min(_INIT_BLOCK_ROWS, num_local - start),
                                 embedding_size, device) * std).to(dtype)
                  for start in range(0, num_local, _INIT_BLOCK_ROWS)]
        return torch.cat(blocks)
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


class PartialFC(nn.Module):
    """Sharded class centers with Partial-FC sampling and an exact distributed margin softmax.

    Rank r of N owns rows ``[class_start, class_start + num_local)`` of the ``C × D`` center
    matrix, ``num_local = C//N + (r < C%N)``. ``forward(x, labels)`` takes this rank's
    embeddings ``[b, D]`` and global labels ``[b]`` and returns the loss (the same scalar on
    every rank); see the module docstring for the gradient convention. ``sample_rate`` ρ < 1
    samples ``max(⌈ρ·C_r⌉, min(B, C_r))`` centers per rank per step in training mode (all
    centers in eval mode; B the gathered batch); the sample is reproducible from
    ``(seed, iteration)`` and the same on every device.

    ``dtype`` is the centers' storage type (fp32, bf16, fp16; GEMMs in it with fp32 results;
    narrow storage gathers the sampled rows again in the backward instead of keeping them from
    the forward: one more random pass over ``S`` rows, ``S·D`` storage bytes less at the peak);
    ``logits``: ``keep`` the ``[S, B]`` logits for the backward, ``recompute`` each chunk's in the
    backward (one more GEMM, no ``[S, B]`` block), ``auto`` recomputes when the kept logits would
    exceed ``logits_budget`` × the centers' storage bytes. ``check_inputs`` (attribute too): the
    collective input check of each forward (host syncs); turn it off on steady-state steps when
    the labels are checked elsewhere (the trainer checks them on the loader's CPU tensors).
    ``kernels``: ``"auto"`` (Triton on CUDA when it imports, else torch), ``"torch"`` or
    ``"triton"`` (:mod:`pfc.head.kernels`), resolved once into :attr:`kernels`. ``chunk_rows``:
    sampled centers per chunk of the fused softmax; None (the default): 2,048 on the CPU, from a
    scratch-memory budget on a GPU (:mod:`pfc.head.chunking`); :attr:`last_chunk_rows` says what
    the last forward used.

    Optional terms, added to the returned loss: ``mhe`` (:class:`pfc.head.regularizers.MHE`, weight·E
    on the sampled centers), ``triplet`` (:class:`pfc.head.regularizers.AngularTriplet`, weight·term on
    the gathered batch); ``interclass_filter=t`` leaves non-target cosines above t out of the
    softmax (``interclass_filter_mode="exclude"``, the default) or sets their logit to 0, so each
    still adds exp(0) to its row's softmax (``"zero"``: insightface's WebFace42M recipes multiply
    the filtered cosine by 0), identically on every rank; neither passes a gradient to the cell.

    After a forward, ``step_stats`` holds its parts as 0-d device tensors, ``last_stats`` the same
    as floats (a host sync) and ``last_sample`` the
    ``(index, target)`` of :func:`sample_classes` (which local rows took part, where each row's
    class sits among them).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: Margin | None = None,
                 sample_rate: float = 1.0, group=None, seed: int = 0, init_std: float = 0.01,
                 chunk_rows: int | None = None, dtype: torch.dtype = torch.float32, device=None,
                 mhe: MHE | None = None, triplet: AngularTriplet | None = None,
                 interclass_filter: float | None = None, interclass_filter_mode: str = "exclude",
                 logits: str = "auto", logits_budget: float = 0.1, check_inputs: bool = True,
                 kernels: str = "auto"):
        super().__init__()
        self.check_options(sample_rate=sample_rate, embedding_size=embedding_size, chunk_rows=chunk_rows,
                           interclass_filter=interclass_filter, interclass_filter_mode=interclass_filter_mode,
                           logits=logits, logits_budget=logits_budget, kernels=kernels)
        if mhe is not None and num_classes < 2:
            raise ValueError(f"MHE needs at least two classes, got num_classes={num_classes}")
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
        self.last_chunk_rows: int | None = None   # the rows per chunk the last forward used
        self.mhe = mhe
        self.triplet = triplet
        self.interclass_filter = interclass_filter
        self.interclass_filter_mode = interclass_filter_mode
        self.logits = logits
        self.logits_budget = float(logits_budget)
        self.check_inputs = check_inputs
        self.weight = nn.Parameter(init_centers(num_classes, embedding_size, self.class_start,
                                                self.num_local, seed, init_std, dtype, device))
        # features, margins, softmax statistics and the loss: fp32 whatever the storage type
        self.compute_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        # "torch" or "triton", decided once: forward, backward and the update run on one implementation
        self.kernels = resolve_kernels(kernels, self.weight.device)
        if self.kernels == "triton" and self.compute_dtype != torch.float32:
            if kernels == "triton":
                raise ValueError(f"kernels='triton' computes in fp32; centers stored in {self.weight.dtype} "
                                 "need kernels='torch'")
            self.kernels = "torch"   # auto: fp64 centers stay on the torch path
        self.iteration = 0
        self._forwards_this_iteration = 0
        self._stats: dict[str, torch.Tensor] = {}
        self._workspace = Workspace()
        self._optimizer_in_backward: SparseRowOptimizer | None = None
        self.last_sample: tuple[torch.Tensor | None, torch.Tensor] | None = None

    @staticmethod
    def check_options(*, sample_rate: float, embedding_size: int, chunk_rows: int | None = None,
                      interclass_filter: float | None = None, interclass_filter_mode: str = "exclude",
                      logits: str = "auto", logits_budget: float = 0.1, kernels: str = "auto") -> None:
        """Raise ValueError naming the first option the head cannot use (the constructor's checks,
        callable before building one, e.g. by a config's validation)."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} outside (0, 1]")
        if embedding_size < 1:
            raise ValueError(f"embedding_size={embedding_size} must be >= 1")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows} must be >= 1 (None, or 0 in the config: automatic)")
        if interclass_filter is not None and not -1.0 <= interclass_filter <= 1.0:
            raise ValueError(f"interclass_filter={interclass_filter} outside [-1, 1] (it is a cosine)")
        if interclass_filter_mode not in FILTER_MODES:
            raise ValueError(f"interclass_filter_mode={interclass_filter_mode!r} is not one of {FILTER_MODES}")
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits={logits!r} is not one of {LOGITS_MODES}")
        if not logits_budget >= 0:
            raise ValueError(f"logits_budget={logits_budget} must be >= 0")
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r} is not one of {KERNEL_CHOICES}")

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"rows=[{self.class_start}, {self.class_start + self.num_local}), "
                f"sample_rate={self.sample_rate}, margin={self.margin}, dtype={self.weight.dtype}, "
                f"logits={self.logits}")

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
        ``triplet_pairs``, ``triplet_rows_with_positive``. Reading it synchronises with the device."""
        return {name: float(value) for name, value in self._stats.items()}

    @property
    def step_stats(self) -> dict[str, torch.Tensor]:
        """The parts of :attr:`last_stats` as detached 0-d tensors on the head's device (no host sync)."""
        return dict(self._stats)

    def optimizer(self, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                  update_in_backward: bool = False, **options) -> SparseRowSGD:
        """The center optimizer: SGD that updates only the rows sampled this step
        (see :class:`pfc.head.optim.SparseRowSGD`; ``options``: ``momentum_dtype``, ``chunk_rows``
        (for ``step()``), ``rounding``, ``seed``). It updates the rows with the head's kernels
        (:attr:`kernels`: torch, or one Triton kernel per chunk).

        ``update_in_backward=True``: the update is applied inside the head's backward, chunk by
        chunk, with the same result bit for bit (D a multiple of 16), and ``weight.grad`` is never stored (``step()``
        and ``zero_grad()`` then have nothing to do for the centers). The rows gathered by the
        forward serve the backward and the update, so a sampled step moves its rows at random
        four times instead of six (five with narrow storage, which gathers them again rather
        than keep them), and holds no gradient: the fastest and leanest way to train.
        It needs the head's loss backpropagated as it is (no loss scaling, no division for
        gradient accumulation: the backward raises ValueError otherwise) and one backward per
        forward; a non-finite loss leaves the centers as they were. The learning rate, momentum
        and weight decay are read from the optimizer's param group at each backward, so LR
        schedulers work unchanged. The trainer uses it unless fp16 loss scaling, gradient
        accumulation or DeepSpeed is on.
        """
        if "kernels" in options:
            raise ValueError("the head's optimizer runs the head's kernels: choose them with PartialFC(kernels=...)")
        optimizer = SparseRowSGD([self.weight], lr=lr, momentum=momentum, weight_decay=weight_decay,
                                 kernels=self.kernels, **options)
        self._optimizer_in_backward = optimizer if update_in_backward else None
        return optimizer

    def adamw(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 1e-2, update_in_backward: bool = False, **options) -> SparseRowAdamW:
        """The center optimizer as row-sparse AdamW: moments, step counts and the update only on
        the rows sampled this step, bias-corrected by each row's own count (see
        :class:`pfc.head.adamw.SparseRowAdamW`; ``options``: ``moment_dtype``, ``chunk_rows``,
        ``rounding``, ``seed``). ``update_in_backward`` as for :meth:`optimizer`."""
        if "kernels" in options:
            raise ValueError("the head's optimizer runs the head's kernels: choose them with PartialFC(kernels=...)")
        optimizer = SparseRowAdamW([self.weight], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   kernels=self.kernels, **options)
        self._optimizer_in_backward = optimizer if update_in_backward else None
        return optimizer

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of this step; ``x [b, D]`` this rank's embeddings, ``labels [b]`` global ids."""
        if self.check_inputs:
            self._check_inputs(x, labels)
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            features = F.normalize(x.to(self.compute_dtype), dim=1, eps=NORM_EPS)
            features, labels = gather_rows_and_labels(features, labels.to(self.weight.device), self.group,
                                                      grad_scale=self.world_size)
            index, target = self._sample(labels)
            columns = features.shape[0] * (2 if self.mhe is not None else 1)
            self.last_chunk_rows = self.chunk_rows or auto_chunk_rows(
                self.weight.device, columns, self.embedding_size, self.weight.dtype)
            ce, accuracy, energy = sharded_margin_softmax(
                features, self.weight, index, target, self.margin, self.group, self.last_chunk_rows, self._workspace,
                self.interclass_filter, self.mhe, self._optimizer_in_backward if self.training else None,
                filter_mode=self.interclass_filter_mode, keep_logits=self._keep_logits(features.shape[0], index),
                check_upstream=self.check_inputs, keep_rows=self.compute_dtype == self.weight.dtype,
                kernels=self.kernels)
            loss = ce
            stats = {"ce": ce.detach(), "accuracy": accuracy}
            if self.mhe is not None:
                loss = loss + self.mhe.weight * energy
                stats["mhe"] = energy.detach()
            if self.triplet is not None:
                triplet = self.triplet.term(features, labels, self.group)
                loss = loss + self.triplet.weight * triplet.value
                stats.update(triplet=triplet.value.detach(), triplet_pairs=triplet.pairs,
                             triplet_rows_with_positive=triplet.rows_with_positive)
        self._stats = {"loss": loss.detach(), **stats}
        self.last_sample = (index, target)
        return loss

    def _keep_logits(self, num_rows: int, index: torch.Tensor | None) -> bool:
        """Keep the ``[S, B]`` logits for the backward (else recompute them), per ``logits``."""
        if self.logits != "auto":
            return self.logits == "keep"
        columns = num_rows * (2 if self.mhe is not None else 1)
        num_sampled = self.num_local if index is None else index.shape[0]
        logits_bytes = num_sampled * columns * torch.finfo(self.compute_dtype).bits // 8
        storage_bytes = self.weight.numel() * self.weight.element_size()
        return logits_bytes <= self.logits_budget * storage_bytes

    def _sample(self, labels):
        if not self.training or self.sample_rate >= 1.0:
            return sample_classes(labels, self.class_start, self.num_local, 1.0)
        key = int(np.random.SeedSequence([self.seed, self.iteration, self._forwards_this_iteration])
                  .generate_state(2, dtype=np.uint64)[0])
        self._forwards_this_iteration += 1
        return sample_classes(labels, self.class_start, self.num_local, self.sample_rate, key, kernels=self.kernels)

    def _check_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Collective: every rank checks its own inputs, then all raise the same error (naming
        each failing rank and its causes) if any rank failed or the batch sizes or embedding
        dtypes differ across ranks."""
        problems = self._input_problems(x, labels)
        error = ValueError("; ".join(problems)) if problems else None
        batch_size = x.shape[0] if x.dim() else -1
        dtype_code = _EMBEDDING_DTYPES.index(x.dtype) if x.dtype in _EMBEDDING_DTYPES else -1
        agree_on_error(error, "PartialFC input", self.group, device=self.weight.device,
                       must_match={"batch size": batch_size, f"embedding dtype ({_DTYPE_LEGEND})": dtype_code})

    def _input_problems(self, x: torch.Tensor, labels: torch.Tensor) -> list[str]:
        """What is wrong with this rank's ``x`` and ``labels``, as messages (empty when nothing)."""
        def name(dtype):
            return str(dtype).removeprefix("torch.")

        problems = []
        rows = x.shape[0] if x.dim() else -1
        if x.dim() != 2:
            problems.append(f"embeddings must be [batch, {self.embedding_size}], got a {x.dim()}-d tensor")
        elif x.shape[1] != self.embedding_size:
            problems.append(f"embedding width {x.shape[1]} does not match embedding_size={self.embedding_size}")
        elif rows == 0:
            problems.append("empty batch")
        if x.dtype not in _EMBEDDING_DTYPES:
            problems.append(f"embeddings must be floating point, got {name(x.dtype)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            problems.append(f"labels must be an integer tensor, got {name(labels.dtype)}")
        elif labels.dim() != 1 or labels.shape[0] != rows:
            problems.append(f"labels must have shape [{rows}] to match the embeddings")
        elif labels.numel() > 0:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                problems.append(f"label {low if low < 0 else high} outside [0, {self.num_classes})")
        return problems
