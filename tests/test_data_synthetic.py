"""Synthetic identities: file layout, determinism, disjoint seeds, pairs, landmarks, errors."""
import os

import numpy as np
import pytest
import simplejpeg

from pfc.datasets.synthetic import class_name, make_identity, render_sample, write_synthetic
from pfc.errors import ConfigError
from tools import make_synthetic


def test_tree_pairs_and_landmarks(tmp_path):
    out = str(tmp_path / "syn")
    assert make_synthetic.main([out, "--ids", "4", "--per", "3", "--seed", "5", "--pairs", "10", "--landmarks"]) == 0
    classes = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    assert classes == [class_name(5, k) for k in range(4)]
    for name in classes:
        assert sorted(os.listdir(os.path.join(out, name))) == ["0.jpg", "1.jpg", "2.jpg"]
        pixels = simplejpeg.decode_jpeg(open(os.path.join(out, name, "0.jpg"), "rb").read())
        assert pixels.shape == (112, 112, 3)
    pairs = [line.split() for line in open(os.path.join(out, "pairs.txt"))]
    assert len(pairs) == 10 and sorted(p[2] for p in pairs).count("1") == 5
    for first, second, same in pairs:
        assert os.path.isfile(os.path.join(out, first)) and os.path.isfile(os.path.join(out, second))
        assert first != second and (first.split("/")[0] == second.split("/")[0]) == (same == "1")
    rows = [line.strip().split(",") for line in open(os.path.join(out, "landmarks.csv"))]
    assert len(rows) == 12 and all(len(row) == 11 for row in rows)
    assert {row[0] for row in rows} == {f"{c}/{i}.jpg" for c in classes for i in range(3)}


def test_deterministic_and_seeds_give_other_identities(tmp_path):
    write_synthetic(str(tmp_path / "a"), 2, 2, seed=1)
    write_synthetic(str(tmp_path / "b"), 2, 2, seed=1)
    for name in (class_name(1, 0), class_name(1, 1)):
        for index in range(2):
            path = os.path.join(name, f"{index}.jpg")
            assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    one, other = make_identity(1, 0), make_identity(2, 0)
    assert one.eye_left != other.eye_left and one.face_radii != other.face_radii
    assert class_name(1, 0) != class_name(2, 0)


def test_landmarks_sit_on_the_drawn_pupils():
    """The eye landmarks are the pupil centres: the darkest spot near each is within 1.5 px."""
    rng = np.random.default_rng(0)
    checked = 0
    for index in range(12):
        identity = make_identity(9, index)
        image, landmarks = render_sample(identity, rng)
        gray = image.astype(float).mean(axis=2)
        for x, y in landmarks[:2]:
            x0, y0 = int(round(x)) - 3, int(round(y)) - 3
            if x0 < 0 or y0 < 0:
                continue
            patch = gray[y0:y0 + 7, x0:x0 + 7]
            row, col = np.unravel_index(np.argmin(patch), patch.shape)
            if patch.min() < 0.6 * np.median(patch):   # pupil visible (not occluded or blinked shut)
                checked += 1
                assert np.hypot(x0 + col - x, y0 + row - y) <= 1.5 + 1e-9
    assert checked >= 8


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ConfigError, match="at least one identity"):
        write_synthetic(str(tmp_path), 0, 3, seed=0)
    assert make_synthetic.main([str(tmp_path), "--ids", "1", "--per", "3", "--pairs", "4"]) == 2
    assert "at least 2 identities" in capsys.readouterr().err
