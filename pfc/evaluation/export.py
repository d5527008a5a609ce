"""A trained backbone on its own: ``backbone.pt`` (save, load) and ONNX export.

    save_backbone(model, "runs/r50/backbone.pt", network="iresnet50", embedding_size=512, image_size=112)
    model, meta = load_backbone("runs/r50/backbone.pt")      # eval mode; meta: network, sizes
    export_onnx(model, "backbone.onnx", meta["image_size"])

``backbone.pt`` is a ``torch.save`` of ``{"network", "embedding_size", "image_size",
"state_dict"}`` (tensors on the CPU), so it loads with ``weights_only=True`` and the network is
rebuilt from the :mod:`pfc.backbones` registry. Files are written to a temporary name and
renamed: never half-written. A file that cannot be used raises :class:`pfc.errors.CheckpointError`.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from pfc.backbones import build_backbone
from pfc.errors import CheckpointError

BACKBONE_NAME = "backbone.pt"   # in a training run's output folder
BACKBONE_FIELDS = ("network", "embedding_size", "image_size")


def backbone_file(output_or_file: str) -> str:
    """The ``backbone.pt`` of a training output folder, or the path itself when it is not a folder."""
    return os.path.join(output_or_file, BACKBONE_NAME) if os.path.isdir(output_or_file) else output_or_file


def save_backbone(model: nn.Module, path: str, *, network: str, embedding_size: int, image_size: int) -> None:
    """Write the bare network's weights and what rebuilds it (``network`` in the backbone
    registry, ``embedding_size``, the side ``image_size`` of its square input) to ``path``.
    ValueError naming the tensors, and nothing written, when a weight or buffer holds inf/NaN."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"refusing to save a non-finite model to {path}: inf/NaN in {', '.join(bad[:4])}"
                         + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    payload = {"network": network, "embedding_size": int(embedding_size), "image_size": int(image_size),
               "state_dict": state}
    temporary = f"{path}.tmp{os.getpid()}"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def rebuild_backbone(meta: dict) -> nn.Module:
    """A freshly initialised network of the kind ``meta`` (``load_backbone``'s metadata) names."""
    return build_backbone(meta["network"], meta["embedding_size"], 0.0, meta["image_size"])


def load_backbone(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network saved by :func:`save_backbone`: ``(model in eval mode on device,
    {"network", "embedding_size", "image_size"})``. CheckpointError for a missing, truncated or
    foreign file, or weights that do not fit the network it names."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # missing, truncated or foreign: all unusable to the user
        raise CheckpointError(f"{path}: not a readable backbone checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or not set(BACKBONE_FIELDS) <= set(payload):
        raise CheckpointError(f"{path}: not a pfc backbone.pt (missing network/embedding_size/image_size/state_dict)")
    meta = {key: payload[key] for key in BACKBONE_FIELDS}
    try:
        model = rebuild_backbone(meta)
        model.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError) as exc:  # unknown network, weights of another shape
        raise CheckpointError(f"{path}: {exc}") from exc
    return model.to(device).eval(), meta


def export_onnx(model: nn.Module, path: str, image_size: int, opset: int = 17) -> None:
    """Write ``model`` as ONNX: input ``images`` float32 [batch, 3, S, S] in [−1, 1] (dynamic
    batch), output ``embedding`` [batch, D] (not normalised)."""
    example = torch.rand(2, 3, image_size, image_size) * 2 - 1
    temporary = f"{path}.tmp{os.getpid()}"
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated; the torch.export one needs onnxscript (not a dependency)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), temporary, input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    os.replace(temporary, path)


def onnx_difference(model: nn.Module, path: str, image_size: int, batch: int = 3) -> float | None:
    """max |onnx − torch| of the embeddings of a random batch, run with onnxruntime on the CPU;
    None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    images = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    (onnx_out,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch_out = model(images).numpy()
    return float(abs(onnx_out - torch_out).max())
