"""MHE, angular triplet and inter-class filtering on real gloo groups vs float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F

from pfc.head.partial_fc import PartialFC, init_centers
from pfc.head.margins import ArcFace, CosFace, SphereFace
from pfc.head.regularizers import MHE, AngularTriplet
from tests.distributed import run_ranks
from tests.reference import reference_loss, reference_target_logit, relative_error

NUM_CLASSES, DIM, BATCH, SEED, RATE = 29, 12, 6, 3, 0.5
MHE_CASES = [
    dict(kernel="euclidean", power=1.0), dict(kernel="euclidean", power=2.0), dict(kernel="log"),
    dict(kernel="angular", power=1.0), dict(kernel="angular", power=2.0),
    dict(kernel="euclidean", power=2.0, half_space=True), dict(kernel="log", unbiased=True),
]


def _inputs(world_size, seed=SEED, classes=NUM_CLASSES, repeat=False):
    generator = torch.Generator().manual_seed(seed)
    total = world_size * BATCH
    if repeat:  # few classes, so that rows share labels (triplet positives)
        labels = torch.randint(0, 4, (total,), generator=generator) * (classes // 4)
    else:
        labels = torch.randint(0, classes, (total,), generator=generator)
    return torch.randn(total, DIM, generator=generator), labels


def reference_kernel(cos, mhe):
    """f(ŵ_y, ŵ_j) from the definitions: d = sqrt(2 − 2cos + eps), θ the angle."""
    if mhe.kernel == "angular":
        return torch.acos(cos.clamp(-1 + mhe.eps, 1 - mhe.eps)) ** -mhe.power
    distance = torch.sqrt(2 - 2 * cos + mhe.eps)
    return -torch.log(distance) if mhe.kernel == "log" else distance ** -mhe.power


def reference_mhe(centers, labels, sampled, mhe, num_classes):
    """E by the formula, on global ids ``sampled`` (sorted), in float64."""
    unit = F.normalize(centers, dim=1)
    cos = (unit[labels] @ unit[sampled].t()).clamp(-1, 1)
    energy = reference_kernel(cos, mhe) + (reference_kernel(-cos, mhe) if mhe.half_space else 0)
    energy = energy * (sampled[None, :] != labels[:, None])
    count = len(sampled)
    if mhe.unbiased:
        return None  # checked statistically below
    return energy.sum() / (len(labels) * (count - 1) * (2 if mhe.half_space else 1))


def _mhe_worker(rank, world_size, sample_rate):
    features, labels = _inputs(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    results = []
    for case in MHE_CASES:
        x = features[rows].clone().requires_grad_()
        head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(), sample_rate=sample_rate, seed=SEED,
                         mhe=MHE(weight=0.5, **case))
        head.set_iteration(1)
        loss = head(x, labels[rows])
        loss.backward()
        index, _ = head.last_sample
        local = torch.arange(head.num_local) if index is None else index
        grad = head.weight.grad.to_dense() if head.weight.grad.is_sparse else head.weight.grad
        results.append(dict(loss=loss.item(), stats=head.last_stats, x_grad=x.grad, weight_grad=grad,
                            sampled=local + head.class_start, class_start=head.class_start))
    # a step with MHE on leaves unsampled rows and their momentum bit-identical
    head = PartialFC(NUM_CLASSES, DIM, sample_rate=0.3, seed=SEED, mhe=MHE(weight=1.0))
    optimizer = head.optimizer(lr=0.5)
    optimizer.state[head.weight]["momentum_buffer"].normal_()
    before = head.weight.detach().clone(), optimizer.state[head.weight]["momentum_buffer"].clone()
    head(features[rows], labels[rows]).backward()
    sampled = head.last_sample[0]
    optimizer.step()
    untouched = torch.ones(head.num_local, dtype=torch.bool)
    untouched[sampled] = False
    bit_identical = (torch.equal(head.weight.detach()[untouched], before[0][untouched])
                     and torch.equal(optimizer.state[head.weight]["momentum_buffer"][untouched], before[1][untouched]))
    return results, bit_identical


@pytest.mark.parametrize("world_size,sample_rate", [(1, 1.0), (2, RATE), (3, RATE)])
def test_mhe_equals_float64_reference(world_size, sample_rate):
    per_rank = run_ranks(_mhe_worker, world_size, sample_rate)
    features, labels = _inputs(world_size)
    full = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, SEED).double()
    for case_index, case in enumerate(MHE_CASES):
        if case.get("unbiased"):
            continue
        mhe = MHE(weight=0.5, **case)
        sampled = torch.cat([per_rank[r][0][case_index]["sampled"] for r in range(world_size)])
        if sample_rate == 1.0:
            assert sampled.tolist() == list(range(NUM_CLASSES))  # full-shard energy
        centers = full.clone().requires_grad_()
        x = features.double().requires_grad_()
        energy = reference_mhe(centers, labels, sampled, mhe, NUM_CLASSES)
        total = reference_loss(x, torch.searchsorted(sampled, labels), centers[sampled], ArcFace()) + 0.5 * energy
        total.backward()
        for rank in range(world_size):
            got = per_rank[rank][0][case_index]
            where = f"{case} rank {rank}/{world_size}"
            assert got["stats"]["mhe"] == pytest.approx(energy.item(), rel=1e-5), where
            assert got["loss"] == pytest.approx(total.item(), rel=1e-5), where
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            assert relative_error(got["x_grad"], world_size * x.grad[rows]) < 1e-5, where
            start = got["class_start"]
            own = centers.grad[start:start + len(got["weight_grad"])]
            assert relative_error(got["weight_grad"], own) < 1e-5, where
    assert all(bit_identical for _, bit_identical in per_rank)


def test_unbiased_mhe_averages_to_the_full_shard_energy():
    torch.manual_seed(0)
    classes, dim, batch = 400, 8, 16
    features = torch.randn(batch, dim)
    labels = torch.randint(0, classes, (batch,))
    for mhe in [MHE(kernel="euclidean", power=1.0, unbiased=True), MHE(kernel="log", unbiased=True)]:
        full_head = PartialFC(classes, dim, sample_rate=1.0, seed=1, mhe=mhe)
        with torch.no_grad():
            full_head(features, labels)
        full = full_head.last_stats["mhe"]
        head = PartialFC(classes, dim, sample_rate=0.05, seed=1, mhe=mhe)
        estimates = []
        with torch.no_grad():
            for iteration in range(300):
                head.set_iteration(iteration)
                head(features, labels)
                estimates.append(head.last_stats["mhe"])
        estimates = torch.tensor(estimates, dtype=torch.float64)
        standard_error = estimates.std().item() / math.sqrt(len(estimates))
        assert abs(estimates.mean().item() - full) < 4 * standard_error + 1e-6, (mhe, full, estimates.mean())
        assert standard_error < 0.01 * abs(full)


@pytest.mark.parametrize("case", MHE_CASES)
def test_mhe_kernel_gradient_is_the_derivative(case):
    mhe = MHE(**case)
    cos = torch.linspace(-0.999, 0.999, 401, dtype=torch.float64, requires_grad=True)
    mhe.kernel_value(cos).sum().backward()
    assert torch.allclose(mhe.kernel_grad(cos.detach()), cos.grad, rtol=1e-9, atol=1e-9)
    poles = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert torch.isfinite(mhe.kernel_value(poles)).all() and torch.isfinite(mhe.kernel_grad(poles)).all()


def reference_triplet(features, labels, triplet):
    """ATL term by the definition, float64, anchors differentiable, centers fixed."""
    unit = F.normalize(features, dim=1)
    cos = unit @ unit.detach().t()
    margin = SphereFace(s=triplet.s, m=triplet.m, base=triplet.base, gamma=triplet.gamma,
                        power=triplet.power, lambda_min=triplet.lambda_min)
    margin.set_iteration(triplet.margin.iteration)
    losses, kept = [], []
    for a in range(len(labels)):
        negatives = (labels != labels[a]).nonzero().squeeze(1)
        if len(negatives) == 0:
            continue
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            z_p = triplet.s * reference_target_logit(cos[a, p], margin)
            hardest = cos[a, negatives].max()
            if triplet.semihard and not (cos[a, p] > hardest and z_p / triplet.s <= hardest):
                continue
            logits = torch.cat([z_p[None], triplet.s * cos[a, negatives]])
            losses.append(torch.logsumexp(logits, 0) - z_p)
            kept.append((a, p))
    value = torch.stack(losses).mean() if losses else features.sum() * 0
    return value, kept


def _triplet_worker(rank, world_size, semihard):
    features, labels = _inputs(world_size, seed=9, repeat=True)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    x = features[rows].clone().requires_grad_()
    triplet = AngularTriplet(weight=0.7, m=2, semihard=semihard, base=10.0, lambda_min=0.5)
    head = PartialFC(NUM_CLASSES, DIM, sample_rate=1.0, seed=SEED, triplet=triplet)
    head.set_iteration(40)
    loss = head(x, labels[rows])
    loss.backward()
    standalone = AngularTriplet(m=2, semihard=semihard, base=10.0, lambda_min=0.5)
    standalone.set_iteration(40)
    alone = standalone(features[rows], labels[rows])
    stats_are_tensors = all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in head._stats.values())
    return dict(loss=loss.item(), stats=head.last_stats, x_grad=x.grad, alone=alone.item(),
                stats_are_tensors=stats_are_tensors)


@pytest.mark.parametrize("world_size,semihard", [(1, False), (2, True), (3, False)])
def test_triplet_equals_float64_reference(world_size, semihard):
    per_rank = run_ranks(_triplet_worker, world_size, semihard)
    features, labels = _inputs(world_size, seed=9, repeat=True)
    triplet = AngularTriplet(weight=0.7, m=2, semihard=semihard, base=10.0, lambda_min=0.5)
    triplet.set_iteration(40)
    x = features.double().requires_grad_()
    value, kept = reference_triplet(x, labels, triplet)
    centers = init_centers(NUM_CLASSES, DIM, 0, NUM_CLASSES, SEED).double()
    total = reference_loss(x, labels, centers, ArcFace()) + 0.7 * value
    total.backward()
    assert len(kept) > 0
    same = labels[:, None] == labels[None, :]
    rows_with_positive = float((same.sum(dim=1) > 1).double().mean())
    for rank, got in enumerate(per_rank):
        assert got["stats_are_tensors"]
        assert got["stats"]["triplet_pairs"] == len(kept)
        assert got["stats"]["triplet_rows_with_positive"] == pytest.approx(rows_with_positive, rel=1e-6)
        assert got["stats"]["triplet"] == pytest.approx(value.item(), rel=1e-5)
        assert got["alone"] == pytest.approx(value.item(), rel=1e-5)
        assert got["loss"] == pytest.approx(total.item(), rel=1e-5)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        assert relative_error(got["x_grad"], world_size * x.grad[rows]) < 1e-5


def _unit(degrees):
    radians = math.radians(degrees)
    return torch.tensor([math.cos(radians), math.sin(radians), 0.0], dtype=torch.float64)


def test_semihard_selection_on_a_constructed_batch():
    # anchor at 0°; class 0 positives at 10° (easy), 30° (semi-hard), 50° (hard); one negative at 40°
    features = torch.stack([_unit(0), _unit(10), _unit(30), _unit(50), _unit(40)]).requires_grad_()
    labels = torch.tensor([0, 0, 0, 0, 1])
    triplet = AngularTriplet(m=2, s=30.0, semihard=True, base=0.0, lambda_min=0.0)  # λ = 0: ψ = cos 2θ
    value, kept, rows_with_positive = triplet.term(features, labels)
    expected, expected_pairs = reference_triplet(features, labels, triplet)
    assert rows_with_positive.item() == pytest.approx(4 / 5)
    # ψ(θ_ap) ≤ cos 40° < cos θ_ap: for the anchor at 0° only the 30° positive qualifies
    assert (0, 2) in expected_pairs and (0, 1) not in expected_pairs and (0, 3) not in expected_pairs
    assert kept.item() == len(expected_pairs)
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)


def test_triplet_without_positives_is_zero_with_finite_gradients():
    features = torch.randn(6, 8, requires_grad=True)
    labels = torch.arange(6)
    value = AngularTriplet(semihard=False)(features, labels)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(features.grad).all()
    one_class = torch.zeros(6, dtype=torch.long)  # positives but no negatives
    features.grad = None
    value = AngularTriplet(semihard=False)(features, one_class)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(features.grad).all()


def test_triplet_term_reports_no_pairs_and_no_rows_with_positive_on_distinct_labels():
    features = F.normalize(torch.randn(6, 8), dim=1)
    result = AngularTriplet(semihard=False).term(features, torch.arange(6))
    assert result.pairs.item() == 0 and result.rows_with_positive.item() == 0
    assert all(part.dim() == 0 for part in result)


def test_triplet_term_makes_no_host_sync():
    from pfc.host_syncs import HostSyncCounter

    features = F.normalize(torch.randn(8, 6), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    triplet = AngularTriplet(semihard=True, base=10.0, lambda_min=0.5)
    with HostSyncCounter() as counter:
        result = triplet.term(features, labels)
        result.value.backward()
    assert counter.count == 0, counter.report()
    assert result.rows_with_positive.item() == pytest.approx(6 / 8)


FILTER_CLASSES = 10


def _filter_worker(rank, world_size, threshold):
    # classes 2 (rank 0) and 7 (rank 1) are one identity: their centers are equal
    head = PartialFC(FILTER_CLASSES, DIM, margin=CosFace(), sample_rate=1.0, seed=SEED, interclass_filter=threshold)
    full = init_centers(FILTER_CLASSES, DIM, 0, FILTER_CLASSES, SEED)
    full[7] = full[2]
    with torch.no_grad():
        head.weight.copy_(full[head.class_start:head.class_start + head.num_local])
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(world_size * 4, DIM, generator=generator)
    features[:2] = full[2] + 0.001 * torch.randn(2, DIM, generator=generator)  # rows of class 2
    labels = torch.randint(0, FILTER_CLASSES, (world_size * 4,), generator=generator)
    labels[:2] = 2
    labels[labels == 7] = 3
    rows = slice(rank * 4, (rank + 1) * 4)
    x = features[rows].clone().requires_grad_()
    loss = head(x, labels[rows])
    loss.backward()
    return dict(loss=loss.item(), x_grad=x.grad)


def test_interclass_filter_drops_a_planted_duplicate_identity():
    world_size, threshold = 2, 0.8
    filtered = run_ranks(_filter_worker, world_size, threshold)
    unfiltered = run_ranks(_filter_worker, world_size, None)
    generator = torch.Generator().manual_seed(4)
    full = init_centers(FILTER_CLASSES, DIM, 0, FILTER_CLASSES, SEED).double()
    full[7] = full[2]
    features = torch.randn(world_size * 4, DIM, generator=generator).double()
    features[:2] = full[2] + 0.001 * torch.randn(2, DIM, generator=generator).double()
    labels = torch.randint(0, FILTER_CLASSES, (world_size * 4,), generator=generator)
    labels[:2] = 2
    labels[labels == 7] = 3
    cos = F.normalize(features, dim=1) @ F.normalize(full, dim=1).t()
    noisy = (cos > threshold) & (torch.arange(FILTER_CLASSES)[None, :] != labels[:, None])
    assert noisy[:2, 7].all() and noisy.sum() == 2  # exactly the duplicate, for the rows of class 2
    x = features.clone().requires_grad_()
    margin = CosFace()  # target cosines near 1 here: ArcFace's gradient clamp would differ from autograd
    unit = F.normalize(x, dim=1) @ F.normalize(full, dim=1).t()
    rows = torch.arange(len(labels))
    target = reference_target_logit(unit[rows, labels], margin)
    logits = (margin.s * unit.scatter(1, labels[:, None], target[:, None])).masked_fill(noisy, -math.inf)
    expected = F.cross_entropy(logits, labels)
    expected.backward()
    plain = reference_loss(features, labels, full, margin).item()
    for rank in range(world_size):
        assert filtered[rank]["loss"] == pytest.approx(expected.item(), rel=1e-5)
        assert unfiltered[rank]["loss"] == pytest.approx(plain, rel=1e-5)
        assert relative_error(filtered[rank]["x_grad"], world_size * x.grad[rank * 4:(rank + 1) * 4]) < 1e-5
    assert filtered[0]["loss"] < unfiltered[0]["loss"]


def test_bad_regulariser_options():
    with pytest.raises(ValueError, match="MHE kernel 'gauss'"):
        MHE(kernel="gauss")
    with pytest.raises(ValueError, match="interclass_filter=1.5 outside"):
        PartialFC(10, 4, interclass_filter=1.5)
    with pytest.raises(ValueError, match="positive integer"):
        AngularTriplet(m=0)


def test_the_trainer_warns_once_when_the_triplet_found_no_pair_in_the_first_log_window():
    from pfc.train.metrics import TripletIdleWarning

    lines = []
    idle = TripletIdleWarning(triplet_weight=0.1, enabled=True)
    idle.check({"step": 10, "triplet_pairs": 0.0, "triplet_rows_with_positive": 0.0}, write=lines.append)
    idle.check({"step": 20, "triplet_pairs": 0.0, "triplet_rows_with_positive": 0.0}, write=lines.append)
    assert len(lines) == 1 and "--sampler pk" in lines[0] and "to step 10" in lines[0]
    semihard = TripletIdleWarning(triplet_weight=0.1, enabled=True)
    semihard.check({"step": 5, "triplet_pairs": 0.0, "triplet_rows_with_positive": 0.5}, write=lines.append)
    assert "semi-hard" in lines[1]
    for quiet, record in ((TripletIdleWarning(0.0, True), {"step": 1, "triplet_pairs": 0.0}),        # term off
                          (TripletIdleWarning(0.1, False), {"step": 1, "triplet_pairs": 0.0}),       # not rank 0
                          (TripletIdleWarning(0.1, True), {"step": 1, "triplet_pairs": 0.5})):       # pairs found
        quiet.check(record, write=lines.append)
    assert len(lines) == 2
