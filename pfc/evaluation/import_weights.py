"""insightface arcface_torch backbone weights → the same network in pfc, for ``backbone.pt``.

    state = read_state_dict("model.pt")               # torch.load(weights_only=True): never runs code
    model, meta = convert_insightface(state, "r50")   # eval mode; meta: network, embedding_size, image_size
    save_backbone(model, "backbone.pt", **meta)       # pfc.evaluation.export

Networks (``--network``): insightface's names ``r18 r34 r50 r100 r200 mbf mbf_large vit_*`` or
pfc's (``iresnet18`` … ``iresnet200``). The iresnets are the same network under other module
names (``layer2.0.bn1.weight`` is ``stages.1.0.body.0.weight``; :func:`iresnet_renames`); ``mbf``,
``mbf_large`` and the ViTs carry insightface's names in pfc, so their keys map to themselves. The
embedding size and the input side are read from the weights (iresnet: ``fc.weight``, mbf: the
global depthwise conv and the last Linear, ViT: ``pos_embed``, the patch conv and
``feature.2.weight``); 112 px for insightface's (a 7×7 last map, 12×12 patches of 9 px).

What a file may hold (:func:`read_state_dict`): a state dict (name → tensor, as arcface_torch
saves ``model.pt``), or a dict holding one under ``state_dict_backbone`` (arcface_torch's
``checkpoint_gpu_*.pt``), ``state_dict`` or ``model``; keys that all start with ``module.`` (a DDP
wrapper's) lose that prefix. BatchNorm's ``num_batches_tracked`` may be absent (it does not enter
an eval-mode forward). Everything else is refused with a :class:`pfc.errors.CheckpointError` (a
``ConfigError`` for a network name) of one line naming the cause: a pickle holding classes or
functions (``torch.load`` with ``weights_only=True`` refuses it before anything in it runs), a
bare tensor, garbage or empty bytes, keys missing or unexpected for the network (counts and the
first few), tensors of another shape (each key and both shapes) (either: and the network whose
keys and shapes the weights do have, when there is one), inf/NaN weights.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pfc.backbones import available_backbones, build_backbone
from pfc.backbones.iresnet import IRESNET_DEPTHS
from pfc.backbones.mbf import MBF_VARIANTS
from pfc.errors import CheckpointError, ConfigError

NESTED_STATE_KEYS = ("state_dict_backbone", "state_dict", "model")
DDP_PREFIX = "module."
FACE_SIDE = 112
SHOWN = 4   # keys named in an error before "and N more"

State = dict[str, torch.Tensor]


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


# ---------------------------------------------------------------- reading a file

def read_state_dict(path: str) -> State:
    """The state dict in ``path`` (module docstring: what is accepted), its tensors on the CPU.
    Loaded with ``torch.load(weights_only=True)``: a file that would need code to unpickle is
    refused, nothing in it runs. CheckpointError naming ``path`` and the cause otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a state dict")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {_refusal(str(exc))}") from exc
    except Exception as exc:  # zip reader, truncated stream, bytes that are no pickle
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a PyTorch file ({reason})") from exc
    return state_dict_of(payload, path)


def _refusal(message: str) -> str:
    """What torch's weights_only unpickler refused, said in one line."""
    found = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", message, re.IGNORECASE)
    if found:
        return (f"refused: the file holds pickled Python objects, not only tensors ({found.group(1)}); "
                f"loading it would run code from the file, which pfc never does (torch.load with "
                f"weights_only=True). Save the backbone's state_dict() instead: "
                f"torch.save(model.state_dict(), path)")
    operand = re.search(r"Unsupported operand \d+", message)
    detail = f" ({operand.group(0)})" if operand else ""
    return (f"not a PyTorch state dict: the weights-only unpickler cannot read it{detail}; pfc never "
            f"unpickles a file in a way that could run code")


