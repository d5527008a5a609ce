"""The head's Triton softmax kernels under ``TRITON_INTERPRET=1`` on CPU tensors: against the float64
reference and the torch path, on real gloo groups at world sizes 1 and 2; the custom ops against the
torch implementation chunk by chunk; fake tensors through the ops; the GPU chunk size.

``triton.jit`` decides at decoration time whether a kernel is interpreted, so every test that
launches a kernel runs in a spawned process (``run_ranks``) that inherits ``TRITON_INTERPRET=1``
and imports the kernels afresh, whatever this process imported. Shapes are small (the
interpreter runs every tile as numpy operations), and the head tests of one world size share one
spawned group (:func:`_head_runs`).
"""
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from pfc.head.chunking import CPU_CHUNK_ROWS, auto_chunk_rows, chunk_bytes_per_row
from pfc.head.margins import ArcFace
from pfc.head.partial_fc import PartialFC, init_centers
from pfc.head.regularizers import MHE
from tests.distributed import run_ranks
from tests.reference import reference_target_logit, relative_error

pytest.importorskip("triton")

NUM_CLASSES, DIM, BATCH, SEED, SCALE, THRESHOLD = 29, 16, 5, 4, 30.0, 0.2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# weight.grad is stored in the parameter's type: rounded once
GRAD_TOLERANCE = {"fp32": 1e-5, "fp16": 2.0 ** -10, "bf16": 2.0 ** -8}
# (storage, filter mode or None, logits): both filter modes, keep and recompute, all three storage types
REFERENCE_CASES = [("fp32", "exclude", "keep"), ("fp16", "zero", "recompute"), ("bf16", None, "keep")]


