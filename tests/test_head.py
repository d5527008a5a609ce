"""PartialFC on real multi-process gloo groups against a single-process float64 reference."""
import math
import re
import time

import pytest
import torch

from pfc.head.partial_fc import PartialFC, init_centers, sample_classes
from pfc.head.partition import class_partition
from pfc.head.margins import ArcFace, CombinedMargin, CosFace, SphereFace
from tests.distributed import run_ranks
from tests.reference import reference_loss, relative_error

NUM_CLASSES, DIM, BATCH, SEED = 23, 16, 6, 7
MARGINS = {
    "combined": lambda: CombinedMargin(s=64.0, m1=1.2, m2=0.3, m3=0.2),
    "arc": lambda: ArcFace(s=64.0, m=0.5),
    "cos": lambda: CosFace(s=30.0, m=0.35),
    "sphere": lambda: SphereFace(s=30.0, m=4),
}
SPHERE_ITERATION = 100


def _bounds(num_classes, world_size):
    """``[(class_start, class_end)]`` of every rank, in rank order."""
    parts = [class_partition(num_classes, world_size, rank) for rank in range(world_size)]
    return [(part.class_start, part.class_end) for part in parts]


@pytest.mark.parametrize("num_classes,world_size", [(10, 1), (10, 3), (7, 7), (1001, 4), (5, 2)])
def test_partition_covers_every_class_once(num_classes, world_size):
    bounds = _bounds(num_classes, world_size)
    assert bounds[0][0] == 0 and bounds[-1][1] == num_classes
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert end == start
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first C % N ranks take one more


def test_partition_rejects_more_ranks_than_classes():
    with pytest.raises(ValueError, match="num_classes=2 is smaller than the world size 3"):
        class_partition(2, 3, 0)


def _labels(pattern, world_size, num_classes, batch, seed):
    """Gathered labels [N·b]: every shard boundary present, or all owned by the last rank."""
    generator = torch.Generator().manual_seed(seed)
    bounds = _bounds(num_classes, world_size)
    total = world_size * batch
    if pattern == "boundaries":
        edges = sorted({c for start, end in bounds for c in (start, end - 1)})
        rest = torch.randint(0, num_classes, (total - len(edges),), generator=generator)
        labels = torch.cat([torch.tensor(edges), rest])
        return labels[torch.randperm(total, generator=generator)]
    start, end = bounds[-1]
    return torch.randint(start, end, (total,), generator=generator)


def _features(world_size, batch, dim, seed):
    return torch.randn(world_size * batch, dim, generator=torch.Generator().manual_seed(seed + 1))


def _exact_worker(rank, world_size, cases):
    results = []
    for margin_name, pattern in cases:
        labels = _labels(pattern, world_size, NUM_CLASSES, BATCH, SEED)[rank * BATCH:(rank + 1) * BATCH]
        x = _features(world_size, BATCH, DIM, SEED)[rank * BATCH:(rank + 1) * BATCH].clone().requires_grad_()
        margin = MARGINS[margin_name]()
        head = PartialFC(NUM_CLASSES, DIM, margin=margin, sample_rate=1.0, seed=SEED)
        head.set_iteration(SPHERE_ITERATION)
        loss = head(x, labels)
        loss.backward()
        assert not head.weight.grad.is_sparse
        results.append(dict(loss=loss.item(), x_grad=x.grad, weight_grad=head.weight.grad,
                            class_start=head.class_start, num_local=head.num_local, stats=head.last_stats))
    return results


