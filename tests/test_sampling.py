import pytest
import torch

from pfc.head.margins import ArcFace
from pfc.head.sampling import hashed_scores, largest_scores, sample_classes, sample_size
from pfc.head.softmax import sharded_margin_softmax


def _by_topk(score, count):
    return torch.topk(score, count, sorted=False).indices.sort().values


def test_cpu_prefilter_picks_the_same_rows_as_a_full_topk():
    for key, total, count in ((1, 500_001, 50_000), (2, 10_000, 100), (3, 4_000, 999), (4, 1_000, 1)):
        score = hashed_scores(key, 17, total, "cpu")
        score[torch.randint(0, total, (64,), generator=torch.Generator().manual_seed(key))] = torch.iinfo(torch.int64).max
        assert torch.equal(largest_scores(score, count), _by_topk(score, count)), (key, total, count)


def test_ties_at_the_maximum_fill_the_whole_sample():
    score = hashed_scores(5, 0, 1_000, "cpu")
    positives = torch.arange(0, 1_000, 10)            # 100 positives, sample of 100: exactly them
    score[positives] = torch.iinfo(torch.int64).max
    assert torch.equal(largest_scores(score, 100), positives)


def test_too_few_candidates_fall_back_to_the_full_topk():
    score = torch.full((1_000,), -(1 << 62), dtype=torch.int64)   # every score below any threshold
    score[:50] = torch.arange(50)
    assert torch.equal(largest_scores(score, 100), _by_topk(score, 100))


def test_sample_keeps_every_positive_and_has_the_static_size():
    labels = torch.tensor([3, 3, 7, 950, 12, 400_000])
    index, target = sample_classes(labels, class_start=0, num_local=1_000, sample_rate=0.1, key=9)
    assert index.numel() == sample_size(0.1, 1_000, labels.numel()) == 100
    assert torch.equal(index, index.sort().values) and index.unique().numel() == 100
    owned = labels < 1_000
    assert torch.equal(index[target[owned]], labels[owned])
    assert torch.equal(target[~owned], torch.tensor([-1]))


def test_an_empty_sample_is_refused_by_name():
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match="no class centers"):
        sharded_margin_softmax(features, torch.randn(10, 8), torch.empty(0, dtype=torch.int64),
                               torch.full((4,), -1), ArcFace())
