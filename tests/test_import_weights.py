"""insightface arcface_torch weights become pfc backbones that give insightface's embeddings.

The insightface networks are rebuilt here from arcface_torch's published definitions
(``backbones/iresnet.py``, ``backbones/mobilefacenet.py``): independent modules with its
state-dict keys, shapes and forward. Their weights and BatchNorm statistics are randomised, saved
as arcface_torch saves them (``torch.save(model.state_dict())``) and converted; the pfc network
then gives the same embeddings in eval mode within 1e-5 relative.
"""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from pfc.backbones import build_backbone
from pfc.cli.import_weights import main
from pfc.errors import CheckpointError, ConfigError
from pfc.evaluation.export import load_backbone
from pfc.evaluation.import_weights import convert_insightface, match_state_dict, read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5


# ---------------------------------------------------------------- insightface's networks, rebuilt

class IBasicBlock(nn.Module):
    """arcface_torch's IBasicBlock: bn1 → conv1 → bn2 → prelu → conv2(stride) → bn3, + downsample(x)."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class InsightfaceIResNet(nn.Module):
    """arcface_torch's IResNet; ``side`` is the last map's side (insightface fixes 7: 112 px)."""

    def __init__(self, layers, num_features=512, side=7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for index, (count, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = [IBasicBlock(inplanes, planes, 2)] + [IBasicBlock(planes, planes, 1) for _ in range(count - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


class Layers(nn.Module):
    """arcface_torch's ConvBlock, LinearBlock, DepthWise, Residual and GDC: a ``layers`` Sequential."""

    def __init__(self, *layers, residual=False):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


def conv_block(in_c, out_c, kernel=1, stride=1, padding=0, groups=1, linear=False):
    tail = [] if linear else [nn.PReLU(out_c)]
    return Layers(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_c), *tail)


def depth_wise(in_c, out_c, residual, stride, groups):
    return Layers(conv_block(in_c, groups), conv_block(groups, groups, 3, stride, 1, groups),
                  conv_block(groups, out_c, linear=True), residual=residual)


def residual(c, num_block, groups):
    return Layers(*(depth_wise(c, c, True, 1, groups) for _ in range(num_block)))


class InsightfaceMobileFaceNet(nn.Module):
    """arcface_torch's MobileFaceNet(num_features, blocks, scale) at 112 px."""

    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        second = conv_block(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1 else residual(c1, blocks[0], 128)
        self.layers = nn.ModuleList([
            conv_block(3, c1, 3, 2, 1), second,
            depth_wise(c1, c1, False, 2, 128), residual(c1, blocks[1], 128),
            depth_wise(c1, c2, False, 2, 256), residual(c2, blocks[2], 256),
            depth_wise(c2, c2, False, 2, 512), residual(c2, blocks[3], 256)])
        self.conv_sep = conv_block(c2, 512)
        self.features = Layers(conv_block(512, 512, 7, 1, 0, 512, linear=True), nn.Flatten(),
                               nn.Linear(512, num_features, bias=False), nn.BatchNorm1d(num_features))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def mbf(num_features=512):
    return InsightfaceMobileFaceNet(num_features, (1, 4, 6, 2), 2)


def mbf_large(num_features=512):
    return InsightfaceMobileFaceNet(num_features, (2, 8, 12, 4), 4)


IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                  "r200": (6, 26, 60, 6)}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight, PReLU slope and BatchNorm statistic drawn at random (scaled to keep a deep
    network's activations finite), as a trained network has them; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 10_000, (), generator=generator)))
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif tensor.dim() > 1:
                tensor.normal_(0.0, (1.0 / tensor[0].numel()) ** 0.5, generator=generator)
            else:
                tensor.uniform_(0.5, 1.0, generator=generator) if name.endswith("weight") else \
                    tensor.normal_(0.0, 0.1, generator=generator)
    return model.eval()


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert torch.isfinite(theirs).all() and theirs.abs().max() > 0
    return float((ours - theirs).abs().max() / theirs.abs().max())


def embeddings(model, side, seed=1):
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        return model(images)


# ---------------------------------------------------------------- the conversions

def test_an_insightface_r18_converted_by_the_tool_gives_insightfaces_embeddings(tmp_path):
    theirs = randomised(InsightfaceIResNet(IRESNET_LAYERS["r18"]))
    torch.save(theirs.state_dict(), tmp_path / "model.pt")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "import_weights.py"), "insightface",
                             str(tmp_path / "model.pt"), str(tmp_path / "backbone.pt"), "--network", "r18"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pfc iresnet18 with insightface's r18 weights" in result.stdout
    ours, meta = load_backbone(str(tmp_path / "backbone.pt"))
    assert meta["network"] == "iresnet18" and meta["embedding_size"] == 512 and meta["image_size"] == 112
    assert meta["sha256"] is not None
    assert relative_difference(embeddings(ours, 112), embeddings(theirs, 112)) <= TOLERANCE


