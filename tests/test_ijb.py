"""IJB-B/C protocol: against a float64 reference written here from the formulas (loops, no pfc
code), on a synthetic IJB root (pfc.datasets.synthetic_ijb); bad input through the CLI."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from pfc.datasets.synthetic_ijb import write_synthetic_ijb
from pfc.evaluation.ijb import FARS, Roc, evaluate_ijb, read_ijb_meta
from pfc.evaluation.ijb.verification import pair_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
SUBJECTS = 24            # 12 per gallery: 24 non-mated probes each, so FPIR 0.01 and 0.1 differ


# ------------------------------------------------------------------ the reference (loops, float64)

def reference_templates(features, scores, names_templates, names_medias) -> dict[int, np.ndarray]:
    """{template id: unit feature}: face × detector score, mean per media, sum over media, normalise."""
    by_template: dict[int, dict[int, list]] = {}
    for face, (template, media) in enumerate(zip(names_templates, names_medias)):
        by_template.setdefault(int(template), {}).setdefault(int(media), []).append(
            np.asarray(features[face], np.float64) * float(scores[face]))
    out = {}
    for template, medias in by_template.items():
        total = sum(np.mean(faces, axis=0) for faces in medias.values())
        norm = math.sqrt(float(np.dot(total, total)))
        out[template] = total / norm if norm > 0 else total
    return out


def reference_roc(scores, labels):
    """sklearn's roc_curve(labels, scores) with drop_intermediate=True, from its definition."""
    ranked = sorted(zip((float(s) for s in scores), (bool(y) for y in labels)), key=lambda pair: -pair[0])
    fps, tps, tp, fp = [], [], 0, 0
    for i, (score, mated) in enumerate(ranked):       # one point per distinct score: accept all ≥ it
        tp, fp = tp + mated, fp + (not mated)
        if i == len(ranked) - 1 or ranked[i + 1][0] != score:
            fps.append(fp)
            tps.append(tp)
    keep = [0] + [i for i in range(1, len(fps) - 1)
                  if fps[i - 1] + fps[i + 1] != 2 * fps[i] or tps[i - 1] + tps[i + 1] != 2 * tps[i]] + [len(fps) - 1]
    fps = [0] + [fps[i] for i in keep]
    tps = [0] + [tps[i] for i in keep]
    return np.array(fps) / fps[-1], np.array(tps) / tps[-1]


def reference_tar(scores, labels, far):
    """insightface: flipud(fpr, tpr), then min over (|fpr − far|, index) pairs."""
    fpr, tpr = reference_roc(scores, labels)
    fpr, tpr = fpr[::-1], tpr[::-1]
    _, index = min(zip(abs(fpr - far), range(len(fpr))))
    return tpr[index]


def reference_tar_interpolated(scores, labels, far):
    fpr, tpr = reference_roc(scores, labels)
    best = None
    for i in range(len(fpr)):
        if fpr[i] == far:
            best = tpr[i]                              # the last (highest) point at far
    if best is not None:
        return best
    for i in range(len(fpr) - 1):
        if fpr[i] < far < fpr[i + 1]:
            return tpr[i] + (tpr[i + 1] - tpr[i]) * (far - fpr[i]) / (fpr[i + 1] - fpr[i])
    return tpr[-1]


def reference_identification(templates, gallery, probes, fpirs):
    """Open-set 1:N of one gallery from the definitions (loops over probes and thresholds)."""
    gallery_subject = dict(zip(gallery.templates.tolist(), gallery.subjects.tolist()))
    ranks, mate_scores, nonmated_tops = [], [], []
    for probe, subject in zip(probes.templates.tolist(), probes.subjects.tolist()):
        sims = {g: float(np.dot(templates[probe], templates[g])) for g in gallery_subject}
        mates = [g for g in sims if gallery_subject[g] == subject]
        if mates:
            mate = max(sims[g] for g in mates)
            ranks.append(1 + sum(1 for g in sims if g not in mates and sims[g] > mate))
            mate_scores.append(mate)
        else:
            nonmated_tops.append(max(sims.values()))
    out = {"top1": np.mean([r <= 1 for r in ranks]), "top5": np.mean([r <= 5 for r in ranks]), "tpir_at_fpir": {}}
    candidates = sorted(set(mate_scores + nonmated_tops)) + [math.inf]
    for fpir in fpirs:
        threshold = min(t for t in candidates if sum(s >= t for s in nonmated_tops) <= fpir * len(nonmated_tops) + 1e-9)
        hits = [r == 1 and s >= threshold for r, s in zip(ranks, mate_scores)]
        out["tpir_at_fpir"][f"{fpir:g}"] = float(np.mean(hits))
    return out


