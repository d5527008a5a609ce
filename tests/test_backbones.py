"""Backbone registry: shapes, embedding size, dropout, image size, unknown names."""
import pytest
import torch

from pfc.backbones import available_backbones, build_backbone


def test_registry_lists_every_required_network():
    names = set(available_backbones())
    assert {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet", "mbf", "mbf_large",
            "tiny"} <= names


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "mbf", "tiny"])
def test_forward_shape_and_embedding_size(name):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=40, dropout=0.2).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 112, 112) * 2 - 1)
    assert out.shape == (3, 40) and torch.isfinite(out).all()


def test_iresnet50_matches_the_published_size():
    # IResNet-50 with a 512-d embedding has about 43.6 M parameters (insightface's r50)
    model = build_backbone("iresnet50", embedding_size=512)
    count = sum(p.numel() for p in model.parameters())
    assert 43.0e6 < count < 44.2e6


def test_other_image_sizes_and_training_mode_gradients():
    model = build_backbone("tiny", embedding_size=16, image_size=64)
    out = model(torch.rand(4, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (4, 16)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_network_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown network 'resnet7'.*iresnet50"):
        build_backbone("resnet7")
    with pytest.raises(ValueError, match="dropout"):
        build_backbone("tiny", dropout=1.5)
    with pytest.raises(ValueError, match="embedding_size"):
        build_backbone("tiny", embedding_size=0)