@pytest.mark.parametrize("network, build, embedding_size, image_size", [
    ("r50", lambda: InsightfaceIResNet(IRESNET_LAYERS["r50"], num_features=64, side=2), 64, 32),
    ("iresnet34", lambda: InsightfaceIResNet(IRESNET_LAYERS["r34"], num_features=32, side=1), 32, 16),
    ("mbf", lambda: mbf(512), 512, 112),
    ("mbf_large", lambda: mbf_large(128), 128, 112),
])
def test_converted_networks_give_insightfaces_embeddings(network, build, embedding_size, image_size):
    """The embedding size and input side are read from the weights (16 × the last map's side)."""
    theirs = randomised(build())
    ours, meta = convert_insightface(dict(theirs.state_dict()), network)
    assert not ours.training
    assert (meta["embedding_size"], meta["image_size"]) == (embedding_size, image_size)
    assert relative_difference(embeddings(ours, image_size), embeddings(theirs, image_size)) <= TOLERANCE


@pytest.mark.parametrize("network", ["r100", "r200"])
def test_the_deep_iresnets_map_every_key_to_the_same_shape(network):
    with torch.device("meta"):
        theirs = InsightfaceIResNet(IRESNET_LAYERS[network])
    match = match_state_dict(theirs.state_dict(), network)
    assert (match.network, match.embedding_size, match.image_size) == (f"iresnet{network[1:]}", 512, 112)
    with torch.device("meta"):
        ours = build_backbone(match.network).state_dict()
    assert set(match.state) == set(ours) and len(match.state) == len(theirs.state_dict())
    assert all(match.state[key].shape == ours[key].shape for key in ours)


@pytest.mark.parametrize("name, reference", [("mbf", mbf), ("mbf_large", mbf_large)])
def test_pfcs_mbf_has_insightfaces_parameter_names_shapes_and_count(name, reference):
    with torch.device("meta"):
        theirs, ours = reference(512), build_backbone(name, 512)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    if name == "mbf":
        assert count == 2_059_520     # the 2.06 M of arcface_torch's mbf at 512


# ---------------------------------------------------------------- what a file may hold

@pytest.fixture(scope="module")
def mbf_state():
    return dict(randomised(mbf(8)).state_dict())


def test_checkpoints_ddp_prefixes_and_absent_batch_counters_are_accepted(tmp_path, mbf_state):
    without_counters = {k: v for k, v in mbf_state.items() if not k.endswith("num_batches_tracked")}
    payloads = {"checkpoint": {"epoch": 3, "state_dict_backbone": mbf_state, "state_optimizer": {"lr": 0.1}},
                "ddp": {"state_dict": {f"module.{k}": v for k, v in mbf_state.items()}},
                "model": {"model": without_counters}}
    for name, payload in payloads.items():
        torch.save(payload, tmp_path / f"{name}.pt")
        state = read_state_dict(str(tmp_path / f"{name}.pt"))
        assert set(state) == set(payload.get("model", mbf_state)), name
    model, _ = convert_insightface(without_counters, "mbf")
    assert all(value == 0 for key, value in model.state_dict().items() if key.endswith("num_batches_tracked"))


def run_tool(capsys, source, output, network="mbf"):
    code = main(["insightface", str(source), str(output), "--network", network])
    captured = capsys.readouterr()
    return code, captured.err.strip()