# ------------------------------------------------------------------ fixture

@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    write_synthetic_ijb(str(root), "IJBC", subjects=SUBJECTS, seed=3)
    return str(root)


def subject_features(meta, dim=16, noise=0.9, seed=0) -> np.ndarray:
    """Face features that cluster by subject (so TAR and ranks vary), unnormalised, float32."""
    rng = np.random.default_rng(seed)
    subject_of = {}
    for search in [*meta.galleries.values(), meta.probes]:
        subject_of.update(zip(search.templates.tolist(), search.subjects.tolist()))
    centres = {s: rng.standard_normal(dim) for s in set(subject_of.values())}
    rows = [centres[subject_of[int(t)]] + noise * rng.standard_normal(dim) for t in meta.faces.templates]
    return (np.array(rows) * rng.uniform(0.5, 3.0, (len(rows), 1))).astype(np.float32)


# ------------------------------------------------------------------ protocol against the reference

def test_fixture_covers_every_pooling_branch_and_sparse_ids(ijb_root):
    meta = read_ijb_meta(ijb_root, "IJBC")
    faces = meta.faces
    per_template = {t: faces.medias[faces.templates == t] for t in np.unique(faces.templates)}
    assert any(len(m) == 1 for m in per_template.values())                                   # one face
    assert any(len(m) > 1 and len(np.unique(m)) == len(m) for m in per_template.values())    # single-face media
    assert any(len(np.unique(m)) < len(m) for m in per_template.values())                    # multi-frame media
    shared = [m for m in np.unique(faces.medias) if len(np.unique(faces.templates[faces.medias == m])) > 1]
    assert shared                                                              # a media id in two templates
    assert faces.detector_scores.min() < 0.3 and faces.detector_scores.max() > 0.8
    assert faces.templates.max() > 10_000 and len(np.unique(faces.templates)) < 100
    assert set(meta.galleries) == {"G1", "G2"} and len(meta.probes.templates) > 0


def test_scores_and_tar_table_match_the_float64_reference(ijb_root):
    meta = read_ijb_meta(ijb_root, "IJBC")
    features = subject_features(meta, noise=1.3)
    evaluation = evaluate_ijb(meta, features)
    templates = reference_templates(features, meta.faces.detector_scores, meta.faces.templates, meta.faces.medias)
    expected = [float(np.dot(templates[a], templates[b])) for a, b in zip(meta.pairs.first, meta.pairs.second)]
    np.testing.assert_allclose(evaluation.scores, expected, atol=1e-5, rtol=0)
    labels = meta.pairs.labels.tolist()
    result = evaluation.result
    assert result["tar_at_far"] == {f"{far:.0e}": reference_tar(expected, labels, far) for far in FARS}
    interpolated = {f"{far:.0e}": reference_tar_interpolated(expected, labels, far) for far in FARS}
    assert result["tar_at_far_interpolated"] == pytest.approx(interpolated, abs=1e-12)
    assert 0 < result["tar_at_far"]["1e-01"] < 1          # the fixture's numbers are not trivial
    assert (result["templates"], result["pairs"], result["faces"]) == (3 * SUBJECTS, 2 * SUBJECTS ** 2, len(meta.faces))


