"""Vision Transformer for 112×112 faces: insightface arcface_torch's ViT, with its parameter names.

    model = VisionTransformer(VIT_SETTINGS["vit_t"], embedding_size=512)
    x = model(images)        # images [b, 3, 112, 112] → x [b, 512]

The architecture of insightface's ``backbones/vit.py`` (arcface_torch), written here (timm, which
insightface builds on, pulls torchvision, whose wheels do not import beside the CPU torch builds
pfc supports):

1. patches: a 9×9 convolution of stride 9, ``dim`` channels; at 112 px a 12×12 grid (the last
   4 pixel rows and columns are not seen, as in insightface), L = 144 tokens; no class token;
2. a learned position embedding ``[1, L, dim]`` is added;
3. training only, ``mask_ratio > 0``: token masking. Each sample keeps the ``⌊L·(1 − ratio)⌋``
   tokens of lowest uniform noise; the blocks see only those (with ``mask_ratio = 0`` the
   ``mask_token`` is never used and is not trainable: DDP, which pfc runs without unused-parameter
   detection, would stop at the second step on a trainable parameter without a gradient);
4. ``depth`` pre-norm blocks ``x + drop_path(attn(LN(x)))``, ``x + drop_path(mlp(LN(x)))``:
   multi-head self-attention (``num_heads`` heads, qkv without bias, output projection with
   bias), MLP ``dim → 4·dim → dim`` with ReLU6; drop-path (stochastic depth, per sample) at a
   rate rising linearly from 0 at the first block to ``drop_path_rate`` at the last;
5. a final LayerNorm; masked positions then get the learned ``mask_token`` (after the norm) and
   every token returns to its place;
6. the feature head: flatten all L tokens → Linear(L·dim → dim, no bias) → BN1d(eps 2e-5) →
   Linear(dim → D, no bias) → BN1d(eps 2e-5) (both BatchNorms learn their scale).

Parameter and buffer names are insightface's (``patch_embed.proj``, ``pos_embed``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``feature.{0,1,2,3}``,
``mask_token``): an arcface_torch ViT state_dict loads with ``load_state_dict(strict=True)`` and
gives the same embeddings in eval mode; importing insightface weights needs no key mapping.
``vit_cpu`` (width 64, depth 4, 4 heads) is pfc's own size for CPU runs and tests.

Where pfc differs from insightface's code, and why:

- **Masking ratio.** insightface's ``forward_features`` calls ``random_masking(x)`` without the
  ratio, so its default 0.1 applies whenever ``mask_ratio > 0``: ``vit_b_dp005_mask_005`` and
  ``vit_l_dp005_mask_005`` ("mask 0.05") mask 144 − ⌊144·0.9⌋ = 15 of 144 tokens (10.4 %),
  not 144 − ⌊144·0.95⌋ = 8 (5.6 %). This module uses the ratio it is given; the insightface
  aliases in :data:`VIT_SETTINGS` are given 0.1, what insightface's code trains with (and what
  its published models were trained with); the names stay as insightface spells them.
- **Attention** is ``F.scaled_dot_product_attention`` (flash or memory-efficient kernels on a GPU,
  in the autocast type); insightface computes ``softmax(q·kᵀ·scale)·v`` in fp32 with autocast
  off. Equal up to rounding in fp32; under bf16 autocast the attention runs in bf16.
- **``vit_l``**: insightface defines only ``vit_l_dp005_mask_005``; pfc's ``vit_l`` is that size
  with the plain sizes' regularisation (drop-path 0.1, masking 0.1), like ``vit_t/s/b``.
- **Dropout** (the registry's ``dropout``) applies to the flattened tokens before the feature
  head, the backbones' "last feature map" (insightface's ``drop_rate`` is 0 in every config and
  is not offered); it adds no parameters.
- **Gradient checkpointing** is a training option (``grad_checkpointing``, per block), not part
  of a size: insightface switches it on inside ``vit_b/l/h``.
- **Image size** other than 112: the grid is ``⌊image_size / 9⌋²`` tokens (the position
  embedding and the first feature Linear change shape, so 112-px weights do not load); an
  ``image_size`` under one patch raises ValueError, and so does an input of another size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfc.backbones.common import checkpointed


@dataclass(frozen=True)
class ViTSettings:
    """One ViT size and its regularisation (see the module docstring)."""

    dim: int
    depth: int
    num_heads: int = 8
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.1
    patch_size: int = 9
    mlp_ratio: float = 4.0


# insightface arcface_torch backbones/__init__.py get_model: every ViT it defines (all with 8 heads),
# pfc's vit_l (see the module docstring) and pfc's vit_cpu
VIT_SETTINGS: dict[str, ViTSettings] = {
    "vit_t": ViTSettings(dim=256, depth=12),
    "vit_s": ViTSettings(dim=512, depth=12),
    "vit_b": ViTSettings(dim=512, depth=24),
    "vit_l": ViTSettings(dim=768, depth=24),
    "vit_h": ViTSettings(dim=1024, depth=48, mask_ratio=0.0),
    "vit_t_dp005_mask0": ViTSettings(dim=256, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_s_dp005_mask_0": ViTSettings(dim=512, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    # "mask_005": insightface's code masks 10 % whatever its positive mask_ratio (module docstring)
    "vit_b_dp005_mask_005": ViTSettings(dim=512, depth=24, drop_path_rate=0.05, mask_ratio=0.1),
    "vit_l_dp005_mask_005": ViTSettings(dim=768, depth=24, drop_path_rate=0.05, mask_ratio=0.1),
    # pfc's own: a narrow, shallow ViT that trains on CPU ranks in minutes (demos, tests)
    "vit_cpu": ViTSettings(dim=64, depth=4, num_heads=4),
}


# insightface's config names → the pfc size they are (the rest of their settings in VIT_SETTINGS)
INSIGHTFACE_ALIASES: dict[str, str] = {"vit_t_dp005_mask0": "vit_t", "vit_s_dp005_mask_0": "vit_s",
                                       "vit_b_dp005_mask_005": "vit_b", "vit_l_dp005_mask_005": "vit_l"}


class DropPath(nn.Module):
    """Stochastic depth: in training, the branch of each sample is zeroed with probability ``p``
    and the others scaled by ``1/(1 − p)`` (expectation unchanged); the identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class PatchEmbed(nn.Module):
    """image [b, 3, S, S] → tokens [b, (S // p)², dim] by a p×p convolution of stride p."""

    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        if image_size < patch_size:
            raise ValueError(f"image_size {image_size} is smaller than one {patch_size}×{patch_size} patch")
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this ViT takes {self.image_size}×{self.image_size} images, got "
                             f"{images.shape[-2]}×{images.shape[-1]}")
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(concat_h softmax(q_h k_hᵀ / √d_h) v_h)``, qkv without bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """``fc2(ReLU6(fc1(x)))``, hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + dp(attn(LN(x)))``, then ``x + dp(mlp(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def random_masking(tokens: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, keep the ``⌊L·(1 − mask_ratio)⌋`` tokens of lowest uniform noise:
    ``(kept [b, keep, dim] in noise order, restore [b, L])`` where ``restore`` puts the
    concatenation ``[kept, masked]`` back in token order (a gather along dim 1)."""
    batch, length, dim = tokens.shape
    keep = int(length * (1 - mask_ratio))
    order = torch.rand(batch, length, device=tokens.device).argsort(dim=1)
    restore = order.argsort(dim=1)
    kept = tokens.gather(1, order[:, :keep, None].expand(-1, -1, dim))
    return kept, restore


