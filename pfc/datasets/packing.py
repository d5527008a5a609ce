"""Pack face images into webdataset shards (format "pfc-shards-1", see :mod:`pfc.data.manifest`).

    summary = pack(FolderSource("faces/"), "data/shards", PackOptions(workers=8))
    print(summary.describe())

Sources (:mod:`pfc.datasets.sources`): a class-per-folder tree or insightface RecordIO.
:func:`pack` shuffles all samples with a seed (so every shard mixes many identities), cuts them
into shards of ``shard_size``, and writes the shards in parallel. Each shard goes to a temporary
name and is renamed when complete, with a small record of its count and skipped inputs in
``OUT/.pack/``; a re-run with the same inputs keeps finished shards and redoes the rest.
``dataset.json`` and ``classes.txt`` are written last, then the per-sample index
(:mod:`pfc.datasets.indexing`) beside them. Unreadable input images are skipped and
listed; a class left with no packed image is listed and left out of the label space (labels stay
contiguous, ``classes.txt`` line k names label k). One packer at a time writes an output folder
(a lock, :mod:`pfc.datasets.outdir`). Options that cannot be used and an output folder inside the
source raise :class:`pfc.errors.ConfigError`; an output folder another packer is writing, one of
another packing run, or inputs that give no image at all raise :class:`pfc.errors.DataError`.

Alignment (``landmarks``, a CSV): a source image without a landmark row is a DataError before
anything is written (``missing_landmarks="error"``, naming how many of the images the file covers),
or is left out and listed apart from the unreadable inputs (``"skip"``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import simplejpeg
from PIL import Image

from pfc.data import manifest as manifest_io
from pfc.datasets.align import align_face
from pfc.datasets.indexing import build_index
from pfc.datasets.outdir import STATE_DIR, claim_output, output_lock, refuse_output_inside
from pfc.datasets.shard_writer import shard_name, shard_writer
from pfc.datasets.sources import read_landmarks
from pfc.errors import ConfigError, DataError
from pfc.files import write_atomic

MissingLandmarks = Literal["error", "skip"]
NO_LANDMARKS = "no landmarks for this image"   # the skip reason of an image the landmark file lacks


@dataclass
class PackOptions:
    """How to pack: shard size, parallelism, shuffle seed, output size, optional alignment."""

    shard_size: int = 10000
    workers: int = 1
    seed: int = 0
    image_size: int = 112
    landmarks: str | None = None   # CSV: relative path (or record key), x1, y1, ..., x5, y5
    missing_landmarks: MissingLandmarks = "error"   # a source image without a landmark row
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
        if self.missing_landmarks not in get_args(MissingLandmarks):
            raise ConfigError(f"missing_landmarks must be one of {', '.join(get_args(MissingLandmarks))}, "
                              f"got {self.missing_landmarks!r}")


@dataclass
class PackSummary:
    """What :func:`pack` did. ``skipped`` lists (source reference, reason) of the inputs not packed
    (unreadable ones; with ``missing_landmarks="skip"`` also those without landmarks, reason
    :data:`NO_LANDMARKS`),
    ``left_out`` (class name, reason) of the classes without a packed image (not in the label
    space), ``ignored`` (path, reason) of the source links not followed."""

    out_dir: str
    num_classes: int
    num_samples: int
    num_shards: int
    shards_written: int
    shards_kept: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        unaligned = [ref for ref, reason in self.skipped if reason == NO_LANDMARKS]
        unreadable = [(ref, reason) for ref, reason in self.skipped if reason != NO_LANDMARKS]
        lines = [f"packed {self.num_samples} images of {self.num_classes} classes into "
                 f"{self.num_shards} shards in {self.out_dir} ({self.shards_written} written, "
                 f"{self.shards_kept} kept from an earlier run) in {self.seconds:.1f} s",
                 f"skipped {len(unreadable)} unreadable inputs"]
        lines += [f"  skipped {ref}: {reason}" for ref, reason in unreadable]
        if unaligned:
            lines.append(f"left out {len(unaligned)} images without landmarks (missing_landmarks=skip)")
            lines += [f"  no landmarks: {ref}" for ref in unaligned]
        if self.left_out:
            lines.append(f"left out {len(self.left_out)} classes without a packed image (not in the label "
                         f"space, not in classes.txt)")
            lines += [f"  left out class {name}: {reason}" for name, reason in self.left_out]
        if self.ignored:
            lines.append(f"did not follow {len(self.ignored)} links of the source")
            lines += [f"  ignored {path}: {reason}" for path, reason in self.ignored]
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


def _plan_fingerprint(source, options: PackOptions, landmark_digest: str) -> str:
    plan = {"format": manifest_io.FORMAT, "source": source.describe(), "items": len(source.items),
            "classes": len(source.classes), "seed": options.seed, "shard_size": options.shard_size,
            "image_size": options.image_size, "landmarks": landmark_digest, "quality": options.quality}
    digest = hashlib.sha256()
    digest.update(json.dumps(plan, sort_keys=True).encode())
    for ref, label in source.items:
        digest.update(f"{ref}\t{label}\n".encode())
    return digest.hexdigest()


def _pack_shard(task) -> dict:
    """Worker: write one shard to a temporary name, rename it, then record its count and skips."""
    source, out_dir, name, entries, image_size, landmarks, quality = task
    final = os.path.join(out_dir, name)
    skipped = []
    count = 0
    with shard_writer(final) as writer:
        for key, ref, label in entries:
            points = None
            if landmarks is not None:
                points = landmarks.get(os.path.normpath(ref))
                if points is None:
                    skipped.append((ref, NO_LANDMARKS))
                    continue
            try:
                jpeg = prepare_image(source.read(ref), image_size, points, quality)
            except Exception as exc:   # unreadable input: skipped and listed, never fatal
                skipped.append((ref, f"{type(exc).__name__}: {exc}"))
                continue
            writer.write({"__key__": key, "jpg": jpeg, "cls": str(label).encode()})
            count += 1
    record = {"name": name, "num_samples": count, "skipped": skipped}
    write_atomic(os.path.join(out_dir, STATE_DIR, name + ".json"), json.dumps(record).encode())
    return {"record": record, "attempted": len(entries)}


def pack(source, out_dir: str, options: PackOptions | None = None) -> PackSummary:
    """Write ``source`` (FolderSource or RecordSource) as shards + ``dataset.json`` into ``out_dir``.

    Re-running on the same inputs and options resumes: finished shards are kept, partial ones redone.
    Labels are contiguous over the classes with at least one packed image; a class whose images
    all fail to read is left out (its label space slot closed by relabelling the shards) and listed
    in the summary, as are the source's empty classes. Raises ConfigError for unusable ``options``
    or an ``out_dir`` inside the source folder, DataError when another packer is writing
    ``out_dir``, it holds shards of a different packing plan, or no image could be packed.
    """
    options = options or PackOptions()
    options.validate()
    refuse_output_inside(out_dir, getattr(source, "read_folders", ()))
    started = time.perf_counter()
    landmarks = _read_landmarks(source, options)   # before the lock: a bad file leaves no folder behind
    with output_lock(out_dir):
        summary = _pack_locked(source, out_dir, options, landmarks)
    summary.seconds = time.perf_counter() - started
    return summary


def _read_landmarks(source, options: PackOptions) -> tuple[dict | None, str]:
    """(landmarks by normalised source reference, sha256 of the file), or (None, "") without
    alignment. DataError when ``options.missing_landmarks`` is "error" and a source image has no
    row, naming how many the file covers and the first ones it lacks."""
    if not options.landmarks:
        return None, ""
    landmarks = read_landmarks(options.landmarks)
    with open(options.landmarks, "rb") as stream:
        digest = hashlib.sha256(stream.read()).hexdigest()
    if options.missing_landmarks == "error":
        missing = [ref for ref, _ in source.items if os.path.normpath(ref) not in landmarks]
        if missing:
            total = len(source.items)
            raise DataError(f"landmark file {options.landmarks} covers {total - len(missing)} of the {total} "
                            f"source images; none for {len(missing)} (first: {', '.join(missing[:3])}). Give "
                            f"every image a row, or leave those images out with --missing-landmarks skip")
    return landmarks, digest


def _pack_locked(source, out_dir: str, options: PackOptions, landmark_file: tuple[dict | None, str]) -> PackSummary:
    """:func:`pack` once the output folder is locked; ``landmark_file`` from :func:`_read_landmarks`."""
    landmarks, landmark_digest = landmark_file
    claim_output(out_dir, _plan_fingerprint(source, options, landmark_digest))
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
    skipped = [tuple(item) for i in range(num_shards) for item in records[shard_name(i)]["skipped"]]
    new_labels, lost = _close_label_gaps(source, skipped)
    if lost:
        _relabel_shards(source, out_dir, num_shards, new_labels, order, options)
    classes = [name for name, label in zip(source.classes, new_labels) if label >= 0]
    manifest = {"format": manifest_io.FORMAT, "num_classes": len(classes), "num_samples": total,
                "image_size": [options.image_size, options.image_size], "shards": shards,
                "source": source.describe()}
    write_atomic(os.path.join(out_dir, manifest_io.CLASSES_NAME), "".join(f"{name}\n" for name in classes).encode())
    write_atomic(os.path.join(out_dir, manifest_io.MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    build_index(out_dir, options.workers)   # beside dataset.json: the P×K sampler reads samples by offset
    left_out = sorted([(name, "no images") for name in getattr(source, "empty_classes", [])] + lost)
    return PackSummary(out_dir=out_dir, num_classes=len(classes), num_samples=total,
                       num_shards=num_shards, shards_written=len(tasks), shards_kept=len(kept),
                       skipped=skipped, left_out=left_out, ignored=list(getattr(source, "ignored", [])))


def _close_label_gaps(source, skipped: list[tuple[str, str]]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(final label of each source label, -1 for a class none of whose images was packed; those
    classes as (name, reason)). Without skipped inputs every class keeps its label."""
    identity = np.arange(len(source.classes), dtype=np.int64)
    if not skipped:
        return identity, []
    skipped_refs = {ref for ref, _ in skipped}
    images = np.zeros(len(source.classes), dtype=np.int64)
    failed = np.zeros(len(source.classes), dtype=np.int64)
    for ref, label in source.items:
        images[label] += 1
        if ref in skipped_refs:
            failed[label] += 1
    lost = images == failed
    if not lost.any():
        return identity, []
    new_labels = np.where(lost, -1, np.cumsum(~lost) - 1)
    reasons = [(source.classes[label], "its only image was skipped" if images[label] == 1 else
                f"all its {images[label]} images were skipped") for label in np.flatnonzero(lost)]
    return new_labels, reasons


