"""BatchNorm kept in fp32 inside a bf16 backbone (what the DeepSpeed bf16/fp16 engine needs):
torch's BatchNorm exactly in fp32, and against a float64 reference written from the formulas
with bf16 parameters and inputs, as a DeepSpeed bf16 engine leaves them."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from pfc.train.runners.fp32_batchnorm import keep_batchnorm_in_fp32


def layers():
    for kind, momentum, track, affine in itertools.product((nn.BatchNorm1d, nn.BatchNorm2d), (0.1, None),
                                                          (True, False), (True, False)):
        layer = kind(5, momentum=momentum, track_running_stats=track, affine=affine)
        if affine:
            torch.manual_seed(1)
            nn.init.uniform_(layer.weight, 0.5, 1.5)
            nn.init.uniform_(layer.bias, -0.5, 0.5)
        yield layer


def batches(layer, count: int, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (6, 5) if isinstance(layer, nn.BatchNorm1d) else (6, 5, 3, 3)
    return [(torch.randn(shape, generator=generator) * 2 + 1).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("layer", list(layers()), ids=lambda layer: f"{type(layer).__name__}-{layer.momentum}-"
                         f"track{layer.track_running_stats}-affine{layer.affine}")
def test_in_fp32_the_layer_is_torchs_batchnorm_bit_for_bit(layer):
    patched = copy.deepcopy(layer)
    assert keep_batchnorm_in_fp32(patched) == 1
    inputs = batches(layer, 4)
    for index, x in enumerate(inputs):
        for model in (layer, patched):
            model.train(index < 3)            # three training steps, then evaluation
        expected, actual = layer(x.requires_grad_()), patched(x.detach().clone().requires_grad_())
        assert torch.equal(actual, expected)
        if index < 3:
            expected.square().sum().backward()
            actual.square().sum().backward()
    assert patched.state_dict().keys() == layer.state_dict().keys()
    for key, value in layer.state_dict().items():
        assert torch.equal(patched.state_dict()[key], value), key
    if layer.affine:
        assert torch.equal(patched.weight.grad, layer.weight.grad) and torch.equal(patched.bias.grad, layer.bias.grad)


def reference_batchnorm(x, weight, bias, running_mean, running_var, momentum: float, eps: float):
    """float64 BatchNorm from its formulas over every dim but the channel (dim 1): the output with
    the batch statistics, and the running statistics after one update (unbiased batch variance)."""
    x = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = x.numel() // x.shape[1]
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.double().view(shape) \
        + bias.double().view(shape)
    new_mean = (1 - momentum) * running_mean.double() + momentum * mean
    new_var = (1 - momentum) * running_var.double() + momentum * var * count / (count - 1)
    return y, new_mean, new_var


def test_bf16_parameters_and_inputs_train_with_fp32_statistics_against_a_float64_reference():
    """As a DeepSpeed bf16 engine leaves the layer: bf16 scale and shift, fp32 running statistics.
    torch refuses the mix; kept in fp32, the layer trains, its statistics stay fp32 and follow the
    formulas (to fp32 rounding), its output is the reference rounded to bf16, and the gradients
    reach the bf16 parameters."""
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(4)
    nn.init.uniform_(layer.weight, 0.5, 1.5)
    nn.init.uniform_(layer.bias, -0.5, 0.5)
    for parameter in layer.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)          # what the engine does: parameters only
    x = (torch.randn(8, 4, 5, 5) * 3 + 2).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16 but found Float"):
        layer(x)
    keep_batchnorm_in_fp32(layer)
    mean_before, var_before = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x.requires_grad_())
    expected, mean, var = reference_batchnorm(x.detach(), layer.weight, layer.bias, mean_before, var_before,
                                              layer.momentum, layer.eps)
    assert y.dtype == torch.bfloat16
    assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), expected, rtol=2 ** -8, atol=2 ** -8)      # one bf16 rounding
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and bool(layer.weight.grad.abs().sum() > 0)
    layer.eval()                                                     # evaluation: the running statistics
    shape = (1, -1, 1, 1)
    expected_eval = ((x.detach().double() - layer.running_mean.double().view(shape))
                     / torch.sqrt(layer.running_var.double().view(shape) + layer.eps)
                     * layer.weight.double().view(shape) + layer.bias.double().view(shape))
    torch.testing.assert_close(layer(x.detach()).double(), expected_eval, rtol=2 ** -8, atol=2 ** -8)


def test_statistics_an_engine_cast_to_bf16_come_back_to_fp32_and_the_change_is_made_once():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model.to(torch.bfloat16)                                          # parameters and buffers
    assert keep_batchnorm_in_fp32(model) == 2 and keep_batchnorm_in_fp32(model) == 0
    norms = [layer for layer in model if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert all(layer.running_mean.dtype == layer.running_var.dtype == torch.float32 for layer in norms)
    assert model(torch.randn(4, 3, 3, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert all(buffer.dtype in (torch.float32, torch.int64) for buffer in model.buffers())


@pytest.mark.parametrize("network", ["tiny", "iresnet18"])
def test_a_bf16_backbone_with_fp32_batchnorm_computes_what_torchs_bf16_autocast_computes(network):
    """The backbone as a DeepSpeed bf16 engine holds it (bf16 parameters, BatchNorm kept in fp32)
    against torch's CPU autocast to bf16 on the same values in fp32 parameters: the same outputs,
    gradients (autocast's rounded to bf16, the parameters' dtype), running statistics and
    evaluation outputs, bit for bit, over two training steps."""
    from pfc.backbones import build_backbone

    torch.manual_seed(0)
    reference = build_backbone(network, embedding_size=16, image_size=16)
    for parameter in reference.parameters():
        parameter.data = parameter.data.to(torch.bfloat16).float()     # values a bf16 copy holds exactly
    engine_like = copy.deepcopy(reference)
    for parameter in engine_like.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    keep_batchnorm_in_fp32(engine_like)
    images = torch.randn(2, 4, 3, 16, 16)
    for x in images:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(x)
        actual = engine_like(x.to(torch.bfloat16))
        assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)
        expected.float().square().sum().backward()
        actual.float().square().sum().backward()
        for (name, mine), theirs in zip(engine_like.named_parameters(), reference.parameters()):
            assert (mine.grad is None) == (theirs.grad is None), name
            assert mine.grad is None or torch.equal(mine.grad, theirs.grad.to(torch.bfloat16)), name
        engine_like.zero_grad()
        reference.zero_grad()
    for (name, mine), theirs in zip(engine_like.named_buffers(), reference.buffers()):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    engine_like.eval()
    reference.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(images[0])
    assert torch.equal(engine_like(images[0].to(torch.bfloat16)), expected)
