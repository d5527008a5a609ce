"""Packing: RecordIO reading, folder / RecordIO round trips, alignment, resume, verify, bad input."""
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from pfc.datasets.align import TEMPLATE_112, align_face, apply_transform, similarity_transform
from pfc.datasets import FolderSource, PackOptions, RecordSource, pack, verify_shards
from pfc.datasets.recordio import MAGIC, IndexedRecordFile, read_record, unpack_record
from pfc.datasets.sources import read_landmarks
from pfc.errors import ConfigError, DataError
from tests.data_fixtures import (encode_record_parts, jpeg, png, random_image, record_payload,
                                 write_rec)
from tools import pack_shards


def read_all_samples(out_dir):
    """{key: (pixels, label)} over every shard of a packed set, plus the manifest."""
    with open(os.path.join(out_dir, "dataset.json")) as stream:
        manifest = json.load(stream)
    samples = {}
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(out_dir, shard["name"])) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
        keys = {name.split(".")[0] for name in members}
        assert len(keys) == shard["num_samples"]
        for key in keys:
            assert key not in samples
            samples[key] = (simplejpeg.decode_jpeg(members[key + ".jpg"]), int(members[key + ".cls"]))
    return samples, manifest


# ------------------------------------------------------------------------------------------- RecordIO

def test_recordio_multipart_record_round_trips():
    magic = struct.pack("<I", MAGIC)
    payload = b"abcd" + magic + b"efgh" + magic + magic + b"ij"   # three magic words at aligned offsets
    framed = encode_record_parts(payload)
    flags = []
    stream = io.BytesIO(framed)
    while stream.tell() < len(framed):
        _, lrec = struct.unpack("<II", stream.read(8))
        flags.append(lrec >> 29)
        stream.seek(((lrec & (2**29 - 1)) + 3) & ~3, 1)
    assert flags == [1, 2, 2, 3]
    stream = io.BytesIO(framed + encode_record_parts(b"tail!"))
    assert read_record(stream) == payload
    assert read_record(stream) == b"tail!"
    assert read_record(stream) is None


def test_recordio_rejects_damage():
    framed = encode_record_parts(b"12345678")
    with pytest.raises(DataError, match="bad RecordIO magic"):
        read_record(io.BytesIO(b"\0\0\0\0" + framed[4:]))
    with pytest.raises(DataError, match="truncated RecordIO record"):
        read_record(io.BytesIO(framed[:-3]))
    middle_first = struct.pack("<II", MAGIC, (2 << 29) | 4) + b"abcd"
    with pytest.raises(DataError, match="continuation flag 2"):
        read_record(io.BytesIO(middle_first))


def test_recordio_header_with_extra_labels():
    header, rest = unpack_record(record_payload(0, b"IMG", extra_labels=[7.0, 3.0]))
    assert header.flag == 2 and header.labels == (7.0, 3.0) and header.primary_label == 7.0 and rest == b"IMG"
    header, rest = unpack_record(record_payload(5, b"IMG"))
    assert header.flag == 0 and header.primary_label == 5.0 and rest == b"IMG"


@pytest.fixture(scope="module")
def rec_dataset(tmp_path_factory):
    """A RecordIO set in insightface layout: record 0 header [6, 9], images 1..5 (one spans parts,
    one is corrupt), identity records 6..8; labels 10, 10, 30, 20, 30."""
    root = tmp_path_factory.mktemp("rec")
    rng = np.random.default_rng(3)
    images = {key: random_image(rng) for key in range(1, 6)}
    labels = {1: 10, 2: 10, 3: 30, 4: 20, 5: 30}
    payloads = {0: record_payload(0, b"", extra_labels=[6.0, 9.0])}
    for key in range(1, 6):
        data = jpeg(images[key])
        if key == 2:   # force a multi-part record: the magic word at an aligned offset inside the data
            data = data + b"\0" * ((-len(data) - 24) % 4) + struct.pack("<I", MAGIC) + b"\0" * 8
        if key == 4:
            data = b"\xff\xd8 not a jpeg"
        payloads[key] = record_payload(0, data, extra_labels=[float(labels[key]), 0.0]) if key == 3 \
            else record_payload(labels[key], data)
    for key in range(6, 9):   # identity records, not images
        payloads[key] = record_payload(0, b"", extra_labels=[1.0, 3.0])
    write_rec(str(root / "train"), payloads)
    return str(root / "train"), images, labels