CASES = [(name, pattern) for name in MARGINS for pattern in ("boundaries", "one_owner")]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_full_softmax_equals_float64_reference(world_size):
    per_rank = run_ranks(_exact_worker, world_size, CASES)
    centers = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, SEED).double().requires_grad_()
    for case_index, (margin_name, pattern) in enumerate(CASES):
        margin = MARGINS[margin_name]()
        margin.set_iteration(SPHERE_ITERATION)
        features = _features(world_size, BATCH, DIM, SEED).double().requires_grad_()
        labels = _labels(pattern, world_size, NUM_CLASSES, BATCH, SEED)
        centers.grad = None
        expected = reference_loss(features, labels, centers, margin)
        expected.backward()
        for rank in range(world_size):
            got = per_rank[rank][case_index]
            where = f"{margin_name}/{pattern} rank {rank}/{world_size}"
            assert got["loss"] == pytest.approx(expected.item(), rel=1e-5), where
            assert got["stats"]["ce"] == pytest.approx(got["loss"]), where
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            # x.grad on rank r is N · ∂loss/∂x_r
            assert relative_error(got["x_grad"], world_size * features.grad[rows]) < 1e-5, where
            centers_rows = slice(got["class_start"], got["class_start"] + got["num_local"])
            assert relative_error(got["weight_grad"], centers.grad[centers_rows]) < 1e-5, where
        # every rank returns the same scalar
        assert len({per_rank[r][case_index]["loss"] for r in range(world_size)}) == 1


# 120 classes: with the static sample size max(⌈ρ·C_r⌉, min(B, C_r)) (B = 12 or 18 gathered rows)
# every rank still leaves rows unsampled at world size 2 and 3 (with 50, rank sizes of 17 took all)
SAMPLED_CLASSES, SAMPLE_RATE = 120, 0.3


def _sampled_worker(rank, world_size):
    margin = ArcFace(s=64.0, m=0.5)
    labels_all = torch.randint(0, SAMPLED_CLASSES, (world_size * BATCH,), generator=torch.Generator().manual_seed(5))
    labels = labels_all[rank * BATCH:(rank + 1) * BATCH]
    x = _features(world_size, BATCH, DIM, 11)[rank * BATCH:(rank + 1) * BATCH].clone().requires_grad_()
    head = PartialFC(SAMPLED_CLASSES, DIM, margin=margin, sample_rate=SAMPLE_RATE, seed=SEED)
    optimizer = head.optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer.state[head.weight]["momentum_buffer"].normal_()  # untouched rows must keep any state
    head.set_iteration(3)
    loss = head(x, labels)
    loss.backward()
    grad = head.weight.grad
    assert grad.is_sparse
    sampled_local = grad.coalesce().indices()[0]
    weight_before = head.weight.detach().clone()
    momentum_before = optimizer.state[head.weight]["momentum_buffer"].clone()
    optimizer.step()
    unsampled = torch.ones(head.num_local, dtype=torch.bool)
    unsampled[sampled_local] = False
    momentum_after = optimizer.state[head.weight]["momentum_buffer"]
    unchanged = dict(
        weight=torch.equal(head.weight.detach()[unsampled], weight_before[unsampled]),
        momentum=torch.equal(momentum_after[unsampled], momentum_before[unsampled]),
        sampled_moved=bool((head.weight.detach()[sampled_local] != weight_before[sampled_local]).any(dim=1).all()),
    )
    # the same (seed, rank, iteration) reproduces the sample; another iteration changes it
    again = PartialFC(SAMPLED_CLASSES, DIM, margin=margin, sample_rate=SAMPLE_RATE, seed=SEED)
    again.set_iteration(3)
    again(x.detach(), labels).backward()
    other = PartialFC(SAMPLED_CLASSES, DIM, margin=margin, sample_rate=SAMPLE_RATE, seed=SEED)
    other.set_iteration(4)
    other(x.detach(), labels).backward()
    return dict(loss=loss.item(), x_grad=x.grad, weight_grad=grad.to_dense(), sampled=sampled_local + head.class_start,
                class_start=head.class_start, num_local=head.num_local, unchanged=unchanged,
                same_again=torch.equal(again.weight.grad.coalesce().indices()[0], sampled_local),
                other_iteration=other.weight.grad.coalesce().indices()[0] + head.class_start)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampled_softmax_equals_reference_on_the_sampled_classes(world_size):
    per_rank = run_ranks(_sampled_worker, world_size)
    labels = torch.randint(0, SAMPLED_CLASSES, (world_size * BATCH,), generator=torch.Generator().manual_seed(5))
    sampled = torch.cat([r["sampled"] for r in per_rank])
    for r in per_rank:
        positives = {int(c) for c in labels if r["class_start"] <= c < r["class_start"] + r["num_local"]}
        assert positives <= set(r["sampled"].tolist())
        assert len(r["sampled"]) == max(math.ceil(SAMPLE_RATE * r["num_local"]), min(world_size * BATCH, r["num_local"]))
        assert len(r["sampled"]) < r["num_local"]
        assert r["unchanged"] == dict(weight=True, momentum=True, sampled_moved=True)
        assert r["same_again"]
    assert not all(torch.equal(r["sampled"], r["other_iteration"]) for r in per_rank)

    centers = init_centers(SAMPLED_CLASSES, DIM, 0, SAMPLED_CLASSES, SEED).double()
    subset = centers[sampled].clone().requires_grad_()
    remapped = torch.searchsorted(sampled, labels)
    features = _features(world_size, BATCH, DIM, 11).double().requires_grad_()
    expected = reference_loss(features, remapped, subset, ArcFace(s=64.0, m=0.5))
    expected.backward()
    offset = 0
    for rank, r in enumerate(per_rank):
        assert r["loss"] == pytest.approx(expected.item(), rel=1e-5)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        assert relative_error(r["x_grad"], world_size * features.grad[rows]) < 1e-5
        count = len(r["sampled"])
        local_rows = r["sampled"] - r["class_start"]
        assert relative_error(r["weight_grad"][local_rows], subset.grad[offset:offset + count]) < 1e-5
        untouched = torch.ones(r["num_local"], dtype=torch.bool)
        untouched[local_rows] = False
        assert torch.count_nonzero(r["weight_grad"][untouched]) == 0
        offset += count


