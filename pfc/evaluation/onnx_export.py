"""A trained backbone as ONNX, checked before it is kept.

    report = export_onnx(model, "backbone.onnx", image_size=112, opset=17)   # ExportReport

The graph has input ``images`` float32 [batch, 3, S, S] in [−1, 1] and output ``embedding``
[batch, D] (not normalised); the batch dimension is dynamic (any batch size runs). The file is
written under a temporary name and becomes ``path`` only when it passed the check: with
onnxruntime installed it is loaded and run at two batch sizes (1 and 3, neither the batch it was
traced with), each compared with PyTorch; a graph onnxruntime refuses, a non-finite output or a
difference over ``atol`` raise :class:`pfc.errors.CheckpointError` and leave no file. Without
onnxruntime the graph is kept unchecked (``ExportReport.checked`` False). An opset outside what
torch's exporter writes, or an output folder that does not exist, raise
:class:`pfc.errors.ConfigError` before anything is written.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pfc.errors import CheckpointError, ConfigError

CHECK_BATCH_SIZES = (1, 3)    # the exporter traces with 2: both differ, so the dynamic batch is exercised


def opset_range() -> tuple[int, int]:
    """(lowest, highest) ONNX opset torch's TorchScript exporter writes (7–20 with torch 2.x)."""
    from torch.onnx import _constants

    return _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


@dataclass
class ExportReport:
    """What :func:`export_onnx` did: ``checked`` False when onnxruntime is not installed; else
    ``max_difference`` = max |onnx − torch| over the batches ``batch_sizes``."""

    path: str
    opset: int
    checked: bool
    max_difference: float | None = None
    batch_sizes: tuple[int, ...] = ()


def check_export_target(path: str, opset: int) -> None:
    """ConfigError when ``opset`` is outside :func:`opset_range` or ``path``'s folder does not exist
    (or ``path`` is a folder)."""
    low, high = opset_range()
    if not low <= opset <= high:
        raise ConfigError(f"--opset {opset} is not one torch {torch.__version__.split('+')[0]} can export: "
                          f"choose one in {low}–{high}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {path}: it is a folder; give a file name (e.g. {path}/backbone.onnx)")


def _trace(model: nn.Module, path: str, image_size: int, opset: int) -> None:
    example = torch.rand(2, 3, image_size, image_size) * 2 - 1
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated; the torch.export one needs onnxscript (not a dependency)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=opset, dynamo=False)


def onnx_difference(model: nn.Module, path: str, image_size: int,
                    batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES) -> float | None:
    """max |onnx − torch| of the embeddings of random batches of each size in ``batch_sizes``, run
    with onnxruntime on the CPU; None when onnxruntime is not installed. CheckpointError when
    onnxruntime cannot load or run the graph or an output (either side) is not finite."""
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3   # its warnings (e.g. on old opsets) are not the user's business
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckpointError(f"onnxruntime cannot load the exported graph: {_first_line(exc)}") from exc
    worst = 0.0
    for batch in batch_sizes:
        images = torch.rand(batch, 3, image_size, image_size) * 2 - 1
        try:
            (onnx_out,) = session.run(None, {"images": images.numpy()})
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot run the exported graph on a batch of {batch}: "
                                  f"{_first_line(exc)}") from exc
        with torch.no_grad():
            torch_out = model(images).numpy()
        if onnx_out.shape != torch_out.shape:
            raise CheckpointError(f"the exported graph gives shape {list(onnx_out.shape)} for a batch of "
                                  f"{batch}, PyTorch {list(torch_out.shape)}")
        difference = float(abs(onnx_out - torch_out).max())
        if not math.isfinite(difference):
            raise CheckpointError(f"inf/NaN in the embeddings of a batch of {batch} (PyTorch or onnxruntime)")
        worst = max(worst, difference)
    return worst


def export_onnx(model: nn.Module, path: str, image_size: int, opset: int = 17, atol: float = 1e-3) -> ExportReport:
    """Write ``model`` as ONNX to ``path`` as the module docstring describes; ``path`` is written
    only after the check passed."""
    check_export_target(path, opset)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        try:
            _trace(model, temporary, image_size, opset)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"torch cannot export this network at opset {opset}: {_first_line(exc)}") from exc
        difference = onnx_difference(model, temporary, image_size)
        if difference is not None and difference > atol:
            raise CheckpointError(f"the ONNX output differs from PyTorch by {difference:.2e} > --atol {atol}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return ExportReport(path, opset, difference is not None, difference,
                        CHECK_BATCH_SIZES if difference is not None else ())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