def test_recordio_index_and_image_keys(rec_dataset):
    prefix, images, labels = rec_dataset
    with IndexedRecordFile(prefix) as records:
        assert records.image_keys == [1, 2, 3, 4, 5]
        assert [records.read_header(k).primary_label for k in range(1, 6)] == [10, 10, 30, 20, 30]
        header, data = unpack_record(records.read(2))
        assert struct.pack("<I", MAGIC) in data   # the multi-part record came back whole


def test_rec_pack_round_trip(rec_dataset, tmp_path):
    prefix, images, labels = rec_dataset
    source = RecordSource(prefix)
    assert source.classes == ["10", "20", "30"]
    clone = pickle.loads(pickle.dumps(source))   # what packing workers receive: no item list
    assert clone.read("2") == source.read("2") and not hasattr(clone, "items")
    summary = pack(source, str(tmp_path / "out"), PackOptions(shard_size=2, progress=False))
    assert [ref for ref, _ in summary.skipped] == ["4"]
    # label 20's only image is the corrupt record 4: the class is left out, labels stay contiguous
    assert [name for name, _ in summary.left_out] == ["20"] and "left out class 20: its only image was skipped" in summary.describe()
    samples, manifest = read_all_samples(str(tmp_path / "out"))
    assert manifest["num_classes"] == 2 and manifest["num_samples"] == 4 and len(manifest["shards"]) == 3
    assert open(tmp_path / "out" / "classes.txt").read().split() == ["10", "30"]
    got = sorted((int(label), pixels.mean()) for pixels, label in samples.values())
    expected = sorted((["10", "30"].index(str(labels[k])), simplejpeg.decode_jpeg(jpeg(images[k])).mean())
                      for k in (1, 2, 3, 5))
    assert [g[0] for g in got] == [e[0] for e in expected]
    np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected])
    assert verify_shards(str(tmp_path / "out")).ok