@functools.cache
def _head_runs(world_size):
    """Per rank: the reference cases, the training steps (world size 2) and the chunk ops (world
    size 1), in one spawned group per world size (each process pays ≈ 10 s of imports and warm-up)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return run_ranks(_head_worker, world_size, timeout=300)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _head_worker(rank, world_size):
    return dict(reference=_reference_cases(rank, world_size),
                training=_training_steps(rank, world_size) if world_size == 2 else None,
                chunk_ops=_chunk_ops(rank, world_size) if world_size == 1 else None)


def _data(world_size, step=0):
    generator = torch.Generator().manual_seed(50 + step)
    labels = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=generator)
    labels[:2] = torch.tensor([0, NUM_CLASSES - 1])
    return torch.randn(world_size * BATCH, DIM, generator=generator), labels


def _reference(features, labels, centers, mode):
    """float64 margin softmax cross-entropy, the inter-class filter as ``mode`` says (None: off)."""
    margin = ArcFace(s=SCALE, m=0.5)
    cos = F.normalize(features, dim=1) @ F.normalize(centers, dim=1).t()
    rows = torch.arange(labels.numel())
    target = reference_target_logit(cos[rows, labels], margin)
    logits = margin.s * cos.scatter(1, labels[:, None], target[:, None])
    if mode is not None:
        noisy = (cos > THRESHOLD).scatter(1, labels[:, None], False).detach()
        logits = logits.masked_fill(noisy, -math.inf if mode == "exclude" else 0.0)
    return F.cross_entropy(logits, labels)


def _reference_cases(rank, world_size):
    features, labels = _data(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    results = []
    for storage, mode, logits in REFERENCE_CASES:
        x = features[rows].clone().requires_grad_()
        head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(s=SCALE, m=0.5), seed=SEED, chunk_rows=6,
                         dtype=DTYPES[storage], interclass_filter=THRESHOLD if mode else None,
                         interclass_filter_mode=mode or "exclude", logits=logits, kernels="triton")
        assert head.kernels == "triton"
        loss = head(x, labels[rows])
        loss.backward()
        results.append(dict(loss=loss.item(), x_grad=x.grad, weight_grad=head.weight.grad.float(),
                            class_start=head.class_start, num_local=head.num_local))
    return results


@pytest.mark.parametrize("world_size", [1, 2])
def test_triton_head_equals_float64_reference(world_size):
    per_rank = [outcome["reference"] for outcome in _head_runs(world_size)]
    features, labels = _data(world_size)
    centers = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, SEED)
    for case, (storage, mode, _) in enumerate(REFERENCE_CASES):
        stored = centers.to(DTYPES[storage]).double().requires_grad_()
        features64 = features.double().requires_grad_()
        expected = _reference(features64, labels, stored, mode)
        expected.backward()
        if mode is not None:   # the filter takes part: the other mode gives another loss here
            other = _reference(features.double(), labels, stored.detach(), "zero" if mode == "exclude" else "exclude")
            assert abs(other.item() - expected.item()) > 1e-3
        for rank in range(world_size):
            got, where = per_rank[rank][case], f"{REFERENCE_CASES[case]} rank {rank}/{world_size}"
            assert got["loss"] == pytest.approx(expected.item(), rel=1e-5), where
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            assert relative_error(got["x_grad"], world_size * features64.grad[rows]) < 1e-5, where
            own = slice(got["class_start"], got["class_start"] + got["num_local"])
            assert relative_error(got["weight_grad"], stored.grad[own]) < GRAD_TOLERANCE[storage], where


def _training_steps(rank, world_size):
    """Two sampled steps with MHE, the filter and the update in the backward, per kernels and logits."""
    outcome = {}
    for kernels, logits in (("torch", "keep"), ("triton", "keep"), ("triton", "recompute")):
        head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(s=SCALE, m=0.5), sample_rate=0.5, seed=SEED, chunk_rows=4,
                         mhe=MHE(weight=0.1), interclass_filter=THRESHOLD, logits=logits, kernels=kernels)
        optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=0.01, update_in_backward=True)
        losses, grads = [], []
        for step in range(2):
            features, labels = _data(world_size, step)
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            x = features[rows].clone().requires_grad_()
            head.set_iteration(step)
            loss = head(x, labels[rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            grads.append(x.grad)
        outcome[kernels, logits] = (head.weight.detach().clone(), losses, grads)
    return outcome


def test_triton_training_steps_follow_the_torch_path_and_recompute_bit_for_bit():
    for outcome in [outcome["training"] for outcome in _head_runs(2)]:
        torch_path, kept, recomputed = outcome["torch", "keep"], outcome["triton", "keep"], outcome["triton", "recompute"]
        assert relative_error(kept[0], torch_path[0]) < 1e-6
        assert kept[1] == pytest.approx(torch_path[1], rel=1e-6)
        assert all(relative_error(a, b) < 1e-5 for a, b in zip(kept[2], torch_path[2]))
        assert torch.equal(kept[0], recomputed[0]) and kept[1] == recomputed[1]
        assert all(torch.equal(a, b) for a, b in zip(kept[2], recomputed[2]))


def _chunk_ops(rank, world_size):
    """One chunk through both implementations of the seam: the logits, the statistics, the
    gradient block (fp32 and fp16) and the row sums."""
    from pfc.head.kernels.softmax_chunk import ChunkFilter, softmax_kernels
    from pfc.head.scratch import Workspace
    from pfc.head.targets import Targets

    generator = torch.Generator().manual_seed(3)
    rows, cols = 37, 21   # not multiples of the tiles
    products = torch.rand(rows, cols, generator=generator) * 2 - 1
    scaled_inv = torch.rand(rows, generator=generator) * SCALE
    targets = Targets.of(torch.randint(-1, 2 * rows, (cols,), generator=generator).clamp(max=rows + 5), products)
    cells = targets.in_chunks(rows, rows)[0]
    margin_logits = torch.randn(cols, generator=generator) * SCALE
    filtering = ChunkFilter(0.3, "zero", SCALE)
    shift, inv_sign = torch.rand(cols, generator=generator), -scaled_inv / SCALE
    grad_target, target_cos = torch.randn(cols, generator=generator), torch.rand(cols, generator=generator)
    results = {}
    for name in ("torch", "triton"):
        kernels, workspace = softmax_kernels(name), Workspace()
        stats = kernels.statistics(cols, products)
        logits = products.clone()
        kernels.forward(logits, scaled_inv, margin_logits, cells, filtering, stats, workspace, keep=True)
        row_max, row_sum = stats.result()
        if name == "triton":   # the op can write the logits back too (store=True): the same bits
            assert torch.equal(logits, products)   # the head's call leaves the products
            parts = kernels.statistics(cols, products)
            torch.ops.pfc.chunk_forward(logits, scaled_inv, margin_logits, cells.local[0], cells.mask, parts.max,
                                        parts.sum, filtering.limit, filtering.fill, True)
        grads = {}
        for dtype in (torch.float32, torch.float16):
            if name == "torch" and dtype == torch.float16:
                continue
            out = torch.empty(rows, cols, dtype=dtype)
            sums = kernels.backward(products.clone(), True, scaled_inv, inv_sign, row_max, shift, grad_target,
                                    margin_logits, target_cos, cells, filtering, SCALE, workspace, out=out)
            grads[dtype] = (out, None if sums is None else sums.clone())
        results[name] = dict(logits=logits, max=row_max, sum=row_sum, grads=grads)
    # the torch path's row sums, as the head forms them: Σ G·z/s with the raw cosine at the targets
    torch_grad = results["torch"]["grads"][torch.float32][0]
    cosine = results["torch"]["logits"] / SCALE
    cells.put(cosine, target_cos)
    results["torch_sums"] = (torch_grad * cosine).sum(dim=1)
    return results


def test_chunk_kernels_match_the_torch_implementation():
    results = _head_runs(1)[0]["chunk_ops"]
    ours, reference = results["triton"], results["torch"]
    assert torch.equal(ours["logits"], reference["logits"])   # one fp32 product: the same bits
    assert torch.allclose(ours["max"], reference["max"]) and torch.allclose(ours["sum"], reference["sum"], rtol=1e-6)
    grad, sums = ours["grads"][torch.float32]
    assert torch.allclose(grad, reference["grads"][torch.float32][0], rtol=1e-6, atol=1e-7)
    assert (grad == 0).any()   # the filter zeroed cells
    assert torch.allclose(sums, results["torch_sums"], rtol=1e-5, atol=1e-6)
    narrow, _ = ours["grads"][torch.float16]
    assert narrow.dtype == torch.float16 and torch.equal(narrow, grad.half())   # written once, rounded once


def test_chunk_ops_run_on_fake_tensors_without_launching():
    from pfc.head.kernels import softmax_ops  # noqa: F401 (registers the ops)
    from pfc.head.kernels.costs import declared_cost

    meta = dict(device="meta")
    products, vector = torch.empty(8, 4, **meta), torch.empty(4, **meta)
    stats = torch.empty(2, 4, **meta)
    cell_row, cell_mask = torch.empty(4, dtype=torch.int64, **meta), torch.empty(4, dtype=torch.bool, **meta)
    torch.ops.pfc.chunk_forward(products, torch.empty(8, **meta), vector, cell_row, cell_mask, stats, stats.clone(),
                                0.5, 0.0, True)
    grad, sums = torch.empty(8, 4, dtype=torch.float16, **meta), torch.empty(8, **meta)
    torch.ops.pfc.chunk_backward(products, torch.empty(8, **meta), torch.empty(8, **meta), vector, vector, vector,
                                 vector, vector, cell_row, cell_mask, grad, sums, None, SCALE, False)
    forward_cost = declared_cost("pfc::chunk_forward")((products, None, None, None, None, stats, stats, 0.5, 0.0, True),
                                                       {}, None)
    assert forward_cost.bytes_written == 4 * 32 + 2 * stats.nbytes and forward_cost.launches == 1
    backward_cost = declared_cost("pfc::chunk_backward")(
        (products, *[None] * 9, grad, sums, None, SCALE, False), {}, None)
    assert backward_cost.bytes_written == 2 * 32 + 4 * 8


def test_gpu_chunks_come_from_the_byte_budget_and_the_cpu_keeps_2048_rows():
    assert auto_chunk_rows("cpu", 1024, 512, torch.float16) == CPU_CHUNK_ROWS
    # the job: B = 1,024, D = 512, fp16 centers → 17,408 bytes a row, 61,440 rows, 6 chunks of 362,500
    assert chunk_bytes_per_row(1024, 512, torch.float16) == 17_408
    rows = auto_chunk_rows("cuda", 1024, 512, torch.float16)
    assert rows == 61_440 and math.ceil(362_500 / rows) == 6
    assert auto_chunk_rows("meta", 1024, 512, torch.float16, budget_bytes=1 << 20) == CPU_CHUNK_ROWS
    head = PartialFC(10, DIM, chunk_rows=None)
    head(torch.randn(3, DIM), torch.tensor([1, 2, 3]))
    assert head.last_chunk_rows == CPU_CHUNK_ROWS
    explicit = PartialFC(10, DIM, chunk_rows=3)
    explicit(torch.randn(3, DIM), torch.tensor([1, 2, 3]))
    assert explicit.last_chunk_rows == 3


def test_fp64_centers_stay_on_the_torch_path(monkeypatch):
    with pytest.raises(ValueError, match="computes in fp32"):
        PartialFC(10, DIM, dtype=torch.float64, kernels="triton", device="meta")
    # where auto would pick Triton (CUDA), fp64 centers fall back to torch
    monkeypatch.setattr("pfc.head.partial_fc.resolve_kernels", lambda choice, device: "triton")
    assert PartialFC(10, DIM, dtype=torch.float64, kernels="auto").kernels == "torch"
    assert PartialFC(10, DIM, dtype=torch.float32, kernels="auto").kernels == "triton"