def state_dict_of(payload: object, path: str) -> State:
    """The name → tensor dict in an unpickled ``payload`` (directly, or under one of
    :data:`NESTED_STATE_KEYS`), without a ``module.`` prefix on every key."""
    if isinstance(payload, torch.Tensor):
        raise CheckpointError(f"{path}: holds a single tensor of shape {tuple(payload.shape)}, not a state dict "
                              f"(name → tensor)")
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: holds a {type(payload).__name__}, not a state dict (name → tensor)")
    if payload and not all(isinstance(value, torch.Tensor) for value in payload.values()):
        nested = next((key for key in NESTED_STATE_KEYS if isinstance(payload.get(key), dict)), None)
        if nested is None:
            others = [str(key) for key, value in payload.items() if not isinstance(value, torch.Tensor)]
            raise CheckpointError(f"{path}: not a state dict: {_names(others)} hold no tensor, and there is "
                                  f"no {' / '.join(NESTED_STATE_KEYS)} entry holding one")
        return state_dict_of(payload[nested], f"{path}[{nested!r}]")
    if not payload:
        raise CheckpointError(f"{path}: an empty state dict (no tensors)")
    if not all(isinstance(key, str) for key in payload):
        raise CheckpointError(f"{path}: not a state dict (its keys are not all names)")
    if all(key.startswith(DDP_PREFIX) for key in payload):
        payload = {key[len(DDP_PREFIX):]: value for key, value in payload.items()}
    return payload


# ---------------------------------------------------------------- networks

@dataclass(frozen=True)
class Family:
    """How one kind of insightface network comes to pfc."""

    renames: Callable[[str], dict[str, str] | None]
    """pfc network → {insightface module path: pfc module path}; None: the same names"""
    sizes: Callable[[State], tuple[int, int] | None]
    """insightface weights → (embedding size, image side); None when the keys it reads are absent"""


