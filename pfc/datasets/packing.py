"""Pack face images into webdataset shards (format "pfc-shards-1", see pfc/manifest.py).

Sources: a class-per-folder tree (:class:`FolderSource`) or insightface RecordIO
(:class:`RecordSource`). :func:`pack` shuffles all samples with a seed (so every shard mixes many
identities), cuts them into shards of ``shard_size``, and writes the shards in parallel. Each shard
goes to a temporary name and is renamed when complete, with a small record of its count and
skipped inputs in ``OUT/.pack/``; a re-run with the same inputs keeps finished shards and redoes
the rest. ``dataset.json`` and ``classes.txt`` are written last.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
from PIL import Image

from pfc.data import manifest as manifest_io
from pfc.datasets.align import align_face
from pfc.datasets.recordio import IndexedRecordFile, unpack_record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
STATE_DIR = ".pack"


@dataclass
class PackOptions:
    """How to pack: shard size, parallelism, shuffle seed, output size, optional alignment."""

    shard_size: int = 10000
    workers: int = 1
    seed: int = 0
    image_size: int = 112
    landmarks: str | None = None   # CSV: relative path (or record key), x1, y1, ..., x5, y5
    quality: int = 95
    progress: bool = True

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {self.shard_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.image_size < 8:
            raise ValueError(f"image size must be at least 8, got {self.image_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {self.quality}")


@dataclass
class PackSummary:
    """What :func:`pack` did; ``skipped`` lists (source reference, reason) of unreadable inputs."""

    out_dir: str
    num_classes: int
    num_samples: int
    num_shards: int
    shards_written: int
    shards_kept: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"packed {self.num_samples} images of {self.num_classes} classes into "
                 f"{self.num_shards} shards in {self.out_dir} ({self.shards_written} written, "
                 f"{self.shards_kept} kept from an earlier run) in {self.seconds:.1f} s",
                 f"skipped {len(self.skipped)} unreadable inputs"]
        lines += [f"  skipped {ref}: {reason}" for ref, reason in self.skipped]
        return "\n".join(lines)


class FolderSource:
    """Images under ``root/<class name>/...``; labels are the sorted class folder names' ranks."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"source folder {root} does not exist")
        self.root = root
        self.classes = sorted(entry.name for entry in os.scandir(root)
                              if entry.is_dir() and not entry.name.startswith("."))
        if not self.classes:
            raise ValueError(f"source folder {root} has no class sub-folders")
        self.items: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            class_dir = os.path.join(root, name)
            for folder, subdirs, files in os.walk(class_dir):
                subdirs.sort()
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        self.items.append((os.path.relpath(os.path.join(folder, file), root), label))
        if not self.items:
            raise ValueError(f"source folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")

    def describe(self) -> str:
        return f"folder:{os.path.abspath(self.root)}"

    def read(self, ref: str) -> bytes:
        with open(os.path.join(self.root, ref), "rb") as stream:
            return stream.read()

    def __getstate__(self):
        # Packing workers only read; the item list (millions of entries) stays in the parent.
        return {"root": self.root}


class RecordSource:
    """Images in ``PREFIX.rec``/``PREFIX.idx``; class k is the k-th smallest distinct RecordIO label.

    References are record keys as decimal strings (also the key in a landmark file).
    """

    def __init__(self, prefix: str, progress: bool = False):
        self.prefix = prefix
        with IndexedRecordFile(prefix) as records:
            keys = records.image_keys
            if not keys:
                raise ValueError(f"{prefix}.rec holds no image records")
            raw = []
            for key in _progress(keys, progress, "reading record headers"):
                label = records.read_header(key).primary_label
                if not np.isfinite(label) or label != int(label) or label < 0:
                    raise ValueError(f"record {key} of {prefix}.rec has label {label}, "
                                     f"not a non-negative integer")
                raw.append(int(label))
        distinct = sorted(set(raw))
        rank = {value: index for index, value in enumerate(distinct)}
        self.classes = [str(value) for value in distinct]
        self.items = [(str(key), rank[value]) for key, value in zip(keys, raw)]
        self._records: IndexedRecordFile | None = None

    def describe(self) -> str:
        return f"recordio:{os.path.abspath(self.prefix)}"

    def read(self, ref: str) -> bytes:
        if self._records is None:   # opened lazily: one file handle per worker process
            self._records = IndexedRecordFile(self.prefix)
        return unpack_record(self._records.read(int(ref)))[1]

    def __getstate__(self):
        # Packing workers only read: no item list, no open file handle.
        return {"prefix": self.prefix, "_records": None}