def test_sample_classes_has_a_static_size_keeps_every_positive_and_remaps():
    labels = torch.tensor([3, 3, 10, 12, 40])  # local positives 1, 8, 10; 40 is another rank's
    index, target = sample_classes(labels, class_start=2, num_local=20, sample_rate=0.1, key=5)
    assert len(index) == 5  # max(⌈0.1·20⌉ = 2, min(B = 5, 20)): whatever the labels
    assert {1, 8, 10} <= set(index.tolist()) and index.tolist() == sorted(index.tolist())
    assert target[4] == -1 and index[target[:4]].tolist() == [1, 1, 8, 10]
    again, _ = sample_classes(labels, class_start=2, num_local=20, sample_rate=0.1, key=5)
    other, _ = sample_classes(labels, class_start=2, num_local=20, sample_rate=0.1, key=6)
    assert torch.equal(index, again) and not torch.equal(index, other)
    index, _ = sample_classes(labels, class_start=2, num_local=20, sample_rate=0.5, key=5)
    assert len(index) == 10 and {1, 8, 10} <= set(index.tolist()) and index.tolist() == sorted(index.tolist())


def _bad_input_worker(rank, world_size):
    messages = {}

    def attempt(name, build):
        start = time.monotonic()
        try:
            build()
        except ValueError as exc:
            messages[name] = (str(exc), time.monotonic() - start)
        else:
            messages[name] = (None, time.monotonic() - start)

    head = PartialFC(10, 8, sample_rate=0.5)
    good_x, good_y = torch.randn(4, 8), torch.randint(0, 10, (4,))
    attempt("label_high", lambda: head(good_x, torch.tensor([0, 1, 2, 10]) if rank == 1 else good_y))
    attempt("label_negative", lambda: head(good_x, torch.tensor([-1, 1, 2, 3]) if rank == 0 else good_y))
    attempt("batch_sizes", lambda: head(torch.randn(4 + rank, 8), torch.zeros(4 + rank, dtype=torch.long)))
    attempt("dtypes", lambda: head(good_x.double() if rank == 1 else good_x, good_y))
    attempt("width", lambda: head(torch.randn(4, 7) if rank == 0 else good_x, good_y))
    attempt("float_labels", lambda: head(good_x, good_y.float()))
    attempt("few_classes", lambda: PartialFC(1, 8))
    attempt("sample_rate_zero", lambda: PartialFC(10, 8, sample_rate=0.0))
    attempt("sample_rate_big", lambda: PartialFC(10, 8, sample_rate=1.5))
    # after all that the group still works
    loss = head(good_x, good_y)
    return messages, loss.item()