class VisionTransformer(nn.Module):
    """insightface's face ViT (module docstring): image [b, 3, S, S] → embedding [b, D]."""

    def __init__(self, settings: ViTSettings, embedding_size: int = 512, dropout: float = 0.0,
                 image_size: int = 112, grad_checkpointing: bool = False):
        super().__init__()
        dim = settings.dim
        self.mask_ratio = settings.mask_ratio
        self.grad_checkpointing = grad_checkpointing   # per block, in training (see common.checkpointed)
        self.patch_embed = PatchEmbed(image_size, settings.patch_size, dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        last = max(settings.depth - 1, 1)
        rates = [settings.drop_path_rate * index / last for index in range(settings.depth)]
        self.blocks = nn.ModuleList(Block(dim, settings.num_heads, settings.mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        # without masking the token is never used: not trainable, so that DDP (which expects a
        # gradient for every trainable parameter) and the optimizers leave it alone; kept as a
        # parameter for insightface's state_dict keys
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=self.mask_ratio > 0)
        self._init_weights()

    def _init_weights(self) -> None:
        """insightface's: truncated normal (σ 0.02, cut at ±2) for Linear weights and the position
        embedding, normal σ 0.02 for the mask token, zero Linear biases, LayerNorm 1 and 0."""
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, masked positions filled: ``[b, L·dim]``."""
        x = self.patch_embed(images) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = random_masking(x, self.mask_ratio)
        for block in self.blocks:
            x = checkpointed(block, x) if self.grad_checkpointing and self.training else block(x)
        x = self.norm(x)
        if masking:
            batch, kept, dim = x.shape
            filled = torch.cat([x, self.mask_token.to(x.dtype).expand(batch, self.num_patches - kept, dim)], dim=1)
            x = filled.gather(1, restore[:, :, None].expand(-1, -1, dim))
        return x.flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature(self.dropout(self.forward_features(images)))


__all__ = ["VisionTransformer", "ViTSettings", "VIT_SETTINGS", "INSIGHTFACE_ALIASES", "random_masking"]
