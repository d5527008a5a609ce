"""Feature extraction (pfc.evaluation.embedding): f(x) + f(flip x) of decoded and aligned faces,
the same array at world size 1 and 2 (real gloo ranks), the cache, .pt against ONNX, and errors
raised on every rank."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pfc.errors import CheckpointError, ConfigError, DataError
from pfc.evaluation.alignment import align_face_cv
from pfc.evaluation.embedding import FaceItem, extract_features, load_embedding_model, share_bounds
from pfc.evaluation.export import load_backbone
from tests.distributed import run_ranks
from tests.face_fixtures import DIM, SIZE, save_tiny_backbone, write_faces


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """(backbone.pt, 7 items: aligned faces and, every third, a loose crop with landmarks)."""
    folder = tmp_path_factory.mktemp("faces")
    model = save_tiny_backbone(str(folder / "backbone.pt"))
    items = [FaceItem(path, landmarks) for path, landmarks in write_faces(str(folder / "images"), 7, loose_every=3)]
    return model, items


def expected_features(model_file: str, items: list[FaceItem], flip: bool) -> np.ndarray:
    """Each face on its own, straight through the network: f(x) (+ f(flip x)), x = face/127.5 − 1."""
    network, _ = load_backbone(model_file)
    rows = []
    for item in items:
        image = np.asarray(Image.open(item.path).convert("RGB"))
        face = image if item.landmarks is None else align_face_cv(image, item.landmarks, SIZE)
        x = torch.from_numpy(face.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            rows.append((network(x) + network(x.flip(3)) if flip else network(x))[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("flip", [True, False])
def test_features_are_the_sum_over_the_flip_of_the_unnormalised_embeddings(faces, flip):
    model_file, items = faces
    features = extract_features(load_embedding_model(model_file), items, batch_size=3, flip=flip,
                                num_workers=0 if flip else 1, progress=False)
    assert features.dtype == np.float32 and features.shape == (len(items), DIM)
    np.testing.assert_allclose(features, expected_features(model_file, items, flip), atol=1e-5)
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)


def test_shares_are_contiguous_and_differ_by_at_most_one_item():
    bounds = [share_bounds(7, 3, rank) for rank in range(3)]
    assert bounds == [(0, 3), (3, 5), (5, 7)]
    assert [share_bounds(2, 3, rank) for rank in range(3)] == [(0, 1), (1, 2), (2, 2)]


def _extract_on_ranks(rank, world_size, model_file, items, bad_path, cache_dir):
    model = load_embedding_model(model_file)
    # the ranks are daemon processes: no DataLoader workers
    features = extract_features(model, items, batch_size=2, num_workers=0, progress=False)
    cached = extract_features(model, items, batch_size=2, num_workers=0, progress=False, cache_dir=cache_dir)
    model.forward = None   # a second call must read the cache (on every rank) and never run the model
    again = extract_features(model, items, batch_size=2, num_workers=0, progress=False, cache_dir=cache_dir)
    assert np.array_equal(cached, features) and np.array_equal(again, features)
    model = load_embedding_model(model_file)
    # an unreadable image in rank 1's share only (the last item): every rank raises, none waits
    broken = items + [FaceItem(bad_path, line=42)]
    try:
        extract_features(model, broken, batch_size=2, num_workers=0, progress=False)
        message = None
    except DataError as exc:
        message = str(exc)
    return torch.from_numpy(features), message


def test_two_ranks_give_the_single_process_array_share_a_cache_and_raise_the_same_error(faces, tmp_path):
    model_file, items = faces
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a JPEG")
    single = extract_features(load_embedding_model(model_file), items, batch_size=4, num_workers=0, progress=False)
    results = run_ranks(_extract_on_ranks, 2, model_file, items, str(bad), str(tmp_path / "cache"), timeout=90)
    for features, message in results:
        np.testing.assert_allclose(features.numpy(), single, atol=1e-6)
        assert message is not None and f"{bad} (line 42): the image does not decode" in message
        assert "rank 1" in message


def test_the_cache_is_reused_and_keyed_by_model_items_and_flip(faces, tmp_path):
    model_file, items = faces
    model = load_embedding_model(model_file)
    first = extract_features(model, items, cache_dir=str(tmp_path / "cache"), num_workers=0, progress=False)
    (cache_file,) = os.listdir(tmp_path / "cache")
    calls = []
    forward = model.forward
    model.forward = lambda batch: calls.append(len(batch)) or forward(batch)
    again = extract_features(model, items, cache_dir=str(tmp_path / "cache"), num_workers=0, progress=False)
    assert np.array_equal(again, first) and calls == []
    unflipped = extract_features(model, items, cache_dir=str(tmp_path / "cache"), flip=False, num_workers=0,
                                 progress=False)
    assert calls and not np.allclose(unflipped, first) and len(os.listdir(tmp_path / "cache")) == 2
    opencv4 = extract_features(model, items, cache_dir=str(tmp_path / "cache"), resampling="opencv4", num_workers=0,
                               progress=False)
    loose = np.array([item.landmarks is not None for item in items])
    assert np.array_equal(opencv4[~loose], first[~loose]) and not np.allclose(opencv4[loose], first[loose])
    assert len(os.listdir(tmp_path / "cache")) == 3
    (tmp_path / "cache" / cache_file).write_bytes(b"truncated")        # a damaged cache is extracted again
    calls.clear()
    assert np.array_equal(extract_features(model, items, cache_dir=str(tmp_path / "cache"), num_workers=0,
                                           progress=False), first) and calls
    assert not [name for name in os.listdir(tmp_path / "cache") if ".tmp" in name]


def test_a_pt_file_and_its_onnx_export_give_the_same_features(faces, tmp_path):
    pytest.importorskip("onnxruntime")
    from pfc.evaluation.onnx_export import export_onnx

    model_file, items = faces
    network, meta = load_backbone(model_file)
    export_onnx(network, str(tmp_path / "backbone.onnx"), meta["image_size"])
    onnx_model = load_embedding_model(str(tmp_path / "backbone.onnx"))
    assert (onnx_model.embedding_size, onnx_model.image_size) == (DIM, SIZE)
    from_pt = extract_features(load_embedding_model(model_file), items, num_workers=0, progress=False)
    from_onnx = extract_features(onnx_model, items, num_workers=0, progress=False)
    np.testing.assert_allclose(from_onnx, from_pt, atol=1e-4)


def test_unusable_models_and_images_name_the_file(faces, tmp_path):
    model_file, items = faces
    with pytest.raises(CheckpointError, match="does not exist"):
        load_embedding_model(str(tmp_path / "missing.pt"))
    (tmp_path / "garbage.onnx").write_bytes(b"not a graph")
    if __import__("importlib").util.find_spec("onnxruntime"):
        with pytest.raises(CheckpointError, match="garbage.onnx: onnxruntime cannot load it"):
            load_embedding_model(str(tmp_path / "garbage.onnx"))
    model = load_embedding_model(model_file)
    with pytest.raises(DataError, match=r"missing\.png: cannot read the image"):
        extract_features(model, [FaceItem(str(tmp_path / "missing.png"))], num_workers=0, progress=False)
    with pytest.raises(DataError, match=r"face000\.png \(line 3\): need 5 finite"):
        extract_features(model, [FaceItem(items[0].path, np.zeros((4, 2)), line=3)], num_workers=0, progress=False)
    with pytest.raises(ConfigError, match="batch size"):
        extract_features(model, items, batch_size=0)


def test_an_image_replaced_in_place_is_extracted_again_not_read_from_the_cache(faces, tmp_path):
    # the key covers what the features depend on: a face file rewritten under the same name
    # (another crop of the release, a re-download) must not bring back the old face's features
    model_file, items = faces
    folder = tmp_path / "images"
    folder.mkdir()
    copies = []
    for index, item in enumerate(items[:2]):
        target = folder / f"{index}{os.path.splitext(item.path)[1]}"
        target.write_bytes(open(item.path, "rb").read())
        copies.append(FaceItem(str(target), item.landmarks))
    model = load_embedding_model(model_file)
    cache = str(tmp_path / "cache")
    before = extract_features(model, copies, cache_dir=cache, num_workers=0, progress=False)
    replacement = items[2] if items[2].landmarks is None else items[3]
    if copies[0].landmarks is None and replacement.landmarks is None:
        Image.open(replacement.path).save(copies[0].path)
    else:
        pytest.skip("fixture layout changed")
    after = extract_features(model, copies, cache_dir=cache, num_workers=0, progress=False)
    assert not np.allclose(after[0], before[0])
    np.testing.assert_allclose(after, expected_features(model_file, copies, flip=True), rtol=1e-5, atol=1e-5)
