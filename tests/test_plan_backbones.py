"""The planner with the ViTs and gradient checkpointing: the simulated GPU runs the ViT's ops,
attention as CUDA's fused kernels, and checkpointing's recompute shows as less activation memory
and more backbone work."""
from __future__ import annotations

import multiprocessing

from pfc.planning.job import Job

VIT = Job(num_classes=2000, gpus=2, network="vit_cpu", batch_size=16, sample_rate=1.0, precision="bf16",
          kernels="torch", chunk_rows=1024)


def _attention_ops_and_plans():
    import dataclasses

    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from pfc.planning.sim_device import fake_tensor_mode, gpu_attention, sim_device
    from pfc.planning.simulate import simulate

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    device, seen = sim_device(), {}
    for dtype in (torch.bfloat16, torch.float32):
        with fake_tensor_mode(), gpu_attention():
            q = torch.randn(2, 4, 144, 16, device=device, dtype=dtype, requires_grad=True)
            with Ops() as ops:
                F.scaled_dot_product_attention(q, q, q).float().sum().backward()
        seen[str(dtype)] = ops.names
    plain = simulate(VIT)
    checkpointed = simulate(dataclasses.replace(VIT, grad_checkpointing=True))
    return seen, plain, checkpointed


def test_vit_simulates_with_fused_attention_and_checkpointing_trades_memory_for_work():
    with multiprocessing.get_context("spawn").Pool(1) as pool:   # the simulated GPU needs a fresh process
        seen, plain, checkpointed = pool.apply(_attention_ops_and_plans)
    assert {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"} <= seen["torch.bfloat16"]
    assert "_scaled_dot_product_efficient_attention" in seen["torch.float32"]
    assert not any("softmax" in name for names in seen.values() for name in names)   # no [b, h, L, L] block
    for result in (plain, checkpointed):
        assert result.host_syncs == {} and not any("no kernel" in finding for finding in result.step_findings)
    activations = [result.phase_peaks["backbone"]["activations"] for result in (plain, checkpointed)]
    assert activations[1] < 0.6 * activations[0]
    # the recompute: one more forward of the blocks, about a third of their forward + backward
    assert 1.1 * plain.flops["backbone"] < checkpointed.flops["backbone"] < 1.5 * plain.flops["backbone"]
    assert checkpointed.flops["head"] == plain.flops["head"]


def _optimizer_state_per_backbone_optimizer():
    import dataclasses

    from pfc.planning.simulate import simulate

    return {name: simulate(dataclasses.replace(VIT, optimizer=name)).phase_peaks["optimizer"]["optimizer state"]
            for name in ("sgd", "adamw")}


def test_the_backbones_optimizer_is_simulated_adamw_keeping_two_moments(capsys):
    # the ViT recipes train the backbone with AdamW: two states per parameter, SGD's one momentum
    from tools.plan import main

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        state = pool.apply(_optimizer_state_per_backbone_optimizer)
    assert state["adamw"] > 1.9 * state["sgd"] > 0
    assert main(["--classes", "1M", "--optimizer", "lamb"]) == 2
    assert "--optimizer 'lamb' is not one of sgd, adamw" in capsys.readouterr().err
