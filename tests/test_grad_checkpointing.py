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


def _train_both(rank: int, world_size: int, data: str, output: str) -> dict:
    from pfc.evaluation.export import load_backbone
    from pfc.train import loop as engine

    weights = {}
    for flag in (False, True):
        run = f"{output}/{flag}"
        engine.train(make_config(data, run, network="vit_cpu", max_steps=3, warmup_steps=1, save_every=0,
                                 **{"backbone.grad_checkpointing": flag}))
        if rank == 0:
            weights[flag] = load_backbone(f"{run}/backbone.pt")[0].state_dict()
    return weights


def test_two_rank_ddp_training_with_checkpointing_gives_the_same_backbone(tmp_path):
    data = write_shards(str(tmp_path / "shards"), num_classes=12, per_class=8, image_size=27)   # 3 × 3 patches
    weights = run_ranks(_train_both, 2, data, str(tmp_path / "runs"), timeout=300)[0]
    plain, checkpointed = weights[False], weights[True]
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
