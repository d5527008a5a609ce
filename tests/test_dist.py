import pytest
import torch

from pfc.distributed.collectives import gather_rows
from tests.distributed import run_ranks


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