def test_bad_inputs_raise_clear_errors_on_every_rank():
    results = run_ranks(_bad_input_worker, 2, timeout=90)
    expected = {  # the fragments every rank's message must contain
        "label_high": ["failed on rank 1:", "label 10 outside [0, 10)"],
        "label_negative": ["failed on rank 0:", "label -1 outside [0, 10)"],
        "batch_sizes": ["batch size differs across ranks: [4, 5]"],
        "dtypes": ["embedding dtype (0 float32, 1 float64, 2 float16, 3 bfloat16) differs across ranks: [0, 1]"],
        "width": ["failed on rank 0:", "embedding width 7 does not match embedding_size=8"],
        "float_labels": ["labels must be an integer tensor, got float32"],
        "few_classes": ["num_classes=1 is smaller than the world size 2"],
        "sample_rate_zero": ["sample_rate=0.0 outside (0, 1]"],
        "sample_rate_big": ["sample_rate=1.5 outside (0, 1]"],
    }
    for rank, (messages, loss) in enumerate(results):
        for name, fragments in expected.items():
            message, seconds = messages[name]
            assert message is not None and all(fragment in message for fragment in fragments), (rank, name, message)
            assert seconds < 5, (rank, name, seconds)
        assert math.isfinite(loss)


def test_check_options_holds_the_constructor_checks():
    PartialFC.check_options(sample_rate=0.1, embedding_size=8, chunk_rows=16, interclass_filter=0.5)
    for options, message in [(dict(sample_rate=0.0, embedding_size=8), "sample_rate=0.0 outside (0, 1]"),
                             (dict(sample_rate=1.0, embedding_size=0), "embedding_size=0 must be >= 1"),
                             (dict(sample_rate=1.0, embedding_size=8, chunk_rows=0), "chunk_rows=0 must be >= 1"),
                             (dict(sample_rate=1.0, embedding_size=8, interclass_filter=1.5),
                              "interclass_filter=1.5 outside [-1, 1]")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            PartialFC.check_options(**options)
        with pytest.raises(ValueError, match=re.escape(message)):
            PartialFC(10, **options)


def test_single_process_bad_input_names_the_cause():
    head = PartialFC(10, 8)
    with pytest.raises(ValueError, match=re.escape("label 12 outside [0, 10)")):
        head(torch.randn(2, 8), torch.tensor([3, 12]))
    with pytest.raises(ValueError, match="labels must have shape \\[2\\]"):
        head(torch.randn(2, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="embeddings must be floating point, got int64"):
        head(torch.zeros(2, 8, dtype=torch.long), torch.tensor([3, 4]))


def test_without_the_private_use_count_the_gradient_memory_is_never_recycled(monkeypatch):
    """pfc.torch_private.storage_use_count may be missing in another torch: the workspace
    then allocates a fresh gradient every backward, with the same results."""
    import pfc.head.scratch

    grads = []
    for private in (True, False):
        if not private:
            monkeypatch.setattr(pfc.head.scratch, "storage_use_count", lambda storage: None)
        head = PartialFC(50, 8, sample_rate=1.0, seed=1)
        optimizer = head.optimizer()
        storages = set()
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            head.set_iteration(step)
            head(torch.randn(6, 8, generator=generator), torch.randint(0, 50, (6,), generator=generator)).backward()
            storages.add(head.weight.grad.untyped_storage().data_ptr())
            grads.append(head.weight.grad.clone())
            optimizer.step()
            optimizer.zero_grad()
        assert (len(storages) == 1) if private else (len(storages) > 1), storages
    assert all(torch.equal(a, b) for a, b in zip(grads[:3], grads[3:]))


@pytest.mark.parametrize("sample_rate", [1.0, 0.2])
def test_recycled_gradient_memory_never_overwrites_a_kept_gradient(sample_rate):
    head = PartialFC(200, 8, sample_rate=sample_rate)
    optimizer = head.optimizer()
    labels = torch.randint(0, 200, (6,))
    head(torch.randn(6, 8), labels).backward()
    kept = head.weight.grad
    snapshot = kept.to_dense().clone() if kept.is_sparse else kept.clone()
    optimizer.step()
    optimizer.zero_grad()  # the user still holds the old gradient
    head.set_iteration(1)
    head(torch.randn(6, 8), labels).backward()
    assert torch.equal(kept.to_dense() if kept.is_sparse else kept, snapshot)
    del kept
    optimizer.zero_grad()
    head(torch.randn(6, 8), labels).backward()  # now the memory may be reused; results stay right
    assert torch.isfinite(head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad).all()


# ------------------------------------------------------------------------ update in the backward

def _update_in_backward_worker(rank, world_size, sample_rate, with_mhe):
    """The same steps twice: backward + step(), and update_in_backward; weights, momentum, loss
    and x.grad must agree bit for bit."""
    from pfc.head.regularizers import MHE

    outcome = {}
    for fused in (False, True):
        head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(s=30.0, m=0.5), sample_rate=sample_rate, seed=3,
                         chunk_rows=4, mhe=MHE(weight=0.1) if with_mhe else None)
        optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=0.01, update_in_backward=fused, chunk_rows=3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        losses, grads = [], []
        for step in range(4):
            labels = _labels("boundaries", world_size, NUM_CLASSES, BATCH, SEED + step)[rank * BATCH:(rank + 1) * BATCH]
            x = _features(world_size, BATCH, DIM, SEED + step)[rank * BATCH:(rank + 1) * BATCH].requires_grad_()
            head.set_iteration(step)
            loss = head(x, labels)
            loss.backward()
            if fused:
                assert head.weight.grad is None
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            losses.append(loss.item())
            grads.append(x.grad)
        outcome[fused] = (head.weight.detach().clone(), optimizer.state[head.weight]["momentum_buffer"].clone(),
                          losses, grads)
    return outcome


@pytest.mark.parametrize("sample_rate,with_mhe", [(0.4, False), (1.0, False), (0.4, True)])
def test_update_in_backward_is_bit_identical_to_backward_then_step(sample_rate, with_mhe):
    for outcome in run_ranks(_update_in_backward_worker, 2, sample_rate, with_mhe):
        (weight, momentum, losses, grads), (fused_weight, fused_momentum, fused_losses, fused_grads) = \
            outcome[False], outcome[True]
        assert torch.equal(weight, fused_weight) and torch.equal(momentum, fused_momentum)
        assert losses == fused_losses and all(torch.equal(a, b) for a, b in zip(grads, fused_grads))
        assert not torch.equal(weight, init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, 3)[:len(weight)])


def test_update_in_backward_refuses_a_scaled_loss_and_skips_a_non_finite_one():
    head = PartialFC(50, 8, sample_rate=0.5)
    optimizer = head.optimizer(update_in_backward=True)
    labels = torch.randint(0, 50, (6,))
    with pytest.raises(ValueError, match="upstream gradient 1, got 0.5"):
        (head(torch.randn(6, 8), labels) / 2).backward()
    before = head.weight.detach().clone(), optimizer.state[head.weight]["momentum_buffer"].clone()
    x = torch.randn(6, 8)
    x[0, 0] = math.nan
    loss = head(x, labels)
    loss.backward()
    assert not math.isfinite(loss.item())
    assert torch.equal(head.weight, before[0]) and torch.equal(optimizer.state[head.weight]["momentum_buffer"], before[1])
    head(torch.randn(6, 8), labels).backward()   # a normal step moves the sampled rows only
    changed = (head.weight != before[0]).any(dim=1)
    assert 0 < int(changed.sum()) <= 25 + 6