def _relabel_shards(source, out_dir: str, num_shards: int, new_labels: np.ndarray, order: np.ndarray,
                    options: PackOptions) -> None:
    """Rewrite the shards' labels to ``new_labels`` of the source labels (in parallel like the
    packing). Each sample's label comes from the plan (its key is its position in ``order``), not
    from the shard, so this is idempotent: a run killed while relabelling is finished by the next."""
    source_labels = np.fromiter((label for _, label in source.items), dtype=np.int64, count=len(source.items))
    final = new_labels[source_labels[order]].astype(np.int32)
    size = options.shard_size
    tasks = [(os.path.join(out_dir, shard_name(i)), i * size, final[i * size:(i + 1) * size].copy())
             for i in range(num_shards)]
    with _results(_relabel_shard, tasks, options.workers) as results:
        for _ in results:
            pass


def _relabel_shard(task) -> bool:
    """Worker: rewrite one shard with the labels ``labels[key - first]``; False when it already
    had them (nothing written)."""
    path, first, labels = task
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            if member.isfile():
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    changed = False
    for key, files in samples.items():
        label = str(int(labels[int(key) - first])).encode()
        changed = changed or files.get("cls") != label
        files["cls"] = label
    if changed:
        with shard_writer(path) as writer:
            for key, files in samples.items():
                writer.write({"__key__": key, "jpg": files["jpg"], "cls": files["cls"]})
    return changed
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
    """Write the shards of ``tasks``; returns {shard name: record}."""
    records: dict[str, dict] = {}
    if not tasks:
        return records
    progress = None
    if options.progress:
        from tqdm import tqdm
        progress = tqdm(total=sum(len(task[3]) for task in tasks), desc="packing", unit="img")
    try:
        with _results(_pack_shard, tasks, options.workers) as results:
            for result in results:
                records[result["record"]["name"]] = result["record"]
                if progress is not None:
                    progress.update(result["attempted"])
    finally:
        if progress is not None:
            progress.close()
    return records


@contextlib.contextmanager
def _results(function, tasks: list[tuple], workers: int):
    """An iterator of ``function(task)`` over ``tasks`` (in completion order), run in ``workers``
    spawned processes when more than one; the processes end with the block."""
    if workers == 1 or len(tasks) < 2:
        yield map(function, tasks)
        return
    pool = mp.get_context("spawn").Pool(min(workers, len(tasks)))
    try:
        yield pool.imap_unordered(function, tasks)
    finally:
        pool.terminate()
        pool.join()
