import pytest
import torch

from pfc.distributed.collectives import class_partition, gather_rows, partition_bounds
from tests.distributed import run_ranks


@pytest.mark.parametrize("num_classes,world_size", [(10, 1), (10, 3), (7, 7), (1001, 4), (5, 2)])
def test_partition_covers_every_class_once(num_classes, world_size):
    bounds = partition_bounds(num_classes, world_size)
    assert bounds[0][0] == 0 and bounds[-1][1] == num_classes
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert end == start
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first C % N ranks take one more


def test_partition_rejects_more_ranks_than_classes():
    with pytest.raises(ValueError, match="num_classes=2 is smaller than the world size 3"):
        class_partition(2, 3, 0)


def _gather_backward(rank, world_size):
    torch.manual_seed(rank)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    gathered = gather_rows(x, grad_scale=world_size)
    # rank-dependent weights: every rank's graph contributes to every slice
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape) * (rank + 1)
    (gathered * weights).sum().backward()
    return gathered.detach(), x.grad


@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_rows_backward_sums_over_ranks(world_size):
    results = run_ranks(_gather_backward, world_size)
    full = results[0][0]
    for gathered, _ in results:
        assert torch.equal(gathered, full)
    base = torch.arange(full.numel(), dtype=torch.float64).reshape(full.shape)
    rank_sum = sum(r + 1 for r in range(world_size))
    for rank, (_, grad) in enumerate(results):
        expected = world_size * rank_sum * base[2 * rank:2 * rank + 2]
        assert torch.allclose(grad, expected)
