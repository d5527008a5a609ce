"""A trained backbone on its own: ``backbone.pt``, written and read with a checksum.

    save_backbone(model, "runs/r50/backbone.pt", network="iresnet50", embedding_size=512, image_size=112)
    model, meta = load_backbone("runs/r50/backbone.pt")      # eval mode; meta: network, sizes, sha256

``backbone.pt`` is a ``torch.save`` of ``{"network", "embedding_size", "image_size",
"state_dict", "sha256"}`` (tensors on the CPU), so it loads with ``weights_only=True`` and the
network is rebuilt from the :mod:`pfc.backbones` registry. ``sha256`` is :func:`backbone_digest`
of the three fields and the state dict: a file changed on disk (a flipped byte inside a weight
reads back as a plausible number, or as NaN) no longer matches it. A file without it (written
before the checksum existed, or weights imported from elsewhere) is accepted: its meta carries
``sha256=None`` and the tools print a note. Either way a weight that is inf/NaN refuses the
file. Files are written to a temporary name, synced and renamed: never half-written. A file that
cannot be used raises :class:`pfc.errors.CheckpointError` naming it. ONNX export:
:mod:`pfc.evaluation.onnx_export`.
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from pfc.backbones import build_backbone
from pfc.errors import CheckpointError

BACKBONE_NAME = "backbone.pt"   # in a training run's output folder
BACKBONE_FIELDS = ("network", "embedding_size", "image_size")
DIGEST_FIELD = "sha256"


def backbone_file(output_or_file: str) -> str:
    """The ``backbone.pt`` of a training output folder, or the path itself when it is not a folder."""
    return os.path.join(output_or_file, BACKBONE_NAME) if os.path.isdir(output_or_file) else output_or_file


def backbone_digest(meta: dict, state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over ``meta``'s network, embedding size and image size, then the state dict in
    sorted key order: for each entry its name, dtype and shape, then the bytes of its values
    (contiguous, on the CPU). Independent of the file's layout, so it survives a re-save of the
    same model and catches any change to one of its weights or fields."""
    digest = hashlib.sha256()
    digest.update("\0".join(f"{key}={meta[key]!r}" for key in BACKBONE_FIELDS).encode() + b"\0")
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def non_finite_entries(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point entries of ``state`` holding an inf or NaN."""
    return [key for key, value in state.items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _names(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def save_backbone(model: nn.Module, path: str, *, network: str, embedding_size: int, image_size: int) -> None:
    """Write the bare network's weights, what rebuilds it
    (``network`` in the backbone registry, ``embedding_size``, the side ``image_size`` of its
    square input) and their :func:`backbone_digest` to ``path``. ValueError naming the tensors, and nothing written, when a weight
    or buffer holds inf/NaN."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    bad = non_finite_entries(state)
    if bad:
        raise ValueError(f"refusing to save a non-finite model to {path}: inf/NaN in {_names(bad)}")
    meta = {"network": network, "embedding_size": int(embedding_size), "image_size": int(image_size)}
    payload = dict(meta, state_dict=state, **{DIGEST_FIELD: backbone_digest(meta, state)})
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def rebuild_backbone(meta: dict) -> nn.Module:
    """A freshly initialised network of the kind ``meta`` (``load_backbone``'s metadata) names."""
    return build_backbone(meta["network"], meta["embedding_size"], 0.0, meta["image_size"])


def _read_payload(path: str, device) -> dict:
    """The unpickled dict of ``path``; CheckpointError naming the file and why it cannot be read."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not a readable backbone checkpoint (the file does not exist)")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: not a readable backbone checkpoint (the file is empty, 0 bytes)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, overwritten or foreign: all unusable to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable backbone checkpoint ({reason})") from exc


def load_backbone(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network saved by :func:`save_backbone`: ``(model in eval mode on device,
    {"network", "embedding_size", "image_size", "sha256"})``, the last None for a file
    without a checksum. CheckpointError for a missing, empty, truncated or foreign file, weights
    that do not match their checksum, inf/NaN weights, or weights that do not fit the network it
    names."""
    payload = _read_payload(path, device)
    if not isinstance(payload, dict) or "state_dict" not in payload or not set(BACKBONE_FIELDS) <= set(payload):
        raise CheckpointError(f"{path}: not a pfc backbone.pt (missing network/embedding_size/image_size/state_dict)")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: not a pfc backbone.pt (state_dict is not a dict of tensors)")
    meta = {key: payload[key] for key in BACKBONE_FIELDS}
    stored = payload.get(DIGEST_FIELD)
    if stored is not None and stored != backbone_digest(meta, state):
        raise CheckpointError(f"{path}: the weights do not match the sha256 saved with them: the file is "
                              f"corrupt (changed after it was written); copy or export it again")
    bad = non_finite_entries(state)
    if bad:
        raise CheckpointError(f"{path}: inf/NaN in the weights ({_names(bad)}); the file is corrupt or the "
                              f"model diverged")
    try:
        model = rebuild_backbone(meta)
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as exc:  # unknown network, weights of another shape
        raise CheckpointError(f"{path}: {exc}") from exc
    return model.to(device).eval(), dict(meta, **{DIGEST_FIELD: stored})


def unchecked_note(path: str, meta: dict) -> str | None:
    """The note a tool prints for a backbone file without a checksum (None when it has one)."""
    if meta.get(DIGEST_FIELD) is not None:
        return None
    return (f"note: {path} carries no checksum (written before pfc saved one, or imported); "
            f"its integrity is not verified")