def test_identification_matches_the_reference_per_gallery_and_mean(ijb_root):
    meta = read_ijb_meta(ijb_root, "IJBC")
    features = subject_features(meta, noise=1.6, seed=1)
    result = evaluate_ijb(meta, features).result["identification"]
    templates = reference_templates(features, meta.faces.detector_scores, meta.faces.templates, meta.faces.medias)
    expected = {name: reference_identification(templates, gallery, meta.probes, (0.01, 0.1))
                for name, gallery in meta.galleries.items()}
    for name in ("G1", "G2"):
        got = result[name]
        assert (got["top1"], got["top5"], got["tpir_at_fpir"]) == (
            expected[name]["top1"], expected[name]["top5"], expected[name]["tpir_at_fpir"])
        assert got["mated_probes"] == got["nonmated_probes"] == SUBJECTS     # the other gallery's probes are non-mated
    assert result["mean"]["top1"] == pytest.approx((expected["G1"]["top1"] + expected["G2"]["top1"]) / 2)
    assert result["mean"]["tpir_at_fpir"]["0.1"] == pytest.approx(
        (expected["G1"]["tpir_at_fpir"]["0.1"] + expected["G2"]["tpir_at_fpir"]["0.1"]) / 2)
    assert 0 < result["mean"]["top1"] < result["mean"]["top5"] < 1
    assert result["mean"]["tpir_at_fpir"]["0.01"] < result["mean"]["tpir_at_fpir"]["0.1"]


def test_tar_at_far_reproduces_insightface_on_ties_runs_and_dropped_points():
    """Rounded scores give ties (diagonal steps), vertical and horizontal runs, collinear points
    that sklearn drops, and FARs equidistant from two points."""
    rng = np.random.default_rng(7)
    for trial in range(6):
        count = int(rng.integers(40, 400))
        labels = rng.random(count) < rng.uniform(0.1, 0.6)
        scores = np.round(rng.normal(labels * rng.uniform(0.5, 2), 1.0), int(rng.integers(0, 3)))
        roc = Roc.of(scores, labels)
        fpr, tpr = reference_roc(scores.tolist(), labels.tolist())
        np.testing.assert_array_equal(roc.fpr, fpr)
        np.testing.assert_array_equal(roc.tpr, tpr)
        targets = [*FARS, *fpr[1:-1], *((fpr[1:] + fpr[:-1]) / 2)]        # on points and exactly between
        for far in targets:
            assert roc.tar_at_far(far) == reference_tar(scores.tolist(), labels.tolist(), far), (trial, far)
            assert roc.tar_at_far_interpolated(far) == pytest.approx(
                reference_tar_interpolated(scores.tolist(), labels.tolist(), far), abs=1e-12)


def test_pair_scores_blocks_give_the_dot_products_in_pair_order():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((50, 7))
    first, second = rng.integers(0, 50, 3000), rng.integers(0, 50, 3000)
    expected = np.einsum("ij,ij->i", features[first], features[second])
    for block in (1, 3, 256):
        np.testing.assert_allclose(pair_scores(features, first, second, block=block), expected, atol=1e-12)


# ------------------------------------------------------------------ bad input, through the CLI

def corrupt(root, tmp_path, file, edit):
    """A copy of the fixture's meta with ``file`` rewritten by ``edit(lines) -> lines`` (or removed)."""
    copy = tmp_path / "ijb"
    os.makedirs(copy / "meta")
    os.symlink(os.path.join(root, "loose_crop"), copy / "loose_crop")
    for name in os.listdir(os.path.join(root, "meta")):
        with open(os.path.join(root, "meta", name), encoding="utf-8") as stream:
            lines = stream.read().splitlines()
        if name == file:
            lines = edit(lines)
            if lines is None:
                continue
        (copy / "meta" / name).write_text("".join(line + "\n" for line in lines))
    return str(copy)


def replace_line(number, make):
    def edit(lines):
        lines = list(lines)
        lines[number - 1] = make(lines[number - 1])
        return lines
    return edit