# ------------------------------------------------------------------------------------------- folders

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """7 classes x 5 images: JPEGs at 112 (kept byte for byte), PNGs at other sizes (resized),
    one unreadable file and one non-image file."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    expected = {}
    for label, name in enumerate(f"person_{k}" for k in range(7)):
        os.makedirs(root / name)
        for index in range(5):
            if index % 2:
                pixels = random_image(rng, 90, 70)
                data = png(pixels)
                path = f"{name}/{index}.png"
            else:
                pixels = random_image(rng)
                data = jpeg(pixels)
                path = f"{name}/{index}.jpg"
            (root / path).write_bytes(data)
            expected[path] = (data, label)
    (root / "person_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "person_0" / "notes.txt").write_text("not an image")
    return str(root), expected


def test_folder_pack_round_trip_every_image_once(image_folder, tmp_path):
    root, expected = image_folder
    out = str(tmp_path / "out")
    summary = pack(FolderSource(root), out, PackOptions(shard_size=8, workers=2, seed=1, progress=False))
    assert summary.num_samples == 35 and summary.num_classes == 7 and summary.num_shards == 5
    assert [ref for ref, _ in summary.skipped] == ["person_0/broken.jpg"]
    samples, manifest = read_all_samples(out)
    assert manifest["format"] == "pfc-shards-1" and manifest["image_size"] == [112, 112]
    assert open(os.path.join(out, "classes.txt")).read().split() == [f"person_{k}" for k in range(7)]
    # Match every packed image to exactly one source image of the same class.
    remaining = dict(expected)
    for pixels, label in samples.values():
        assert pixels.shape == (112, 112, 3)
        match = [path for path, (data, source_label) in remaining.items()
                 if source_label == label and path.endswith(".jpg")
                 and np.array_equal(simplejpeg.decode_jpeg(data), pixels)]
        if not match:   # resized PNGs: compare to the bilinear resize, allowing JPEG error
            match = [path for path, (data, source_label) in remaining.items()
                     if source_label == label and path.endswith(".png")
                     and np.abs(np.asarray(Image.open(io.BytesIO(data)).resize((112, 112), Image.Resampling.BILINEAR),
                                           dtype=float) - pixels).mean() < 3]
        assert len(match) >= 1
        del remaining[match[0]]
    assert not remaining
    # identities spread: the first shard mixes several classes
    first = [label for key, (pixels, label) in samples.items() if int(key) < 8]
    assert len(set(first)) >= 3
    assert verify_shards(out).ok


def test_pack_resumes_after_a_killed_run(image_folder, tmp_path):
    root, _ = image_folder
    out = str(tmp_path / "out")

    class KilledSource(FolderSource):
        reads = 0

        def read(self, ref):
            KilledSource.reads += 1
            if KilledSource.reads == 20:
                raise KeyboardInterrupt   # the run dies in the middle of shard 2
            return super().read(ref)

    options = PackOptions(shard_size=8, workers=1, seed=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        pack(KilledSource(root), out, options)
    leftovers = sorted(os.listdir(out))
    assert "dataset.json" not in leftovers and "shard-000001.tar" in leftovers
    assert any(name.startswith("shard-000002.tar.tmp") for name in leftovers)
    assert pack_shards.main(["verify", out]) == 1   # nothing to verify yet: clear failure

    summary = pack(FolderSource(root), out, options)
    assert summary.shards_kept == 2 and summary.shards_written == 3
    assert not any(".tmp" in name for name in os.listdir(out))
    reference = str(tmp_path / "reference")
    pack(FolderSource(root), reference, options)
    for name in os.listdir(reference):
        if name.endswith(".tar"):
            assert read_all_samples(out)[0].keys() == read_all_samples(reference)[0].keys()
    assert verify_shards(out).ok

    # A different plan into the same directory is refused, not mixed in.
    with pytest.raises(DataError, match="different packing run"):
        pack(FolderSource(root), out, PackOptions(shard_size=8, workers=1, seed=2, progress=False))


def test_verify_reports_damage(image_folder, tmp_path, capsys):
    root, _ = image_folder
    out = str(tmp_path / "out")
    assert pack_shards.main(["folder", root, out, "--shard-size", "10", "--no-progress"]) == 0
    assert pack_shards.main(["verify", out]) == 0
    assert "OK" in capsys.readouterr().out
    shard = os.path.join(out, "shard-000001.tar")
    data = open(shard, "rb").read()
    with open(shard, "wb") as stream:
        stream.write(data[: len(data) // 2])
    with open(os.path.join(out, "dataset.json")) as stream:
        manifest = json.load(stream)
    manifest["num_classes"] = 3   # labels now exceed num_classes
    with open(os.path.join(out, "dataset.json"), "w") as stream:
        json.dump(manifest, stream)
    report = verify_shards(out)
    text = " ".join(report.problems)
    assert not report.ok and "shard-000001.tar" in text and "outside [0, 3)" in text and "classes.txt" in text
    assert pack_shards.main(["verify", out]) == 1


def test_pack_bad_input_errors(tmp_path, image_folder, capsys):
    root, _ = image_folder
    with pytest.raises(DataError, match="does not exist"):
        FolderSource(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty" / "class_a")
    with pytest.raises(DataError, match="has no images"):
        FolderSource(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="has no class sub-folders"):
        FolderSource(str(tmp_path / "empty" / "class_a"))
    with pytest.raises(ConfigError, match="shard size must be at least 1"):
        pack(FolderSource(root), str(tmp_path / "o"), PackOptions(shard_size=0))
    (tmp_path / "lm.csv").write_text("a.jpg,1,2,3\n")
    with pytest.raises(DataError, match="expected a path and 10 coordinates"):
        read_landmarks(str(tmp_path / "lm.csv"))
    with pytest.raises(DataError, match="RecordIO file .* does not exist"):
        RecordSource(str(tmp_path / "nothing"))
    assert pack_shards.main(["rec", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: RecordIO file") and "does not exist" in error and "Traceback" not in error


# ------------------------------------------------------------------------------------------- alignment

def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -5.0])
    matrix = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = rng.uniform(0, 100, (5, 2))
    estimate = similarity_transform(points, points @ matrix.T + shift)
    np.testing.assert_allclose(estimate[:, :2], matrix, atol=1e-9)
    np.testing.assert_allclose(estimate[:, 2], shift, atol=1e-9)
    with pytest.raises(DataError, match="all at one point"):
        similarity_transform(np.ones((5, 2)), TEMPLATE_112)


def _landmark_centroids(pixels: np.ndarray, points: np.ndarray, radius: int = 5) -> np.ndarray:
    """Brightness-weighted centroid of the marker dot near each expected point."""
    gray = pixels.astype(np.float64).mean(axis=2)
    found = []
    for x, y in points:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        patch = gray[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1]
        weights = np.clip(patch - 40, 0, None)
        ys, xs = np.mgrid[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
        found.append([(weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum()])
    return np.array(found)


def test_alignment_maps_synthetic_landmarks_onto_the_template_within_one_pixel(tmp_path):
    """Synthetic faces with marker dots at their five landmarks are packed with --landmarks; in the
    packed 112x112 images the dots sit on the template points within 1 px."""
    from pfc.datasets.synthetic import make_identity, render_sample

    rng = np.random.default_rng(7)
    rows = []
    os.makedirs(tmp_path / "src" / "a")
    for index in range(4):
        image, landmarks = render_sample(make_identity(5, index), rng, size=160)
        # Put the landmarks in a similarity pose of the template so a perfect alignment exists,
        # and mark them with bright dots (sub-pixel positions, anti-aliased).
        angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.9, 1.3)
        matrix = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        landmarks = (TEMPLATE_112 - 56) @ matrix.T + rng.uniform(70, 90, 2)
        canvas = (image * 0.15).astype(np.float64)
        ys, xs = np.mgrid[0:160, 0:160]
        for x, y in landmarks:
            canvas += 255 * np.clip(2.2 - np.hypot(xs - x, ys - y), 0, 1)[..., None]
        (tmp_path / "src" / "a" / f"{index}.png").write_bytes(png(np.clip(canvas, 0, 255).astype(np.uint8)))
        rows.append(f"a/{index}.png," + ",".join(f"{v:.4f}" for v in landmarks.ravel()))
        assert np.abs(apply_transform(similarity_transform(landmarks, TEMPLATE_112), landmarks)
                      - TEMPLATE_112).max() < 1e-6
    (tmp_path / "landmarks.csv").write_text("path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    assert pack_shards.main(["folder", str(tmp_path / "src"), out, "--landmarks", str(tmp_path / "landmarks.csv"),
                             "--no-progress"]) == 0
    samples, _ = read_all_samples(out)
    assert len(samples) == 4
    for pixels, _ in samples.values():
        error = np.hypot(*(_landmark_centroids(pixels, TEMPLATE_112) - TEMPLATE_112).T)
        # The issue asks for 1 px; we measure < 0.1 px, and 0.2 px also catches a half-pixel
        # convention slip in the warp (that one shows as ~0.3 px).
        assert error.max() < 0.2, error


def test_align_face_output_size_and_errors():
    image = Image.fromarray(random_image(np.random.default_rng(0), 200, 180))
    out = align_face(image, TEMPLATE_112 * 1.5, image_size=128)
    assert out.size == (128, 128) and out.mode == "RGB"
    with pytest.raises(DataError, match="5 finite"):
        align_face(image, np.zeros((4, 2)))


def test_shard_writer_writes_what_webdataset_tar_writer_writes():
    """Shards of the packer's own writer and of webdataset's TarWriter(encoder=False, mtime=0) are
    byte-identical, so a set resumed across the change mixes nothing different."""
    import webdataset as wds

    from pfc.datasets.shard_writer import ShardTarWriter

    samples = [{"__key__": f"{k:09d}", "jpg": jpeg(random_image(np.random.default_rng(k), 16, 16)),
                "cls": str(k * 7).encode()} for k in range(3)]
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = ShardTarWriter(ours)
    for sample in samples:
        writer.write(sample)
    writer.close()
    with wds.TarWriter(theirs, encoder=False, mtime=0) as reference:
        for sample in samples:
            reference.write(sample)
    assert ours.getvalue() == theirs.getvalue()


def test_a_landmark_file_that_misses_images_stops_before_packing_or_skips_them_when_asked(tmp_path, capsys):
    """A CSV covering 5 of 40 images: an error naming the coverage, no output folder (not 5 images
    of 2 classes and 35 "unreadable inputs"); with --missing-landmarks skip the 35 are listed as
    images without landmarks, apart from unreadable inputs."""
    from pfc.datasets import write_synthetic

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_synthetic(src, ids=10, per=4, seed=0, landmarks=True, size=48)
    rows = open(os.path.join(src, "landmarks.csv")).read().splitlines()
    os.remove(os.path.join(src, "landmarks.csv"))
    (tmp_path / "lm.csv").write_text("\n".join(rows[:5]) + "\n")
    args = ["folder", src, out, "--landmarks", str(tmp_path / "lm.csv"), "--image-size", "32", "--no-progress"]
    assert pack_shards.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: landmark file {tmp_path / 'lm.csv'} covers 5 of the 40 source images; "
                            f"none for 35 (first: ") and "--missing-landmarks skip" in error
    assert len(error.splitlines()) == 1 and not os.path.exists(out)
    assert pack_shards.main([*args, "--missing-landmarks", "skip"]) == 0
    output = capsys.readouterr().out
    assert "packed 5 images" in output and "skipped 0 unreadable inputs" in output
    assert "left out 35 images without landmarks (missing_landmarks=skip)" in output
