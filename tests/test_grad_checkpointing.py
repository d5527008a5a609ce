"""Gradient checkpointing (``--backbone.grad_checkpointing``): the same gradients and BatchNorm
statistics as without, fewer saved activations, under DDP the same training, a clear error for a
backbone without it."""
from __future__ import annotations

import pytest
import torch

from pfc.backbones import build_backbone
from pfc.backbones.vit import VisionTransformer, ViTSettings
from pfc.errors import ConfigError
from tests.distributed import run_ranks
from tests.train_fixtures import make_config, write_shards


def _step(model, images, seed):
    """One training forward/backward from ``seed``: (gradients, buffers, saved activation bytes)."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model.train()(images)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, {name: b.clone() for name, b in model.named_buffers()}, sum(saved)


def _compare(make, images):
    plain, checkpointed = make(), make()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.grad_checkpointing = True
    grads, buffers, saved = _step(plain, images, seed=11)
    grads_ckpt, buffers_ckpt, saved_ckpt = _step(checkpointed, images, seed=11)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == sum(p.requires_grad for p in plain.parameters())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)
    for name in buffers:   # running statistics counted once, not again by the recompute
        assert torch.equal(buffers_ckpt[name], buffers[name]), name
    return saved, saved_ckpt


def test_vit_gradients_equal_with_checkpointing_with_drop_path_masking_and_dropout():
    torch.manual_seed(0)
    settings = ViTSettings(dim=32, depth=3, num_heads=4, drop_path_rate=0.5, mask_ratio=0.1)
    saved, saved_ckpt = _compare(lambda: VisionTransformer(settings, embedding_size=16, dropout=0.3,
                                                           image_size=45), torch.rand(4, 3, 45, 45))
    assert saved_ckpt < 0.5 * saved


def test_iresnet_gradients_and_batchnorm_statistics_equal_with_checkpointing():
    torch.manual_seed(0)
    saved, saved_ckpt = _compare(lambda: build_backbone("iresnet18", embedding_size=8, image_size=32),
                                 torch.rand(4, 3, 32, 32))
    assert saved_ckpt < 0.5 * saved


def test_eval_mode_does_not_checkpoint_and_unsupported_backbones_are_refused(tmp_path):
    model = build_backbone("vit_cpu", embedding_size=8, image_size=27, grad_checkpointing=True).eval()
    assert model.grad_checkpointing
    with torch.no_grad():
        assert model(torch.rand(2, 3, 27, 27)).shape == (2, 8)
    with pytest.raises(ValueError, match="network 'tiny' has no gradient checkpointing; these have: .*iresnet50"):
        build_backbone("tiny", grad_checkpointing=True)
    with pytest.raises(ConfigError, match="'backbone.grad_checkpointing': network 'mobilefacenet' has no"):
        make_config(str(tmp_path), str(tmp_path / "run"), network="mobilefacenet",
                    **{"backbone.grad_checkpointing": True})


def _ddp_gradients(rank: int, world_size: int, data: str) -> dict:
    """The trainer's backbone (built from the config, DDP-wrapped by its runner) and head, one
    forward/backward of this rank's batch, with and without ``backbone.grad_checkpointing``:
    the all-reduced backbone gradients."""
    from pfc.train.builders import build_train_state
    from pfc.train.runtime import Runtime

    runtime = Runtime(rank, world_size, 0, torch.device("cpu"))
    generator = torch.Generator().manual_seed(rank)
    images = torch.rand(4, 3, 27, 27, generator=generator) * 2 - 1
    labels = torch.randint(0, 12, (4,), generator=generator)
    gradients = {}
    for flag in (False, True):
        config = make_config(data, "unused", network="vit_cpu", **{"backbone.grad_checkpointing": flag})
        config.data.num_classes = 12
        state = build_train_state(config, runtime, 27, 6, {})
        model = state.runner.model
        assert isinstance(state.runner.network, torch.nn.parallel.DistributedDataParallel)
        assert model.grad_checkpointing is flag
        torch.manual_seed(100 + rank)   # this rank's masking and drop-path, the same for both
        state.runner.train()
        state.runner.forward_backward(images, labels, state.head, last_micro=True)
        gradients[flag] = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return gradients


def test_two_rank_ddp_gradients_are_the_same_with_checkpointing(tmp_path):
    data = write_shards(str(tmp_path / "shards"), num_classes=12, per_class=2, image_size=27)
    for gradients in run_ranks(_ddp_gradients, 2, data, timeout=300):
        plain, checkpointed = gradients[False], gradients[True]
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
