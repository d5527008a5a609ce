"""Pack face images into webdataset shards (format "pfc-shards-1", see :mod:`pfc.data.manifest`).

    summary = pack(FolderSource("faces/"), "data/shards", PackOptions(workers=8))
    print(summary.describe())

Sources (:mod:`pfc.datasets.sources`): a class-per-folder tree or insightface RecordIO.
:func:`pack` shuffles all samples with a seed (so every shard mixes many identities), cuts them
into shards of ``shard_size``, and writes the shards in parallel. Each shard goes to a temporary
name and is renamed when complete, with a small record of its count and skipped inputs in
``OUT/.pack/``; a re-run with the same inputs keeps finished shards and redoes the rest.
``dataset.json`` and ``classes.txt`` are written last. Unreadable input images are skipped and
listed; options that cannot be used raise :class:`pfc.errors.ConfigError`, an output folder of
another packing run or inputs that give no image at all raise :class:`pfc.errors.DataError`.
"""
from __future__ import annotations

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
from pfc.datasets.sources import read_landmarks
from pfc.errors import ConfigError, DataError

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
        """ConfigError naming the first option that cannot be used."""
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be at least 1, got {self.shard_size}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.image_size < 8:
            raise ConfigError(f"image size must be at least 8, got {self.image_size}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"JPEG quality must be in [1, 100], got {self.quality}")


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
    Raises DataError when ``out_dir`` holds shards of a different packing plan or no image could be
    packed, ConfigError for unusable ``options``.
    """
    options = options or PackOptions()
    options.validate()
    started = time.perf_counter()
    landmarks, landmark_digest = None, ""
    if options.landmarks:
        landmarks = read_landmarks(options.landmarks)
        with open(options.landmarks, "rb") as stream:
            landmark_digest = hashlib.sha256(stream.read()).hexdigest()
    _claim_output(out_dir, _plan_fingerprint(source, options, landmark_digest))
    order = np.random.default_rng(options.seed).permutation(len(source.items))
    num_shards = (len(order) + options.shard_size - 1) // options.shard_size
    tasks, kept = _shard_tasks(source, out_dir, options, landmarks, order)
    records = {**kept, **_run_tasks(tasks, options)}
    shards = [{"name": shard_name(i), "num_samples": records[shard_name(i)]["num_samples"]}
              for i in range(num_shards)]
    total = sum(shard["num_samples"] for shard in shards)
    if total == 0:
        raise DataError(f"none of the {len(source.items)} source images could be packed "
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


def _claim_output(out_dir: str, fingerprint: str) -> None:
    """Make ``out_dir`` this packing plan's: new (the plan is recorded) or of the same plan (a
    re-run); DataError when it holds shards of another plan or of an unknown run."""
    state_dir = os.path.join(out_dir, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    plan_path = os.path.join(state_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as stream:
            previous = json.load(stream).get("fingerprint")
        if previous != fingerprint:
            raise DataError(f"{out_dir} holds shards of a different packing run (other source, seed, "
                            f"shard size, image size or landmarks); pack into an empty directory")
        return
    stray = [name for name in os.listdir(out_dir) if name.endswith(".tar") or name == manifest_io.MANIFEST_NAME]
    if stray:
        raise DataError(f"{out_dir} already holds {stray[0]} from an unknown run; pack into an empty directory")
    _write_atomic(plan_path, json.dumps({"fingerprint": fingerprint}).encode())


def _shard_tasks(source, out_dir: str, options: PackOptions, landmarks: dict | None,
                 order: np.ndarray) -> tuple[list[tuple], dict[str, dict]]:
    """(tasks for :func:`_pack_shard` of the shards still to write, {name: record} of the shards
    an earlier run finished); removes half-written shards of a killed run."""
    state_dir = os.path.join(out_dir, STATE_DIR)
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
    return tasks, kept


def _run_tasks(tasks: list[tuple], options: PackOptions) -> dict[str, dict]:
    """Write the shards of ``tasks`` (in ``options.workers`` spawned processes when more than one);
    returns {shard name: record}."""
    records: dict[str, dict] = {}
    if not tasks:
        return records
    progress = None
    if options.progress:
        from tqdm import tqdm
        progress = tqdm(total=sum(len(task[3]) for task in tasks), desc="packing", unit="img")
    pool = None
    if options.workers == 1:
        results = map(_pack_shard, tasks)
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
    return records
