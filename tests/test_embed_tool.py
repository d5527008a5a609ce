"""pfc-embed (pfc.cli.embed): a folder tree, an image list with landmarks, and pfc shards in;
OUT.npy (normalised features, rows in the order of OUT.names.txt) out; bad input as one line."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pfc.cli import embed as embed_tool
from pfc.evaluation.embedding import FaceItem, extract_features, load_embedding_model
from tests.data_fixtures import jpeg, write_shard_set
from tests.face_fixtures import DIM, face_image, save_tiny_backbone, write_faces

ALIGNED_POINTS = np.array([[11, 15], [21, 15], [16, 20], [12, 26], [20, 26]], dtype=float)   # near the 32-px template


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    model = save_tiny_backbone(str(root / "backbone.pt"))
    faces = write_faces(str(root / "faces" / "b"), 3) + write_faces(str(root / "faces" / "a"), 3, loose_every=2)
    return root, model, faces


def normalised(model_file: str, items: list[FaceItem], flip: bool = True) -> np.ndarray:
    features = extract_features(load_embedding_model(model_file), items, num_workers=0, flip=flip, progress=False)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def read_outputs(prefix) -> tuple[np.ndarray, list[str]]:
    with open(f"{prefix}.names.txt", encoding="utf-8") as stream:
        return np.load(f"{prefix}.npy"), stream.read().splitlines()


def test_a_folder_tree_is_embedded_in_sorted_order(setup, capsys):
    root, model, faces = setup
    aligned = [path for path, landmarks in faces if landmarks is None]
    folder = root / "aligned"
    for path in aligned:
        relative = os.path.relpath(path, root / "faces")
        os.makedirs(folder / os.path.dirname(relative), exist_ok=True)
        os.link(path, folder / relative)
    assert embed_tool.main([model, "--folder", str(folder), "-o", str(root / "out_folder"), "--no-flip",
                            "--workers", "0", "--quiet"]) == 0
    features, names = read_outputs(root / "out_folder")
    assert names == sorted(os.path.relpath(path, root / "faces") for path in aligned)
    assert features.dtype == np.float32 and features.shape == (len(aligned), DIM)
    np.testing.assert_allclose(features, normalised(model, [FaceItem(str(folder / name)) for name in names], False),
                               atol=1e-6)
    assert f"({len(aligned)} x {DIM})" in capsys.readouterr().err


def test_an_image_list_with_landmarks_aligns_each_face(setup):
    root, model, faces = setup
    with open(root / "list.txt", "w") as stream:
        stream.write("# faces\n\n" + "".join(f"{os.path.relpath(path, root)}\n" for path, _ in faces))
    with open(root / "landmarks.csv", "w") as stream:
        stream.write("name,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n")
        for path, landmarks in faces:
            points = landmarks if landmarks is not None else ALIGNED_POINTS
            stream.write(os.path.relpath(path, root) + "," + ",".join(f"{v:.6f}" for v in np.ravel(points)) + "\n")
    assert embed_tool.main([model, "--list", str(root / "list.txt"), "--landmarks", str(root / "landmarks.csv"),
                            "-o", str(root / "out_list.npy"), "--workers", "1", "--batch-size", "4", "--quiet"]) == 0
    features, names = read_outputs(root / "out_list")
    assert names == [os.path.relpath(path, root) for path, _ in faces]
    expected_items = [FaceItem(path, ALIGNED_POINTS if landmarks is None else landmarks) for path, landmarks in faces]
    np.testing.assert_allclose(features, normalised(model, expected_items), atol=1e-6)


def test_shards_are_embedded_by_sample_key(setup):
    root, model, _ = setup
    images = [face_image(seed) for seed in range(5)]
    write_shard_set(str(root / "shards"), [[(f"s{k}", {"jpg": jpeg(images[k]), "cls": b"0"}) for k in range(3)],
                                          [(f"s{k}", {"jpg": jpeg(images[k]), "cls": b"1"}) for k in range(3, 5)]],
                    num_classes=2, size=(32, 32))
    assert embed_tool.main([model, "--shards", str(root / "shards"), "-o", str(root / "out_shards"),
                            "--workers", "0", "--quiet"]) == 0
    features, names = read_outputs(root / "out_shards")
    assert names == [f"s{k}" for k in range(5)]
    items = [FaceItem(f"s{k}", data=jpeg(images[k])) for k in range(5)]
    np.testing.assert_allclose(features, normalised(model, items), atol=1e-6)


@pytest.mark.parametrize("arguments, message", [
    (["--folder", "{root}/nowhere"], "--folder {root}/nowhere is not a folder"),
    (["--list", "{root}/bad_list.txt"], "{root}/bad_list.txt:2: image {root}/missing.png does not exist"),
    (["--list", "{root}/broken_list.txt"], "{root}/broken.png (line 1): the image does not decode"),
    (["--folder", "{root}/faces", "--landmarks", "{root}/few_landmarks.csv"], "no landmarks for a/face000.png"),
    (["--folder", "{root}/faces", "-o", "{root}/no/such/out"], "the folder {root}/no/such does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2_and_writes_nothing(setup, capsys, arguments, message):
    root, model, faces = setup
    (root / "bad_list.txt").write_text(f"{os.path.relpath(faces[0][0], root)}\nmissing.png\n")
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "broken_list.txt").write_text("broken.png\n")
    (root / "few_landmarks.csv").write_text("b/face000.png," + ",".join(["10"] * 10) + "\n")
    arguments = [a.format(root=root) for a in arguments]
    out = [] if "-o" in arguments else ["-o", str(root / "never")]
    assert embed_tool.main([model, *arguments, *out, "--workers", "0", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message.format(root=root) in error and "\n" not in error
    assert not [name for name in os.listdir(root) if name.startswith("never")]
