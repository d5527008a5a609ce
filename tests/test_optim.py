import pytest
import torch

from pfc.head.optim import SparseRowSGD


def _pair(rows=10, dim=6, seed=0):
    torch.manual_seed(seed)
    start = torch.randn(rows, dim)
    return torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())


def test_dense_gradient_is_bit_identical_to_torch_sgd():
    mine, theirs = _pair()
    ours = SparseRowSGD([mine], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=3)
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(4):
        grad = torch.randn_like(mine)
        mine.grad, theirs.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        assert torch.equal(mine, theirs), step
    assert torch.equal(ours.state[mine]["momentum_buffer"], reference.state[theirs]["momentum_buffer"])


def test_sparse_gradient_touches_only_its_rows():
    param, _ = _pair()
    optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, chunk_rows=2)
    optimizer.state[param]["momentum_buffer"].normal_()  # untouched rows must keep any state
    before_weight = param.detach().clone()
    before_buffer = optimizer.state[param]["momentum_buffer"].clone()
    rows = torch.tensor([1, 4, 7])
    values = torch.randn(3, param.shape[1])
    param.grad = torch.sparse_coo_tensor(rows[None], values, param.shape, check_invariants=True)
    optimizer.step()
    untouched = torch.tensor([r for r in range(param.shape[0]) if r not in rows.tolist()])
    assert torch.equal(param[untouched], before_weight[untouched])
    assert torch.equal(optimizer.state[param]["momentum_buffer"][untouched], before_buffer[untouched])
    # touched rows follow the dense formula
    step = values + 5e-4 * before_weight[rows]
    buffer = 0.9 * before_buffer[rows] + step
    assert torch.allclose(optimizer.state[param]["momentum_buffer"][rows], buffer)
    assert torch.allclose(param[rows], before_weight[rows] - 0.1 * buffer)


def test_uncoalesced_sparse_gradients_are_summed():
    param, reference = _pair()
    optimizer = SparseRowSGD([param], lr=0.5, momentum=0.0)
    rows = torch.tensor([[2, 2, 5]])
    values = torch.ones(3, param.shape[1])
    param.grad = torch.sparse_coo_tensor(rows, values, param.shape, check_invariants=True)
    optimizer.step()
    assert torch.allclose(param[2], reference[2] - 1.0)
    assert torch.allclose(param[5], reference[5] - 0.5)


def test_state_dict_round_trip_and_narrow_momentum():
    param, _ = _pair()
    optimizer = SparseRowSGD([param], lr=0.1, momentum_dtype=torch.bfloat16)
    assert optimizer.state[param]["momentum_buffer"].dtype == torch.bfloat16
    param.grad = torch.randn_like(param)
    optimizer.step()
    saved = optimizer.state_dict()
    restored = SparseRowSGD([param], lr=0.3, momentum_dtype=torch.bfloat16)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == 0.1
    assert restored.state[param]["momentum_buffer"].dtype == torch.bfloat16
    assert torch.equal(restored.state[param]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])


def test_bad_hyper_parameters():
    param, _ = _pair()
    with pytest.raises(ValueError, match="momentum 1.0 outside"):
        SparseRowSGD([param], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="learning rate -1"):
        SparseRowSGD([param], lr=-1)


def test_without_the_private_sparse_accessors_the_update_is_the_same(monkeypatch):
    """pfc.torch_private.uncoalesced_rows may find no ``_indices``/``_values`` in another
    torch: the optimizer then coalesces, with the same result bit for bit."""
    import pfc.head.optim

    results = []
    for private in (True, False):
        if not private:
            monkeypatch.setattr(pfc.head.optim, "uncoalesced_rows", lambda grad: None)
        param, _ = _pair(seed=3)
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4)
        values = torch.randn(3, param.shape[1], generator=torch.Generator().manual_seed(4))
        # sorted, distinct rows but not flagged coalesced: what autograd hands over from the head
        param.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 7]]), values, param.shape, check_invariants=True)
        optimizer.step()
        results.append((param.detach().clone(), optimizer.state[param]["momentum_buffer"].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))
