"""A face-embedding network behind one call, whatever file it came from.

    model = load_embedding_model("runs/r50/backbone.pt")       # or "backbone.onnx", or the run's folder
    features = model(images)    # float32 [N, 3, S, S] in [−1, 1] → float32 CPU tensor [N, D], not normalised
    model.embedding_size, model.image_size, model.digest      # D, S, sha256 of the file (cache key)

A pfc ``backbone.pt`` is read by :func:`pfc.evaluation.export.load_backbone` (checksum, inf/NaN
and shape checks) and runs in PyTorch on ``device`` (in eval mode); an ``.onnx`` file (from
``tools/export_onnx.py``: input ``[batch, 3, S, S]``, output ``[batch, D]``) runs in onnxruntime,
on the GPU when ``device`` is a CUDA device and onnxruntime has its CUDA provider, else on the
CPU. :func:`module_embedding_model` wraps a network already in memory (the trainer's), with no
digest. A file that cannot be used raises :class:`pfc.errors.CheckpointError` naming it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from pfc.errors import CheckpointError, ConfigError
from pfc.evaluation.export import backbone_file, load_backbone


@dataclass
class EmbeddingModel:
    """``forward``: float32 ``[N, 3, S, S]`` in [−1, 1] → float32 CPU ``[N, D]`` (not normalised);
    ``digest``: sha256 of the file the weights came from (None for a network in memory)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    embedding_size: int
    image_size: int
    digest: str | None = None
    source: str = ""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.forward(batch)


def file_digest(path: str) -> str:
    """sha256 (hex) of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def module_embedding_model(module: nn.Module, embedding_size: int, image_size: int,
                           device: str | torch.device | None = None, digest: str | None = None,
                           source: str = "") -> EmbeddingModel:
    """``module`` as an :class:`EmbeddingModel`: each call runs it in eval mode (its mode restored
    afterwards) without gradients on ``device`` (default: its parameters'), the batch in its
    parameters' dtype (a bf16 engine's weights)."""
    parameter = next(module.parameters())
    device = parameter.device if device is None else torch.device(device)
    dtype = parameter.dtype if parameter.is_floating_point() else torch.float32

    @torch.no_grad()
    def forward(batch: torch.Tensor) -> torch.Tensor:
        was_training = module.training
        module.eval()
        try:
            return module(batch.to(device=device, dtype=dtype)).float().cpu()
        finally:
            module.train(was_training)

    return EmbeddingModel(forward, embedding_size, image_size, digest, source)


def _onnx_model(path: str, device: torch.device) -> EmbeddingModel:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"{path}: running an ONNX model needs onnxruntime (pip install onnxruntime)") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        session = onnxruntime.InferenceSession(path, options, providers=providers)
    except Exception as exc:
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape
    if len(inputs) != 1 or len(outputs) != 1 or len(shape) != 4 or shape[1] != 3 or \
            not isinstance(shape[2], int) or shape[2] != shape[3]:
        raise CheckpointError(f"{path}: not a face-embedding graph (need one input [batch, 3, S, S] and one "
                              f"output [batch, D]; it has inputs {[i.shape for i in inputs]})")
    name, image_size = inputs[0].name, shape[2]

    def forward(batch: torch.Tensor) -> torch.Tensor:
        (features,) = session.run(None, {name: np.ascontiguousarray(batch.float().cpu().numpy())})
        return torch.from_numpy(np.asarray(features, dtype=np.float32))

    width = outputs[0].shape[-1]
    if not isinstance(width, int):
        width = forward(torch.zeros(1, 3, image_size, image_size)).shape[1]
    return EmbeddingModel(forward, int(width), int(image_size), file_digest(path), path)


def load_embedding_model(path: str, device: str | torch.device = "cpu") -> EmbeddingModel:
    """The network in ``path``: a pfc ``backbone.pt`` (or a training output folder holding one) or
    an ``.onnx`` graph, as the module docstring describes."""
    device = torch.device(device)
    path = backbone_file(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: the model file does not exist")
    if path.lower().endswith(".onnx"):
        return _onnx_model(path, device)
    module, meta = load_backbone(path, device)
    return module_embedding_model(module, meta["embedding_size"], meta["image_size"], device,
                                  file_digest(path), path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