def _progress(iterable, enabled: bool, description: str, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=description, total=total, unit="img", smoothing=0.05)


def read_landmarks(path: str) -> dict[str, np.ndarray]:
    """Parse a landmark CSV: ``relative_path, x1, y1, ..., x5, y5`` per line (a header line is allowed)."""
    if not os.path.isfile(path):
        raise ValueError(f"landmark file {path} does not exist")
    points: dict[str, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8") as stream:
        for number, row in enumerate(csv.reader(stream), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 11:
                raise ValueError(f"{path}:{number}: expected a path and 10 coordinates, got {len(row)} fields")
            try:
                values = np.array([float(v) for v in row[1:]], dtype=np.float64).reshape(5, 2)
            except ValueError:
                if number == 1:
                    continue   # header line
                raise ValueError(f"{path}:{number}: coordinates must be numbers, got {row[1:]}") from None
            points[os.path.normpath(row[0].strip())] = values
    if not points:
        raise ValueError(f"landmark file {path} holds no landmarks")
    return points


def prepare_image(data: bytes, image_size: int, landmarks: np.ndarray | None, quality: int) -> bytes:
    """JPEG bytes of the aligned (with ``landmarks``) or resized ``image_size`` square RGB face.

    A JPEG that already decodes to ``image_size`` x ``image_size`` and needs no alignment is kept
    byte for byte (no re-encoding loss). Raises on undecodable input.
    """
    if landmarks is None and data[:2] == b"\xff\xd8":
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pixels = None   # let PIL try (it reads some files libjpeg-turbo's strict mode refuses)
        if pixels is not None and pixels.shape[:2] == (image_size, image_size):
            return data
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        image = source.convert("RGB")
    if landmarks is not None:
        image = align_face(image, landmarks, image_size)
    elif image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return simplejpeg.encode_jpeg(np.ascontiguousarray(np.asarray(image)), quality=quality,
                                  colorspace="RGB")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _plan_fingerprint(source, options: PackOptions, landmark_digest: str) -> str:
    plan = {"format": manifest_io.FORMAT, "source": source.describe(), "items": len(source.items),
            "classes": len(source.classes), "seed": options.seed, "shard_size": options.shard_size,
            "image_size": options.image_size, "landmarks": landmark_digest, "quality": options.quality}
    digest = hashlib.sha256()
    digest.update(json.dumps(plan, sort_keys=True).encode())
    for ref, label in source.items:
        digest.update(f"{ref}\t{label}\n".encode())
    return digest.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _pack_shard(task) -> dict:
    """Worker: write one shard to a temporary name, rename it, then record its count and skips."""
    import webdataset as wds

    source, out_dir, name, entries, image_size, landmarks, quality = task
    final = os.path.join(out_dir, name)
    temporary = f"{final}.tmp{os.getpid()}"
    skipped = []
    count = 0
    with open(temporary, "wb") as stream:
        # An integer mtime keeps tarfile from adding a PAX header to every member (a float mtime
        # does), which halves the header parsing the loader pays per sample; fixed, so that the
        # same inputs give byte-identical shards.
        with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
            for key, ref, label in entries:
                points = None
                if landmarks is not None:
                    points = landmarks.get(os.path.normpath(ref))
                    if points is None:
                        skipped.append((ref, "no landmarks for this image"))
                        continue
                try:
                    jpeg = prepare_image(source.read(ref), image_size, points, quality)
                except Exception as exc:   # unreadable input: skipped and listed, never fatal
                    skipped.append((ref, f"{type(exc).__name__}: {exc}"))
                    continue
                writer.write({"__key__": key, "jpg": jpeg, "cls": str(label).encode()})
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, final)
    record = {"name": name, "num_samples": count, "skipped": skipped}
    _write_atomic(os.path.join(out_dir, STATE_DIR, name + ".json"), json.dumps(record).encode())
    return {"record": record, "attempted": len(entries)}


def pack(source, out_dir: str, options: PackOptions | None = None) -> PackSummary:
    """Write ``source`` (FolderSource or RecordSource) as shards + ``dataset.json`` into ``out_dir``.

    Re-running on the same inputs and options resumes: finished shards are kept, partial ones redone.
    Raises ValueError when ``out_dir`` holds shards of a different packing plan.
    """
    options = options or PackOptions()
    options.validate()
    started = time.perf_counter()
    landmarks = None
    landmark_digest = ""
    if options.landmarks:
        landmarks = read_landmarks(options.landmarks)
        with open(options.landmarks, "rb") as stream:
            landmark_digest = hashlib.sha256(stream.read()).hexdigest()
    fingerprint = _plan_fingerprint(source, options, landmark_digest)

    state_dir = os.path.join(out_dir, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    plan_path = os.path.join(state_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as stream:
            previous = json.load(stream).get("fingerprint")
        if previous != fingerprint:
            raise ValueError(f"{out_dir} holds shards of a different packing run (other source, seed, "
                             f"shard size, image size or landmarks); pack into an empty directory")
    else:
        stray = [name for name in os.listdir(out_dir) if name.endswith(".tar") or name == manifest_io.MANIFEST_NAME]
        if stray:
            raise ValueError(f"{out_dir} already holds {stray[0]} from an unknown run; pack into an empty directory")
        _write_atomic(plan_path, json.dumps({"fingerprint": fingerprint}).encode())

    order = np.random.default_rng(options.seed).permutation(len(source.items))
    num_shards = (len(order) + options.shard_size - 1) // options.shard_size
    key_width = max(9, len(str(len(order))))
    tasks, kept = [], {}
    for index in range(num_shards):
        name = shard_name(index)
        for leftover in os.listdir(out_dir):
            if leftover.startswith(name + ".tmp"):
                os.remove(os.path.join(out_dir, leftover))   # half-written by a killed run
        record_path = os.path.join(state_dir, name + ".json")
        if os.path.exists(os.path.join(out_dir, name)) and os.path.exists(record_path):
            with open(record_path) as stream:
                kept[name] = json.load(stream)
            continue
        positions = order[index * options.shard_size:(index + 1) * options.shard_size]
        entries = [(f"{position:0{key_width}d}", *source.items[item])
                   for position, item in zip(range(index * options.shard_size, len(order)), positions)]
        subset = None
        if landmarks is not None:
            subset = {os.path.normpath(ref): landmarks[os.path.normpath(ref)]
                      for _, ref, _ in entries if os.path.normpath(ref) in landmarks}
        tasks.append((source, out_dir, name, entries, options.image_size, subset, options.quality))

    records = dict(kept)
    progress = None
    if options.progress:
        from tqdm import tqdm
        progress = tqdm(total=sum(len(task[3]) for task in tasks), desc="packing", unit="img")
    if tasks:
        if options.workers == 1:
            results = map(_pack_shard, tasks)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(min(options.workers, len(tasks)))
            results = pool.imap_unordered(_pack_shard, tasks)
        try:
            for result in results:
                records[result["record"]["name"]] = result["record"]
                if progress is not None:
                    progress.update(result["attempted"])
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    if progress is not None:
        progress.close()

    shards = [{"name": shard_name(i), "num_samples": records[shard_name(i)]["num_samples"]}
              for i in range(num_shards)]
    total = sum(shard["num_samples"] for shard in shards)
    if total == 0:
        raise ValueError(f"none of the {len(source.items)} source images could be packed "
                         f"(first problem: {records[shard_name(0)]['skipped'][:1]})")
    manifest = {"format": manifest_io.FORMAT, "num_classes": len(source.classes), "num_samples": total,
                "image_size": [options.image_size, options.image_size], "shards": shards,
                "source": source.describe()}
    _write_atomic(os.path.join(out_dir, manifest_io.CLASSES_NAME),
                  "".join(f"{name}\n" for name in source.classes).encode())
    _write_atomic(os.path.join(out_dir, manifest_io.MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    skipped = [tuple(item) for i in range(num_shards) for item in records[shard_name(i)]["skipped"]]
    return PackSummary(out_dir=out_dir, num_classes=len(source.classes), num_samples=total,
                       num_shards=num_shards, shards_written=len(tasks), shards_kept=len(kept),
                       skipped=skipped, seconds=time.perf_counter() - started)


@dataclass
class VerifyReport:
    """Result of :func:`verify_shards`; ``problems`` is empty when everything matches the manifest."""

    num_samples: int = 0
    num_classes: int = 0
    num_shards: int = 0
    images_per_class_min: int = 0
    images_per_class_max: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        lines = [f"{self.num_shards} shards, {self.num_samples} samples, {self.num_classes} classes "
                 f"({self.images_per_class_min}..{self.images_per_class_max} images per class)"]
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problems")
        return "\n".join(lines)


def verify_shards(out_dir: str, max_problems: int = 1000) -> VerifyReport:
    """Read every sample of the shard set in ``out_dir``: JPEG decodes to the manifest's image size
    (same decoder as the loader), label is an integer in [0, num_classes), every key has exactly one
    ``.jpg`` and one ``.cls``, keys are unique, and per-shard / total counts and ``classes.txt`` match
    the manifest. Problems are collected (up to ``max_problems``), not raised."""
    import tarfile

    report = VerifyReport()
    try:
        manifest = manifest_io.read_manifest(out_dir)
        urls = manifest_io.shard_urls(out_dir, manifest, check_exists=False)
    except ValueError as exc:
        report.problems.append(str(exc))
        return report
    report.num_classes = manifest["num_classes"]
    report.num_shards = len(urls)
    height, width = manifest["image_size"]
    per_class = np.zeros(manifest["num_classes"], dtype=np.int64)
    seen_keys: set[str] = set()

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    classes_path = os.path.join(out_dir, manifest_io.CLASSES_NAME)
    if not os.path.isfile(classes_path):
        problem(f"{classes_path} is missing")
    else:
        with open(classes_path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
        if len(lines) != manifest["num_classes"]:
            problem(f"classes.txt has {len(lines)} lines but num_classes is {manifest['num_classes']}")

    for shard, url in zip(manifest["shards"], urls):
        name = shard["name"]
        if not os.path.isfile(url):
            problem(f"{name}: shard file is missing")
            continue
        members: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(url, "r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, _, extension = member.name.partition(".")
                    payload = archive.extractfile(member).read()
                    if extension in members.setdefault(key, {}):
                        problem(f"{name}: key {key} has two .{extension} members")
                    members[key][extension] = payload
        except (tarfile.TarError, OSError, EOFError) as exc:
            problem(f"{name}: unreadable tar ({type(exc).__name__}: {exc})")
        good = 0
        for key, files in members.items():
            if key in seen_keys:
                problem(f"{name}: key {key} appears in more than one place")
            seen_keys.add(key)
            if set(files) != {"jpg", "cls"}:
                problem(f"{name}: key {key} has members {sorted(files)}, expected jpg and cls")
                continue
            try:
                label = int(files["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                problem(f"{name}: key {key} has label {files['cls'][:20]!r}, not an integer")
                continue
            if not 0 <= label < manifest["num_classes"]:
                problem(f"{name}: key {key} has label {label} outside [0, {manifest['num_classes']})")
                continue
            try:
                pixels = simplejpeg.decode_jpeg(files["jpg"], colorspace="RGB")
            except ValueError as exc:
                problem(f"{name}: key {key} does not decode ({exc})")
                continue
            if pixels.shape[:2] != (height, width):
                problem(f"{name}: key {key} is {pixels.shape[1]}x{pixels.shape[0]}, expected {width}x{height}")
                continue
            per_class[label] += 1
            good += 1
        if good != shard["num_samples"]:
            problem(f"{name}: {good} good samples but the manifest says {shard['num_samples']}")
        report.num_samples += good
    if report.num_samples != manifest["num_samples"]:
        problem(f"{report.num_samples} good samples in all shards but the manifest says {manifest['num_samples']}")
    report.images_per_class_min = int(per_class.min())
    report.images_per_class_max = int(per_class.max())
    return report
