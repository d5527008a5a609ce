"""A published backbone.pt the tools can trust, and the ONNX export's checks, through the tools'
command lines: a file changed on disk (same size, truncated, empty), inf/NaN weights or outputs
are an error naming the file (exit 2, nothing written); ONNX export mistakes are one line; the
exported graph has a dynamic batch that onnxruntime runs at two sizes."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pfc.backbones import build_backbone
from pfc.errors import CheckpointError
from pfc.evaluation import load_backbone, save_backbone
from pfc.evaluation.export import backbone_digest, unchecked_note
from pfc.cli import evaluate as evaluate_tool
from pfc.cli import export_onnx as export_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
NAN32 = np.array([np.nan], dtype=np.float32).tobytes()


def _tool(name, *args):
    return subprocess.run([sys.executable, f"tools/{name}.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=8, image_size=SIZE).eval()
    path = tmp_path / "run" / "backbone.pt"
    path.parent.mkdir()
    save_backbone(model, str(path), network="tiny", embedding_size=8, image_size=SIZE)
    return path, model


@pytest.fixture
def pairs(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for index in range(4):
        pixels = np.random.default_rng(index).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        (folder / f"{index}.jpg").write_bytes(buffer.getvalue())
    (folder / "pairs.txt").write_text("0.jpg 1.jpg 1\n2.jpg 3.jpg 0\n" * 10)
    return str(folder / "pairs.txt")


def _overwrite_inside_a_weight(path, model, value: bytes):
    """Put ``value`` (4 bytes) over the first float of the first conv weight, inside the file:
    the size does not change and the file still loads."""
    weight = next(tensor for name, tensor in model.state_dict().items() if tensor.dim() == 4)
    data = bytearray(path.read_bytes())
    at = data.find(weight.contiguous().numpy().tobytes()[:64])
    assert at > 0 and data.count(weight.contiguous().numpy().tobytes()[:64]) == 1
    size = len(data)
    data[at:at + 4] = value
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def _one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _main_error(capsys, main, argv, *fragments):
    """The tool's main in this process (its parsing and error handling, without a new interpreter)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    _one_line_error(subprocess.CompletedProcess(argv, 2, captured.out, captured.err), *fragments)
    return captured


# ------------------------------------------------------------------ backbone.pt: checksum and finiteness

@pytest.mark.parametrize("value", [NAN32, np.array([0.5], dtype=np.float32).tobytes()], ids=["nan", "plausible"])
def test_a_weight_changed_on_disk_fails_the_checksum_in_evaluate_and_export(model_file, pairs, tmp_path, value,
                                                                             capsys):
    path, model = model_file
    _overwrite_inside_a_weight(path, model, value)
    assert torch.load(path, weights_only=True)["state_dict"]   # still a readable file: only the checksum knows
    if value == NAN32:   # once through a fresh interpreter, as a user runs it
        evaluated = _tool("evaluate", str(path.parent), "--pairs", pairs)
        _one_line_error(evaluated, str(path), "do not match the sha256")
        assert evaluated.stdout == ""
    else:
        assert _main_error(capsys, evaluate_tool.main, [str(path.parent), "--pairs", pairs], str(path),
                           "do not match the sha256").out == ""
    onnx = tmp_path / "model.onnx"
    _main_error(capsys, export_tool.main, [str(path), "-o", str(onnx)], str(path), "do not match the sha256")
    assert not onnx.exists() and sorted(os.listdir(path.parent)) == ["backbone.pt"]


def test_nan_weights_without_a_checksum_are_refused_and_a_clean_one_is_accepted_with_a_note(model_file, capsys):
    path, model = model_file
    payload = torch.load(path, weights_only=True)
    del payload["sha256"]                     # as imported weights or an older backbone.pt
    torch.save(payload, path)
    loaded, meta = load_backbone(str(path))
    assert meta["sha256"] is None and "carries no checksum" in unchecked_note(str(path), meta)
    assert export_tool.main([str(path), "-o", str(path.parent / "ok.onnx")]) == 0
    assert "carries no checksum" in capsys.readouterr().err and (path.parent / "ok.onnx").exists()
    payload["state_dict"]["embedding.norm_embedding.running_var"][2] = float("inf")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"{path}: inf/NaN in the weights \(embedding.norm_embedding.running_var\)"):
        load_backbone(str(path))
    assert export_tool.main([str(path), "-o", str(path.parent / "bad.onnx")]) == 2
    assert "inf/NaN in the weights" in capsys.readouterr().err and not (path.parent / "bad.onnx").exists()