class RunsCode:
    """Unpickling this runs ``os.system``: a file holding it must be refused unread."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_bad_file(kind: str, path, state):
    if kind == "code":
        torch.save({"conv.weight": torch.zeros(1), "hook": RunsCode(path.parent / "ran")}, path)
    elif kind == "module":
        torch.save(nn.Linear(2, 2), path)
    elif kind == "tensor":
        torch.save(torch.zeros(3, 4), path)
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no tensors":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif kind == "missing":
        torch.save({k: v for k, v in state.items() if not k.startswith("conv_sep.")}, path)
    elif kind == "unexpected":
        torch.save(dict(state, **{"head.weight": torch.zeros(2), "head.bias": torch.zeros(2)}), path)
    elif kind == "shape":
        torch.save(dict(state, **{"conv_sep.layers.0.weight": torch.zeros(512, 128, 3, 3)}), path)
    elif kind == "nan":
        torch.save(dict(state, **{"conv_sep.layers.1.running_var": torch.full((512,), float("nan"))}), path)


@pytest.mark.parametrize("kind, network, message", [
    ("code", "mbf", r"refused: the file holds pickled Python objects, not only tensors \((posix|nt)\.system\); "
                    r"loading it would run code"),
    ("module", "mbf", r"refused: .*\(torch\.nn\.modules\.linear\.Linear\).*torch\.save\(model\.state_dict\(\), path\)"),
    ("tensor", "mbf", r"holds a single tensor of shape \(3, 4\), not a state dict"),
    ("garbage", "mbf", r"not a PyTorch state dict: the weights-only unpickler cannot read it"),
    ("empty", "mbf", r"the file is empty \(0 bytes\), not a state dict"),
    ("no tensors", "mbf", r"not a state dict: epoch, lr hold no tensor, and there is no state_dict_backbone"),
    ("missing", "mbf", r"not insightface's mbf: 6 missing keys "
                       r"\(conv_sep\.layers\.0\.weight, .* and 2 more\)$"),
    ("unexpected", "mbf", r"not insightface's mbf: 2 unexpected keys \(head\.weight, head\.bias\)$"),
    ("shape", "mbf", r"1 tensors of another shape: conv_sep\.layers\.0\.weight \(512, 128, 3, 3\) in the file, "
                     r"\(512, 256, 1, 1\) in mbf$"),
    ("nan", "mbf", r"inf/NaN in the weights \(conv_sep\.layers\.1\.running_var\)"),
    ("valid", "mbf_large", r"not insightface's mbf_large: \d+ missing keys .* unexpected keys .*; "
                           r"the weights are those of mbf: --network mbf$"),
    ("valid", "r7", r"unknown network 'r7' for insightface weights; known: r18, r34, r50, r100, r200, mbf, "
                    r"mbf_large(, vit_\w+)*( \(vit_\* once pfc has ViT backbones\))?, "
                    r"or pfc's iresnet18 … iresnet200$"),
    ("valid", "mobilefacenet", r"'mobilefacenet' is pfc's MobileFaceNet after the paper, not insightface's"),
])
def test_unusable_input_is_one_line_naming_the_cause_and_nothing_is_written(tmp_path, capsys, mbf_state,
                                                                            kind, network, message):
    source, output = tmp_path / "source.pt", tmp_path / "out" / "backbone.pt"
    output.parent.mkdir()
    if kind == "valid":
        torch.save(mbf_state, source)
    else:
        write_bad_file(kind, source, mbf_state)
    code, error = run_tool(capsys, source, output, network)
    assert code == 2 and len(error.splitlines()) == 1
    assert error.startswith("error: ")
    assert re.search(message, error), error
    assert os.listdir(output.parent) == [] and not (tmp_path / "ran").exists()


def test_errors_are_pfc_errors_for_the_library_caller(mbf_state):
    with pytest.raises(ConfigError, match="unknown network 'r7'"):
        match_state_dict(mbf_state, "r7")
    with pytest.raises(CheckpointError, match="fc.weight has shape"):
        match_state_dict({"fc.weight": torch.zeros(8, 500)}, "r18")


def test_an_insightface_vit_t_converts_by_its_own_names_and_gives_its_embeddings():
    from tests.test_vit import InsightfaceViT   # insightface's ViT, rebuilt from its definition there
    theirs = randomised(InsightfaceViT(embed_dim=256, depth=12, num_heads=8, num_classes=512, drop_path_rate=0.1,
                                       mask_ratio=0.1))
    ours, meta = convert_insightface(dict(theirs.state_dict()), "vit_t")
    assert meta == {"network": "vit_t", "embedding_size": 512, "image_size": 112}
    assert relative_difference(embeddings(ours, 112), embeddings(theirs, 112)) <= TOLERANCE
    with pytest.raises(CheckpointError, match=r"not insightface's vit_s: 144 tensors of another shape: "
                                              r"pos_embed \(1, 144, 256\) in the file, \(1, 144, 512\) in vit_s; "
                                              r".* and 140 more; the weights are those of vit_t: --network vit_t$"):
        match_state_dict(theirs.state_dict(), "vit_s")
