"""The host-sync counter counts every way the host reads a tensor's value, and nothing else."""
import pytest
import torch

from pfc.host_syncs import HostSyncCounter, read_host


def test_counts_item_float_bool_if_tolist_cpu_numpy():
    tensor = torch.tensor([1.0, 2.0])
    with HostSyncCounter() as counter:
        tensor[0].item()
        float(tensor[0])
        bool(tensor[0] > 0)
        if tensor[1]:
            pass
        tensor.tolist()
        tensor.cpu()
        tensor.numpy()
    assert counter.kinds == {"item": 4, "tolist": 1, "cpu": 1, "numpy": 1}
    assert counter.count == 7
    assert "test_host_syncs" not in counter.report()  # sites name pfc lines only


def test_device_work_without_reads_counts_nothing():
    tensor = torch.randn(8, 4)
    with HostSyncCounter() as counter:
        total = (tensor @ tensor.t()).sum()
        torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        tensor.to(torch.float64)
        tensor.to("cpu")  # already on the host: no copy, no wait
    assert counter.count == 0, counter.report()


def test_read_host_is_exempt_and_refuses_other_devices():
    with HostSyncCounter() as counter:
        assert read_host(torch.tensor([1, 0])) == [1, 0]
    assert counter.count == 0
    with pytest.raises(ValueError, match="host tensors"):
        read_host(torch.empty(1, device="meta"))


def test_tensor_methods_are_restored_after_the_counter():
    before = torch.Tensor.tolist
    with HostSyncCounter():
        assert torch.Tensor.tolist is not before
    assert torch.Tensor.tolist is before