def test_a_changed_field_fails_the_checksum(model_file, capsys):
    """The checksum covers what rebuilds the network too: another image size is another model."""
    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    torch.save(dict(payload, image_size=SIZE + 8), path)
    _main_error(capsys, export_tool.main, [str(path)], str(path), "do not match the sha256")


def test_truncated_and_empty_files_name_the_cause(model_file, pairs, capsys):
    path, _ = model_file
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    _main_error(capsys, evaluate_tool.main, [str(path), "--pairs", pairs], f"{path}: not a readable backbone checkpoint (")
    path.write_bytes(b"")
    _main_error(capsys, export_tool.main, [str(path), "-o", str(path.parent / "m.onnx")],
                f"{path}: not a readable backbone checkpoint (the file is empty, 0 bytes)")
    with pytest.raises(CheckpointError, match=r"not a readable backbone checkpoint \(the file is empty, 0 bytes\)"):
        load_backbone(str(path))
    with pytest.raises(CheckpointError, match=r"\(the file does not exist\)"):
        load_backbone(str(path.parent / "absent.pt"))


def test_nan_embeddings_from_finite_weights_are_an_error_not_a_result(model_file, pairs, capsys):
    """Finite weights whose outputs overflow: evaluate refuses instead of printing accuracy 0.5."""
    path, model = model_file
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(3e38)
    save_backbone(model, str(path), network="tiny", embedding_size=8, image_size=SIZE)
    assert evaluate_tool.main([str(path), "--pairs", pairs]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"error: {path}: the backbone gives inf/NaN embeddings" in captured.err
    assert export_tool.main([str(path), "-o", str(path.parent / "m.onnx")]) == 2
    assert "inf/NaN in the embeddings" in capsys.readouterr().err and not (path.parent / "m.onnx").exists()


def test_evaluate_of_a_good_file_is_a_result(model_file, pairs, capsys):
    path, model = model_file
    assert evaluate_tool.main([str(path.parent), "--pairs", pairs]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_pairs"] == 20 and captured.err == ""
    assert load_backbone(str(path))[1]["sha256"] == backbone_digest(
        {"network": "tiny", "embedding_size": 8, "image_size": SIZE}, model.state_dict())


# ------------------------------------------------------------------ ONNX export

@pytest.mark.parametrize("args, cause", [
    (["-o", "{tmp}/missing/folder/m.onnx"], "the folder {tmp}/missing/folder does not exist"),
    (["--opset", "99"], "--opset 99 is not one torch"),
    (["--opset", "5"], "--opset 5 is not one torch"),
    (["-o", "{tmp}"], "it is a folder"),
])
def test_export_mistakes_are_one_line_and_leave_no_file(model_file, tmp_path, args, cause, capsys):
    path, _ = model_file
    before = sorted(os.listdir(path.parent))
    args = [arg.format(tmp=tmp_path) for arg in args]
    _main_error(capsys, export_tool.main, [str(path), *args], cause.format(tmp=tmp_path))
    assert sorted(os.listdir(path.parent)) == before and not (tmp_path / "missing").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")   # the exporter's own, about opset 5
def test_a_graph_onnxruntime_refuses_leaves_no_file(model_file, monkeypatch, capsys):
    """Below the opset check: whatever graph onnxruntime cannot load is removed, never kept."""
    from pfc.evaluation import onnx_export

    pytest.importorskip("onnxruntime")
    path, _ = model_file
    monkeypatch.setattr(onnx_export, "opset_range", lambda: (5, 20))   # let the exporter write opset 5
    assert export_tool.main([str(path), "--opset", "5"]) == 2
    error = capsys.readouterr().err
    assert "onnxruntime cannot load the exported graph" in error and "no file written" in error
    assert sorted(os.listdir(path.parent)) == ["backbone.pt"]


def test_exported_graph_has_a_dynamic_batch_checked_at_two_sizes(model_file, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    path, model = model_file
    assert export_tool.main([str(path.parent), "--opset", "13"]) == 0
    output = capsys.readouterr().out
    assert "dynamic batch" in output and "on batches of 1 and 3" in output
    onnx_path = path.parent / "backbone.onnx"
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_outputs()[0].shape[0] == "batch"
    for batch in (1, 5):
        images = torch.rand(batch, 3, SIZE, SIZE) * 2 - 1
        (out,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out, model(images).numpy(), atol=1e-4)
    with pytest.raises(SystemExit):
        export_tool.main(["--help"])
    assert "dynamic" in capsys.readouterr().out