def iresnet_renames(network: str) -> dict[str, str]:
    """insightface's IResNet module paths → pfc's (:mod:`pfc.backbones.iresnet`) for ``network``;
    a parameter keeps its last name (``weight``, ``running_mean`` …)."""
    renames = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2",
               "bn2": "embedding.norm_map", "fc": "embedding.linear", "features": "embedding.norm_embedding"}
    unit_parts = {"bn1": "body.0", "conv1": "body.1", "bn2": "body.2", "prelu": "body.3", "conv2": "body.4",
                  "bn3": "body.5", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
    for stage, units in enumerate(IRESNET_DEPTHS[int(network.removeprefix("iresnet"))]):
        for unit in range(units):
            for theirs, ours in unit_parts.items():
                if theirs.startswith("downsample") and unit > 0:
                    continue   # every stage halves the map: only its first unit projects the shortcut
                renames[f"layer{stage + 1}.{unit}.{theirs}"] = f"stages.{stage}.{unit}.{ours}"
    return renames


def _shape(state: State, key: str) -> tuple[int, ...] | None:
    return tuple(state[key].shape) if key in state else None


def _bad_shape(key: str, shape, wanted: str) -> CheckpointError:
    return CheckpointError(f"{key} has shape {shape}, not {wanted}")


def _iresnet_sizes(state: State) -> tuple[int, int] | None:
    fc = _shape(state, "fc.weight")
    if fc is None:
        return None
    side = round((fc[1] / 512) ** 0.5) if len(fc) == 2 else 0
    if len(fc) != 2 or side < 1 or 512 * side * side != fc[1]:
        raise _bad_shape("fc.weight", fc, "[embedding, 512·k·k] (the flattened k×k map of 512 channels)")
    return fc[0], _conv_image_side(side)


def _mbf_sizes(state: State) -> tuple[int, int] | None:
    depthwise, linear = _shape(state, "features.layers.0.layers.0.weight"), _shape(state, "features.layers.2.weight")
    if depthwise is None or linear is None:
        return None
    if len(depthwise) != 4 or depthwise[2] != depthwise[3]:
        raise _bad_shape("features.layers.0.layers.0.weight", depthwise, "[512, 1, k, k]")
    if len(linear) != 2:
        raise _bad_shape("features.layers.2.weight", linear, "[embedding, 512]")
    return linear[0], _conv_image_side(depthwise[2])


def _vit_sizes(state: State) -> tuple[int, int] | None:
    positions, patch, head = (_shape(state, key)
                              for key in ("pos_embed", "patch_embed.proj.weight", "feature.2.weight"))
    if positions is None or patch is None or head is None:
        return None
    per_side = round(positions[1] ** 0.5) if len(positions) == 3 else 0
    if per_side < 1 or per_side * per_side != positions[1]:
        raise _bad_shape("pos_embed", positions, "[1, n·n, dim] (n×n patches)")
    if len(patch) != 4 or len(head) != 2:
        raise _bad_shape("patch_embed.proj.weight" if len(patch) != 4 else "feature.2.weight",
                         patch if len(patch) != 4 else head, "a conv / linear weight")
    size = FACE_SIDE if FACE_SIDE // patch[-1] == per_side else patch[-1] * per_side
    return head[0], size


def _conv_image_side(side: int) -> int:
    """The input side of a network with four stride-2 stages ending in a ``side``×``side`` map:
    16·side (112 for insightface's 7×7)."""
    return 16 * side


FAMILIES: dict[str, Family] = {
    "iresnet": Family(iresnet_renames, _iresnet_sizes),
    "mbf": Family(lambda network: None, _mbf_sizes),
    "vit_": Family(lambda network: None, _vit_sizes),
}
INSIGHTFACE_NAMES = {**{f"r{depth}": f"iresnet{depth}" for depth in IRESNET_DEPTHS},
                     **{name: name for name in MBF_VARIANTS}}


def _family(network: str) -> Family | None:
    if network in MBF_VARIANTS:
        return FAMILIES["mbf"]
    if network.startswith("iresnet") and network.removeprefix("iresnet").isdigit():
        return FAMILIES["iresnet"]
    return FAMILIES["vit_"] if network.startswith("vit_") else None


def importable_networks() -> list[str]:
    """insightface's network names that ``--network`` takes (the ViTs once pfc registers them);
    pfc's ``iresnet18`` … ``iresnet200`` are accepted as well."""
    vits = [name for name in available_backbones() if name.startswith("vit_")]
    return list(INSIGHTFACE_NAMES) + vits


def pfc_network(network: str) -> str:
    """pfc's registry name for ``network`` (insightface's or pfc's name); ConfigError naming the
    accepted ones otherwise."""
    name = INSIGHTFACE_NAMES.get(network, network)
    if _family(name) is not None and name in available_backbones():
        return name
    if network == "mobilefacenet":
        raise ConfigError("'mobilefacenet' is pfc's MobileFaceNet after the paper, not insightface's; "
                          "insightface's mbf weights are --network mbf")
    known = importable_networks()
    pending = "" if any(name.startswith("vit_") for name in known) else " (vit_* once pfc has ViT backbones)"
    raise ConfigError(f"unknown network {network!r} for insightface weights; known: {', '.join(known)}{pending}, "
                      f"or pfc's iresnet18 … iresnet200")


# ---------------------------------------------------------------- matching and converting

@dataclass(frozen=True)
class Match:
    """insightface weights laid onto a pfc network: ``state`` under pfc's names."""

    network: str
    embedding_size: int
    image_size: int
    state: State


def _build(network: str, embedding_size: int, image_size: int, device="cpu") -> nn.Module:
    with torch.device(device):
        return build_backbone(network, embedding_size, 0.0, image_size)


def _key_pairs(network: str, pfc_keys) -> dict[str, str]:
    """insightface key → pfc key for each of ``network``'s state-dict keys ``pfc_keys``."""
    renames = _family(network).renames(network)
    if renames is None:
        return {key: key for key in pfc_keys}
    back = {ours: theirs for theirs, ours in renames.items()}
    pairs = {}
    for key in pfc_keys:
        module, leaf = key.rsplit(".", 1)
        pairs[f"{back[module]}.{leaf}"] = key
    return pairs


def _sizes(network: str, state: State, source: str) -> tuple[int, int]:
    try:
        sizes = _family(network).sizes(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: not insightface's {network}: {exc}") from None
    return sizes if sizes is not None else (512, FACE_SIDE)


def match_state_dict(state: State, network: str, source: str = "state dict",
                     expected: State | None = None) -> Match:
    """Check ``state`` (insightface's names) against ``network`` and rename its keys to pfc's;
    the embedding size and image side come from the weights. Reads shapes only (``state`` may
    hold meta tensors); ``expected``: the state dict of pfc's network at those sizes when the
    caller has built it (else it is built on the meta device). CheckpointError naming ``source``
    for missing or unexpected keys or tensors of another shape (and the network they fit, when
    one does); ConfigError for an unknown network."""
    name = pfc_network(network)
    embedding_size, image_size = _sizes(name, state, source)
    if expected is None:
        expected = _build(name, embedding_size, image_size, "meta").state_dict()
    pairs = _key_pairs(name, expected)
    missing = [key for key in pairs if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in pairs]
    wrong = [f"{key} {tuple(state[key].shape)} in the file, {tuple(expected[ours].shape)} in {name}"
             for key, ours in pairs.items() if key in state and state[key].shape != expected[ours].shape]
    if missing or unexpected:
        problem = ", ".join(([f"{len(missing)} missing keys ({_names(missing)})"] if missing else [])
                            + ([f"{len(unexpected)} unexpected keys ({_names(unexpected)})"] if unexpected else []))
    elif wrong:
        problem = f"{len(wrong)} tensors of another shape: {'; '.join(wrong[:SHOWN])}" + (
            f" and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else "")
    else:
        renamed = {ours: state[key] for key, ours in pairs.items() if key in state}
        return Match(name, embedding_size, image_size, renamed)
    fitting = _fitting_network(state, exclude=name)
    hint = f"; the weights are those of {fitting}: --network {fitting}" if fitting else ""
    raise CheckpointError(f"{source}: not insightface's {network}: {problem}{hint}")


def _fitting_network(state: State, exclude: str) -> str | None:
    """insightface's name of an importable network whose keys and shapes are ``state``'s."""
    for network in importable_networks():
        name = INSIGHTFACE_NAMES.get(network, network)
        if name == exclude:
            continue
        try:
            sizes = _family(name).sizes(state)
        except CheckpointError:
            continue
        if sizes is None:   # the keys that give this network's sizes are absent: not this network
            continue
        expected = _build(name, *sizes, "meta").state_dict()
        pairs = _key_pairs(name, expected)
        if all(key in pairs for key in state) and all(
                state[key].shape == expected[ours].shape if key in state else key.endswith("num_batches_tracked")
                for key, ours in pairs.items()):
            return network
    return None


def convert_insightface(state: State, network: str, source: str = "state dict") -> tuple[nn.Module, dict]:
    """pfc's ``network`` holding insightface's weights ``state``: ``(model in eval mode on the CPU,
    {"network", "embedding_size", "image_size"})`` for :func:`pfc.evaluation.export.save_backbone`.
    Errors as :func:`match_state_dict`, and CheckpointError for inf/NaN weights."""
    name = pfc_network(network)
    model = _build(name, *_sizes(name, state, source))
    full = model.state_dict()
    match = match_state_dict(state, network, source, expected=full)
    bad = [key for key, value in state.items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(f"{source}: inf/NaN in the weights ({_names(bad)})")
    full.update(match.state)   # num_batches_tracked absent from the file keeps the fresh module's 0
    model.load_state_dict(full)
    meta = {"network": match.network, "embedding_size": match.embedding_size, "image_size": match.image_size}
    return model.eval(), meta
