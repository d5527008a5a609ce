"""Verification protocol on constructed embeddings, the .bin reader's restricted unpickler, pairs lists,
backbone.pt export/import, the tools' command lines."""
import io
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pfc.backbones import build_backbone
from pfc.errors import CheckpointError, DataError
from pfc.evaluation import VerificationSet, evaluate, load_backbone, read_bin, read_pairs, save_backbone
from pfc.evaluation.export import backbone_digest
from pfc.evaluation.report import comparison_table, read_results
from pfc.evaluation.roc import fold_slices, format_rate, roc_curve, save_roc_plot, verification_metrics
from pfc.evaluation.verification import check_decodes
from tools import compare_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pairs_at_distances(distances):
    """Unit 2-d embedding pairs whose squared L2 distance is exactly ``distances`` (2 − 2 cos a = d)."""
    angles = np.arccos(1.0 - np.asarray(distances, dtype=np.float64) / 2.0)
    first = np.stack([np.ones_like(angles), np.zeros_like(angles)], axis=1)
    second = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return first, second


def test_perfectly_separable_is_100_percent():
    rng = np.random.default_rng(0)
    distances = np.where(np.arange(2400) % 2 == 0, rng.uniform(0.0, 1.0, 2400), rng.uniform(1.5, 4.0, 2400))
    first, second = pairs_at_distances(distances)
    result = verification_metrics(first, second, np.arange(2400) % 2 == 0)   # 1,200 impostors: FAR 1e-3 measurable
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert result.tar_at_far[1e-3] == 1.0 and result.auc == pytest.approx(1.0)


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(4000, 64))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    result = verification_metrics(embeddings[:2000], embeddings[2000:], rng.random(2000) < 0.5)
    assert 0.45 < result.accuracy < 0.55
    assert 0.4 < result.auc < 0.6