BAD_INPUTS = [
    ("ijbc_template_pair_label.txt", lambda lines: None, r"missing IJB meta file .*ijbc_template_pair_label.txt"),
    ("ijbc_name_5pts_score.txt", replace_line(5, lambda l: l.rsplit(" ", 1)[0]),
     r"ijbc_name_5pts_score.txt line 5: expected 12 fields"),
    ("ijbc_name_5pts_score.txt", replace_line(3, lambda l: l.replace(" ", " x", 1)),
     r"ijbc_name_5pts_score.txt line 3: field 2 'x.*' is not a number"),
    ("ijbc_face_tid_mid.txt", lambda lines: lines[:-1],
     r"ijbc_face_tid_mid.txt has \d+ faces but .*ijbc_name_5pts_score.txt has \d+"),
    ("ijbc_face_tid_mid.txt", replace_line(4, lambda l: "other.jpg " + l.split(" ", 1)[1]),
     r"ijbc_face_tid_mid.txt line 4: face 'other.jpg' differs from"),
    ("ijbc_template_pair_label.txt", replace_line(6, lambda l: "987654321 " + l.split(" ", 1)[1]),
     r"ijbc_template_pair_label.txt line 6: template 987654321 has no faces in .*ijbc_face_tid_mid.txt"),
    ("ijbc_template_pair_label.txt", replace_line(2, lambda l: l + " 1"),
     r"ijbc_template_pair_label.txt line 2: expected 3 fields"),
    ("ijbc_template_pair_label.txt", replace_line(3, lambda l: l[:-1] + "7"),
     r"ijbc_template_pair_label.txt line 3: label 7 is not 0 or 1"),
    ("ijbc_template_pair_label.txt", lambda lines: [line[:-1] + "1" for line in lines],
     r"ijbc_template_pair_label.txt: all \d+ pairs are mated; a ROC needs non-mated pairs too"),
    ("ijbc_1N_probe_mixed.csv", replace_line(4, lambda l: "55," + l.split(",", 1)[1]),
     r"ijbc_1N_probe_mixed.csv line 4: template 55 has no faces"),
    ("ijbc_1N_gallery_G2.csv", replace_line(3, lambda l: l.split(",")[0] + ",1," + l.split(",", 2)[2]),
     r"ijbc_1N_gallery_G2.csv line 3: template \d+ has subject 1 here but \d+ on line 2"),
    ("ijbc_1N_gallery_G1.csv", lambda lines: None, r"missing 1:N meta file .*ijbc_1N_gallery_G1.csv"),
]


