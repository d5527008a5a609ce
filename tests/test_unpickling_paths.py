"""Every other unpickling path of pfc refuses crafted globals and runs nothing: the verification
``.bin`` reader (its own exact allow-list), ``backbone.pt`` and DeepSpeed's engine files (torch's
weights-only unpickler). Each crafted file would create a marker file if its global were resolved.
(The checkpoint metadata reader: tests/test_checkpoint_faults.py.)"""
from __future__ import annotations

import io
import re
import zipfile

import pytest
import torch

from pfc.errors import CheckpointError, DataError
from pfc.evaluation.export import load_backbone
from pfc.evaluation.verification import read_bin
from tests.test_checkpoint_faults import crafted_pickle

BIN_MODULES = ("_codecs", "numpy", "numpy.core.multiarray", "numpy._core.multiarray")
BIN_GLOBALS = [(module, "os.system") for module in BIN_MODULES] + [
    ("numpy", "ndarray.__init__"), ("os", "system"), ("builtins", "eval"), ("posix", "system")]


@pytest.mark.parametrize("stack_global", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("module,name", BIN_GLOBALS, ids=[f"{m}.{n}" for m, n in BIN_GLOBALS])
def test_verification_bin_refuses_crafted_globals(tmp_path, module, name, stack_global):
    marker, path = tmp_path / "marker", tmp_path / "lfw.bin"
    path.write_bytes(crafted_pickle(module, name, marker, stack_global))
    with pytest.raises(DataError, match=re.escape(f"refusing to unpickle global '{module}.{name}'")):
        read_bin(str(path))
    assert not marker.exists()


def crafted_torch_file(module: str, name: str, marker) -> bytes:
    """A torch.save zip archive whose data.pkl calls ``module.name("touch marker")`` (GLOBAL)."""
    saved = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, saved)
    source, out = zipfile.ZipFile(io.BytesIO(saved.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for entry in source.infolist():
            data = source.read(entry.filename)
            if entry.filename.endswith("/data.pkl"):
                data = crafted_pickle(module, name, marker, stack_global=False).replace(b"\x80\x04", b"\x80\x02", 1)
            archive.writestr(entry.filename, data)
    return out.getvalue()


TORCH_GLOBALS = [("torch", "os.system"), ("collections", "os.system"), ("os", "system"), ("builtins", "eval"),
                 ("deepspeed.runtime.zero.config", "os.system"), ("deepspeed.utils.tensor_fragment", "torch.os.system")]


@pytest.mark.parametrize("module,name", TORCH_GLOBALS, ids=[f"{m}.{n}" for m, n in TORCH_GLOBALS])
def test_backbone_and_engine_files_refuse_crafted_globals(tmp_path, module, name):
    marker, path = tmp_path / "marker", tmp_path / "backbone.pt"
    path.write_bytes(crafted_torch_file(module, name, marker))
    with pytest.raises(CheckpointError, match="not a readable backbone checkpoint"):
        load_backbone(str(path))
    assert not marker.exists()
    pytest.importorskip("deepspeed")
    from pfc.train.runners.deepspeed import load_engine_file

    with pytest.raises(CheckpointError, match="refusing to load a DeepSpeed checkpoint file"):
        load_engine_file(path)
    assert not marker.exists()