def test_hand_computed_folds_threshold_and_tar():
    # 20 pairs, 10 folds of 2 (contiguous): genuine pairs at d = 0.495 except pair 6 at d = 3.0, impostors at 2.0
    issame = np.arange(20) % 2 == 0
    distances = np.where(issame, 0.495, 2.0)
    distances[6] = 3.0
    first, second = pairs_at_distances(distances)
    result = verification_metrics(first, second, issame)
    # fold 3 (pairs 6, 7) gets the threshold 0.50 learnt on the others and misses pair 6 → 0.5
    assert result.fold_accuracies == [1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert result.accuracy == pytest.approx(0.95) and result.accuracy_std == pytest.approx(0.15)
    assert result.best_threshold == pytest.approx(0.50)
    # 10 impostor pairs cannot measure a FAR of 1e-3 or 1e-4 (the smallest FAR above 0 is 0.1)
    assert result.tar_at_far == {1e-3: None, 1e-4: None}
    summary = result.summary()
    assert summary["tar@far=1e-3"] is None and summary["accuracy"] == pytest.approx(0.95)


def test_tar_at_a_far_below_one_impostor_pair_is_not_available():
    """TAR@FAR needs at least 1/FAR impostor pairs: with 2,000 impostors FAR 1e-3 (2 accepted
    impostors at most) is measured and FAR 1e-4 is n/a: None in JSON, "n/a" when printed."""
    issame = np.arange(4000) % 2 == 0
    distances = np.where(issame, np.linspace(0.1, 1.9, 4000), np.linspace(1.0, 3.9, 4000))
    result = verification_metrics(*pairs_at_distances(distances), issame)
    genuine, impostor = np.sort(distances[issame]), np.sort(distances[~issame])
    assert result.tar_at_far[1e-3] == pytest.approx(np.mean(genuine < impostor[2]))   # 2 impostors accepted
    assert result.tar_at_far[1e-4] is None
    summary = result.summary()
    assert json.loads(json.dumps(summary))["tar@far=1e-4"] is None
    assert format_rate(summary["tar@far=1e-4"]) == "n/a" and format_rate(0.5) == "0.5000"
    row = comparison_table([("small", dict(summary, **{"tar@far=1e-3": None}))]).splitlines()[-1]
    assert row.split()[-2] == "n/a"


def test_folds_are_contiguous_first_ones_longer():
    slices = fold_slices(23, 10)
    assert [s.stop - s.start for s in slices] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert slices[0].start == 0 and slices[-1].stop == 23


def test_roc_handles_ties():
    far, tar, _ = roc_curve(np.array([0.1, 0.1, 0.5, 0.5]), np.array([True, False, True, False]))
    assert list(far) == [0.0, 0.5, 1.0] and list(tar) == [0.0, 0.5, 1.0]


class _Planted:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _jpeg(seed, size=112):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_restricted_unpickler_rejects_a_planted_os_system(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    images = [_jpeg(i) for i in range(20)]
    with open(path, "wb") as handle:
        pickle.dump((images + [_Planted(f"touch {marker}")], [True] * 10), handle, protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle global '(os|posix)\.system'"):
        read_bin(str(path))
    assert not marker.exists()
    other = tmp_path / "eval.bin"
    with open(other, "wb") as handle:
        pickle.dump((images, [True] * 10, {1, 2}), handle)
    with pytest.raises(DataError, match="expected a pickle of \\(images, issame\\)"):
        read_bin(str(other))


def _python2_bin(images, issame):
    """A protocol-2 pickle as Python 2 writes it: images as BINSTRING (py2 str), bools as NEWTRUE/NEWFALSE."""
    body = b"\x80\x02(("
    for image in images:
        body += b"T" + struct.pack("<i", len(image)) + image
    body += b"l("
    for flag in issame:
        body += b"\x88" if flag else b"\x89"
    return body + b"lt."


def test_read_bin_python3_and_python2_pickles_then_evaluate(tmp_path):
    images = [_jpeg(i) for i in range(20)]
    issame = [i % 2 == 0 for i in range(10)]
    py3 = tmp_path / "py3.bin"
    with open(py3, "wb") as handle:
        pickle.dump((images, issame), handle, protocol=2)  # bytes via _codecs.encode
    py2 = tmp_path / "py2.bin"
    py2.write_bytes(_python2_bin(images, issame))
    for path in (py3, py2):
        pairs = read_bin(str(path))
        assert pairs.num_pairs == 10 and pairs.images[3] == images[3] and list(pairs.issame) == issame
    torch.manual_seed(0)
    result = evaluate(build_backbone("tiny", embedding_size=16), read_bin(str(py2)), batch_size=8)
    assert 0.0 <= result.accuracy <= 1.0 and set(result.summary()) >= {"accuracy", "tar@far=1e-3", "tar@far=1e-4"}
    png = save_roc_plot([result], str(tmp_path / "roc.png"))
    assert Image.open(png).format == "PNG"


def test_pairs_list_under_a_root(tmp_path):
    for identity in range(2):
        (tmp_path / f"id{identity}").mkdir()
        for index in range(2):
            (tmp_path / f"id{identity}" / f"{index}.jpg").write_bytes(_jpeg(identity * 10 + index, size=64))
    lines = ["# comment", "id0/0.jpg id0/1.jpg 1", "", "id0/0.jpg id1/0.jpg 0"] * 5
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("\n".join(lines) + "\n")
    pairs = read_pairs(str(pairs_file))
    assert pairs.num_pairs == 10 and pairs.images[0] == str(tmp_path / "id0/0.jpg")
    result = evaluate(build_backbone("tiny", embedding_size=8, image_size=112).eval(), pairs, batch_size=4)
    assert result.num_pairs == 10  # the 64×64 images were resized to the network's 112×112
    bad = tmp_path / "bad.txt"
    bad.write_text("id0/0.jpg id0/1.jpg 1\nid0/0.jpg id1/0.jpg maybe\n")
    with pytest.raises(DataError, match=r"bad.txt:2: expected 'path1 path2 1\|0'"):
        read_pairs(str(bad))
    missing = tmp_path / "missing.txt"
    missing.write_text("id0/0.jpg id9/0.jpg 0\n")
    with pytest.raises(DataError, match=r"missing.txt:1: image .*id9/0.jpg does not exist"):
        read_pairs(str(missing))
    (tmp_path / "id1" / "1.jpg").write_bytes(b"not an image")
    broken = tmp_path / "broken.txt"
    broken.write_text("id0/0.jpg id1/1.jpg 0\n" * 10)
    with pytest.raises(DataError, match=r"image .*id1/1.jpg does not decode"):
        evaluate(build_backbone("tiny", embedding_size=8).eval(), read_pairs(str(broken)), batch_size=4)
    with pytest.raises(DataError, match="pairs list .*nowhere.txt does not exist"):
        read_pairs(str(tmp_path / "nowhere.txt"))


def test_check_decodes_names_the_set_the_pair_and_the_image(tmp_path):
    """Every image is decoded when a set is loaded; the first that does not decode is named with
    its set, pair (and line of a pairs list)."""
    for index in range(4):
        (tmp_path / f"{index}.jpg").write_bytes(_jpeg(index, size=32))
    good = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "3.jpg").write_bytes(good[:len(good) // 2])   # truncated
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("# header\n" + "0.jpg 1.jpg 1\n" * 6 + "2.jpg 3.jpg 0\n" + "0.jpg 2.jpg 0\n" * 3)
    with pytest.raises(DataError, match=rf"verification set {pairs_file}, pair 6, line 8: image .*3.jpg does not decode"):
        check_decodes(read_pairs(str(pairs_file)), 16)
    check_decodes(VerificationSet("ok", [good] * 20, [True] * 10), 16)   # nothing to say
    path = tmp_path / "set.bin"
    with open(path, "wb") as handle:
        pickle.dump(([good] * 5 + [good[:40]] + [good] * 14, [True] * 10), handle, protocol=2)
    with pytest.raises(DataError, match=rf"verification set {path}, pair 2: item 5: an encoded image does not decode"):
        check_decodes(read_bin(str(path)), 16)


# --------------------------------------------------------------------------------- backbone.pt

def test_backbone_roundtrip_keeps_weights_and_file_format(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=16, image_size=64).eval()
    path = str(tmp_path / "backbone.pt")
    save_backbone(model, path, network="tiny", embedding_size=16, image_size=64)
    assert os.listdir(tmp_path) == ["backbone.pt"]   # written under a temporary name, then renamed
    payload = torch.load(path, weights_only=True)   # the format backbone.pt files already have
    assert set(payload) == {"network", "embedding_size", "image_size", "state_dict", "sha256"}
    loaded, meta = load_backbone(path)
    assert meta == {"network": "tiny", "embedding_size": 16, "image_size": 64,
                    "sha256": payload["sha256"]} and not loaded.training
    assert payload["sha256"] == backbone_digest(dict(meta, sha256=None), model.state_dict())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_a_non_finite_model_is_not_saved(tmp_path):
    model = build_backbone("tiny", embedding_size=16, image_size=64)
    with torch.no_grad():
        model.embedding.norm_embedding.running_var[3] = float("nan")
    with pytest.raises(ValueError, match="refusing to save a non-finite model .*running_var"):
        save_backbone(model, str(tmp_path / "backbone.pt"), network="tiny", embedding_size=16, image_size=64)
    assert os.listdir(tmp_path) == []


def test_unusable_backbone_files_are_checkpoint_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable backbone checkpoint"):
        load_backbone(str(garbage))
    with pytest.raises(CheckpointError, match="not a readable backbone checkpoint"):
        load_backbone(str(tmp_path / "missing.pt"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a pfc backbone.pt"):
        load_backbone(str(foreign))
    unknown = tmp_path / "unknown.pt"
    torch.save({"network": "resnet9000", "embedding_size": 8, "image_size": 112, "state_dict": {}}, unknown)
    with pytest.raises(CheckpointError, match="unknown network 'resnet9000'"):
        load_backbone(str(unknown))


# --------------------------------------------------------------------------------- the tools

def test_compare_eval_reads_results_and_user_errors_are_one_line(tmp_path, capsys):
    summary = {"set": "pairs", "num_pairs": 40, "accuracy": 0.9, "accuracy_std": 0.01,
               "tar@far=1e-3": 0.5, "auc": 0.95}
    (tmp_path / "trained.json").write_text(json.dumps(summary))
    table = comparison_table(read_results([str(tmp_path / "trained.json")]))
    assert "pairs, 40 pairs" in table and "trained" in table and "0.9000 ± 0.0100" in table
    assert compare_eval.main([str(tmp_path / "trained.json"), str(tmp_path / "absent.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "absent.json" in error and "Traceback" not in error
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(DataError, match="not an evaluation result"):
        read_results([str(tmp_path / "other.json")])


def test_compare_eval_reads_a_training_runs_eval_results(tmp_path, capsys):
    """The trainer's eval_results.json ({"final": [...], "history": [...]}) is a column per final
    set, beside pfc-evaluate's output."""
    def summary(name, accuracy, step=None):
        row = {"set": name, "num_pairs": 40, "accuracy": accuracy, "accuracy_std": 0.01, "threshold": 1.2,
               "auc": 0.9, "tar@far=1e-3": None, "tar@far=1e-4": None}
        return row if step is None else dict(row, step=step)

    (tmp_path / "untrained.json").write_text(json.dumps(summary("pairs", 0.55)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval_results.json").write_text(json.dumps({"final": [summary("pairs", 0.8, 30)],
                                                       "history": [summary("pairs", 0.7, 15), summary("pairs", 0.8, 30)]}))
    assert compare_eval.main([str(tmp_path / "untrained.json"), str(run / "eval_results.json")]) == 0
    table = capsys.readouterr().out
    assert "untrained" in table and "0.5500 ± 0.0100" in table
    assert "eval_results" in table and "0.8000 ± 0.0100" in table and "0.7000" not in table
    (run / "eval_results.json").write_text(json.dumps({"final": [summary("lfw", 0.9, 30), summary("cfp", 0.85, 30)],
                                                       "history": []}))
    names = [name for name, _ in read_results([str(run / "eval_results.json")])]
    assert names == ["eval_results:lfw", "eval_results:cfp"]
    (run / "eval_results.json").write_text(json.dumps({"final": [], "history": []}))
    assert compare_eval.main([str(run / "eval_results.json")]) == 2
    assert "without final results" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["compare_eval", "evaluate", "export_onnx", "make_synthetic", "pack_shards"])
def test_every_tool_has_help(tool):
    result = subprocess.run([sys.executable, f"tools/{tool}.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0 and "usage:" in result.stdout and not result.stderr, result.stderr
