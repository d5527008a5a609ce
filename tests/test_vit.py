"""ViT backbones: insightface's architecture and state_dict, its sizes and names, image sizes.

The reference below rebuilds insightface arcface_torch's ``backbones/vit.py`` from its published
definition (parameter names as insightface saves them; attention as it computes it, in full,
softmax(q·kᵀ·scale)·v; its masking with the default ratio 0.1 whatever ``mask_ratio > 0`` says;
timm's DropPath), independently of pfc's module.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pfc.backbones import available_backbones, build_backbone, supports_grad_checkpointing
from pfc.backbones.vit import VIT_SETTINGS, VisionTransformer, ViTSettings, random_masking


class _RefDropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty((x.shape[0], 1, 1)).bernoulli_(1 - self.p)
        return x * mask.div_(1 - self.p)


class _RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.ReLU6(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _RefBlock(nn.Module):
    def __init__(self, dim, heads, drop_path):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _RefAttention(dim, heads)
        self.drop_path = _RefDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim), _RefMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _RefPatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=9, stride=9)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class InsightfaceViT(nn.Module):
    """arcface_torch's VisionTransformer at 112 px, patch 9 (``num_classes`` = the embedding size)."""

    def __init__(self, embed_dim, depth, num_heads, num_classes, drop_path_rate, mask_ratio):
        super().__init__()
        self.num_patches, self.embed_dim, self.mask_ratio = 144, embed_dim, mask_ratio
        self.patch_embed = _RefPatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, 144, embed_dim) * 0.02)
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(_RefBlock(embed_dim, num_heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(nn.Linear(embed_dim * 144, embed_dim, bias=False),
                                     nn.BatchNorm1d(embed_dim, eps=2e-5),
                                     nn.Linear(embed_dim, num_classes, bias=False),
                                     nn.BatchNorm1d(num_classes, eps=2e-5))
        self.mask_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)

    def random_masking(self, x, mask_ratio=0.1):   # called without the ratio, as insightface does
        n, length, d = x.size()
        keep = int(length * (1 - mask_ratio))
        shuffle = torch.argsort(torch.rand(n, length), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        return torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d)), restore

    def forward(self, x):
        b = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self.random_masking(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x.float())
        if masking:
            tokens = self.mask_token.repeat(b, restore.shape[1] - x.shape[1], 1)
            x = torch.gather(torch.cat([x, tokens], dim=1), 1, restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        return self.feature(torch.reshape(x, (b, self.num_patches * self.embed_dim)))


def _randomise(model: nn.Module, seed: int) -> None:
    """Every parameter and BatchNorm statistic random (not the initialisation's ones and zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_insightface_state_dict_loads_strictly_and_gives_its_embeddings_in_eval_mode():
    # a vit_t-shaped network made narrow and shallow (the key set of any depth is the same pattern)
    reference = InsightfaceViT(embed_dim=32, depth=2, num_heads=8, num_classes=24, drop_path_rate=0.1,
                               mask_ratio=0.1)
    _randomise(reference, 0)
    ours = VisionTransformer(ViTSettings(dim=32, depth=2, num_heads=8), embedding_size=24)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.rand(5, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected, got = reference.eval()(images), ours.eval()(images)
    assert _relative(got, expected) < 1e-5


def test_training_forward_with_masking_and_drop_path_is_insightfaces_for_the_same_seed():
    reference = InsightfaceViT(embed_dim=32, depth=3, num_heads=4, num_classes=16, drop_path_rate=0.5,
                               mask_ratio=0.05)   # insightface masks 10 % for any positive ratio
    _randomise(reference, 1)
    ours = VisionTransformer(ViTSettings(dim=32, depth=3, num_heads=4, drop_path_rate=0.5, mask_ratio=0.1), 16)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.rand(6, 3, 112, 112) * 2 - 1
    torch.manual_seed(5)
    expected = reference.train()(images)
    torch.manual_seed(5)
    got = ours.train()(images)
    assert _relative(got, expected) < 1e-5
    torch.manual_seed(6)   # another draw: another mask (the masking is live, not a no-op)
    assert _relative(ours(images), expected) > 1e-3


def test_masking_keeps_the_floor_of_the_kept_share_and_restores_token_order():
    tokens = torch.arange(2 * 144 * 3, dtype=torch.float32).reshape(2, 144, 3)
    kept, restore = random_masking(tokens, 0.1)
    assert kept.shape == (2, 129, 3)   # ⌊144 · 0.9⌋: 15 tokens (10.4 %) masked
    assert random_masking(tokens, 0.05)[0].shape == (2, 136, 3)   # what "mask_005" would mask: 8
    filled = torch.cat([kept, torch.full((2, 15, 3), -1.0)], dim=1).gather(1, restore[:, :, None].expand(-1, -1, 3))
    unmasked = filled[:, :, 0] >= 0
    assert (unmasked.sum(1) == 129).all()
    assert torch.equal(filled[unmasked], tokens[unmasked])   # every kept token back at its place


def test_registry_has_every_size_and_insightfaces_names_with_their_settings():
    names = set(available_backbones())
    assert {"vit_t", "vit_s", "vit_b", "vit_l", "vit_h", "vit_t_dp005_mask0", "vit_s_dp005_mask_0",
            "vit_b_dp005_mask_005", "vit_l_dp005_mask_005"} <= names
    assert all(supports_grad_checkpointing(name) for name in VIT_SETTINGS)
    sizes = {name: (s.dim, s.depth, s.num_heads) for name, s in VIT_SETTINGS.items()}
    assert sizes["vit_t"] == sizes["vit_t_dp005_mask0"] == (256, 12, 8)
    assert sizes["vit_s"] == sizes["vit_s_dp005_mask_0"] == (512, 12, 8)
    assert sizes["vit_b"] == sizes["vit_b_dp005_mask_005"] == (512, 24, 8)
    assert sizes["vit_l"] == sizes["vit_l_dp005_mask_005"] == (768, 24, 8)
    assert sizes["vit_h"] == (1024, 48, 8)
    regularisation = {name: (s.drop_path_rate, s.mask_ratio) for name, s in VIT_SETTINGS.items()}
    assert regularisation["vit_t_dp005_mask0"] == regularisation["vit_s_dp005_mask_0"] == (0.05, 0.0)
    assert regularisation["vit_b_dp005_mask_005"] == regularisation["vit_l_dp005_mask_005"] == (0.05, 0.1)
    assert regularisation["vit_t"] == regularisation["vit_b"] == (0.1, 0.1) and regularisation["vit_h"] == (0.1, 0.0)
    with torch.device("meta"):   # shapes only: vit_t as insightface builds it
        model = build_backbone("vit_t", embedding_size=512)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes["pos_embed"] == (1, 144, 256) and shapes["patch_embed.proj.weight"] == (256, 3, 9, 9)
    assert shapes["feature.0.weight"] == (256, 144 * 256) and shapes["feature.2.weight"] == (512, 256)
    assert shapes["blocks.11.attn.qkv.weight"] == (768, 256) and "blocks.11.attn.qkv.bias" not in shapes
    assert shapes["blocks.0.mlp.fc1.weight"] == (1024, 256) and shapes["mask_token"] == (1, 1, 256)


def test_other_image_sizes_change_the_patch_grid_and_wrong_inputs_are_refused():
    model = build_backbone("vit_cpu", embedding_size=8, dropout=0.2, image_size=40)   # 4 × 4 patches
    assert model.pos_embed.shape == (1, 16, 64)
    out = model.train()(torch.rand(3, 3, 40, 40))
    out.sum().backward()
    assert out.shape == (3, 8) and all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="takes 40×40 images, got 112×112"):
        model(torch.rand(2, 3, 112, 112))
    with pytest.raises(ValueError, match="image_size 8 is smaller than one 9×9 patch"):
        build_backbone("vit_cpu", image_size=8)


def _two_ddp_training_steps(rank: int, world_size: int, network: str) -> list[str]:
    """Two training forward/backward passes of ``network`` wrapped in DDP (as the trainer's DDP
    runner wraps it, without unused-parameter detection); the parameters left without a gradient."""
    torch.manual_seed(0)
    model = build_backbone(network, embedding_size=8, image_size=27)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    for _ in range(2):   # DDP notices a parameter that took no part in the loss only at the second
        wrapped.train()(torch.rand(2, 3, 27, 27)).sum().backward()
    return sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)


@pytest.mark.parametrize("network", ["vit_t_dp005_mask0", "vit_cpu"])
def test_every_trainable_parameter_takes_part_so_that_ddp_trains_vits_without_masking(network):
    # without masking (the ViT-T / ViT-S recipes' networks, vit_h) the mask token is never used:
    # it must not be a trainable parameter, or DDP stops at the second step ("parameters that
    # were not used in producing loss"); it stays in the state dict (insightface's keys)
    from tests.distributed import run_ranks

    model = build_backbone(network, embedding_size=8, image_size=27)
    assert "mask_token" in model.state_dict()
    assert model.mask_token.requires_grad is (VIT_SETTINGS[network].mask_ratio > 0)
    assert run_ranks(_two_ddp_training_steps, 2, network, timeout=240) == [[], []]