@pytest.mark.parametrize("file, edit, message", BAD_INPUTS, ids=[m.split(":")[0][:40] for _, _, m in BAD_INPUTS])
def test_bad_meta_ends_the_cli_with_one_line_naming_file_and_line(ijb_root, tmp_path, capsys, file, edit, message):
    from pfc.cli.eval_ijb import main

    root = corrupt(ijb_root, tmp_path, file, edit)
    model = tmp_path / "backbone.pt"
    model.write_bytes(b"")                   # the meta files are read before the model
    code = main(["--model", str(model), "--root", root, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not os.path.exists(tmp_path / "out" / "ijb_result.json")


def test_the_tool_exits_2_with_one_line_for_a_missing_meta_file(tmp_path):
    model = tmp_path / "backbone.pt"
    model.write_bytes(b"")
    os.makedirs(tmp_path / "root" / "meta")
    run = subprocess.run([sys.executable, "tools/eval_ijb.py", "--model", str(model), "--root", str(tmp_path / "root"),
                          "--target", "IJBB", "--output", str(tmp_path / "out")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    missing = tmp_path / "root" / "meta" / "ijbb_name_5pts_score.txt"
    assert run.stderr.strip() == f"error: missing IJB meta file {missing}"


# ------------------------------------------------------------------ end to end: images → numbers

def test_the_tool_on_images_pt_and_onnx_agree_and_a_rerun_reads_the_cache(ijb_root, tmp_path, monkeypatch, capsys):
    """A tiny backbone over the fixture's loose crops: the outputs the issue names, the scores
    equal the reference protocol on the extracted features, torchrun with 2 ranks gives the same
    scores, a rerun into the same folder (another batch size) never calls the model, --no-flip
    changes the features, ONNX within 1e-4 of .pt."""
    from tests.face_fixtures import save_tiny_backbone

    from pfc.cli import eval_ijb
    from pfc.evaluation import embedding
    from pfc.evaluation.embedding import FaceItem, extract_features, load_embedding_model

    backbone = save_tiny_backbone(str(tmp_path / "backbone.pt"))
    out = tmp_path / "out"
    assert eval_ijb.main(["--model", backbone, "--root", ijb_root, "--output", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "IJBC 1:1 TAR (%) at FAR" in printed and "backbone.pt" in printed
    result = json.loads((out / "ijb_result.json").read_text())
    assert set(result["tar_at_far"]) == {"1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}
    assert set(result["identification"]) == {"G1", "G2", "mean"}
    assert set(result["identification"]["G1"]["tpir_at_fpir"]) == {"0.01", "0.1"}
    assert (result["templates"], result["pairs"], result["flip"]) == (3 * SUBJECTS, 2 * SUBJECTS ** 2, True)
    assert (out / "roc.png").stat().st_size > 0
    scores = np.load(out / "scores.npy")

    meta = read_ijb_meta(ijb_root, "IJBC")
    items = [FaceItem(meta.layout.image(n), lm) for n, lm in zip(meta.faces.names.tolist(), meta.faces.landmarks)]
    features = extract_features(load_embedding_model(backbone), items, num_workers=0, progress=False)
    templates = reference_templates(features, meta.faces.detector_scores, meta.faces.templates, meta.faces.medias)
    expected = [float(np.dot(templates[a], templates[b])) for a, b in zip(meta.pairs.first, meta.pairs.second)]
    np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "tools/eval_ijb.py", "--model", backbone, "--root", ijb_root, "--output",
                          str(tmp_path / "two_ranks"), "--workers", "0"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]             # each rank extracts half; rank 0 alone writes
    assert run.stdout.count("IJBC 1:1 TAR (%) at FAR") == 1, run.stdout
    np.testing.assert_allclose(np.load(tmp_path / "two_ranks" / "scores.npy"), scores, atol=1e-6, rtol=0)

    def no_model(path, device="cpu"):
        model = load_embedding_model(path, device)
        model.forward = lambda batch: pytest.fail("the rerun called the model")
        return model

    monkeypatch.setattr(embedding, "load_embedding_model", no_model)
    assert eval_ijb.main(["--model", backbone, "--root", ijb_root, "--output", str(out), "--workers", "0",
                          "--batch-size", "7"]) == 0
    np.testing.assert_array_equal(np.load(out / "scores.npy"), scores)
    monkeypatch.undo()

    assert eval_ijb.main(["--model", backbone, "--root", ijb_root, "--output", str(tmp_path / "unflipped"),
                          "--workers", "0", "--no-flip"]) == 0
    assert json.loads((tmp_path / "unflipped" / "ijb_result.json").read_text())["flip"] is False
    assert np.abs(np.load(tmp_path / "unflipped" / "scores.npy") - scores).max() > 1e-3

    assert eval_ijb.main(["--model", backbone, "--root", ijb_root, "--output", str(tmp_path / "opencv4"),
                          "--workers", "0", "--resampling", "opencv4"]) == 0
    assert json.loads((tmp_path / "opencv4" / "ijb_result.json").read_text())["resampling"] == "opencv4"
    fixed_point = np.load(tmp_path / "opencv4" / "scores.npy")        # OpenCV <= 4's arithmetic: other
    assert 0 < np.abs(fixed_point - scores).max() < 2e-3                # pixels, scores within the 2e-3

    pytest.importorskip("onnxruntime")
    from pfc.evaluation.export import load_backbone
    from pfc.evaluation.onnx_export import export_onnx

    network, saved = load_backbone(backbone)
    export_onnx(network, str(tmp_path / "backbone.onnx"), saved["image_size"])
    onnx_out = tmp_path / "onnx"
    assert eval_ijb.main(["--model", str(tmp_path / "backbone.onnx"), "--root", ijb_root, "--output", str(onnx_out),
                          "--workers", "0"]) == 0
    np.testing.assert_allclose(np.load(onnx_out / "scores.npy"), scores, atol=1e-4, rtol=0)


def test_an_unreadable_image_names_the_file_and_its_line(ijb_root, tmp_path, capsys):
    from tests.face_fixtures import save_tiny_backbone

    from pfc.cli.eval_ijb import main

    root = corrupt(ijb_root, tmp_path, "", None)
    os.unlink(root + "/loose_crop")
    os.makedirs(root + "/loose_crop")
    for name in os.listdir(os.path.join(ijb_root, "loose_crop")):
        os.symlink(os.path.join(ijb_root, "loose_crop", name), os.path.join(root, "loose_crop", name))
    os.unlink(os.path.join(root, "loose_crop", "7.jpg"))
    with open(os.path.join(root, "loose_crop", "7.jpg"), "wb") as stream:
        stream.write(b"not a jpeg")
    backbone = save_tiny_backbone(str(tmp_path / "backbone.pt"))
    code = main(["--model", backbone, "--root", root, "--output", str(tmp_path / "out"), "--workers", "0"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors         # beside the progress bar, one line
    assert "loose_crop/7.jpg (line 7)" in errors[0], errors

