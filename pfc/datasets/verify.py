"""Check a packed shard set against its manifest: every sample read, decoded and counted.

    report = verify_shards("data/shards")
    print(report.describe())            # counts, each problem on a line, OK / FAILED
    report.ok                           # True when nothing disagrees with dataset.json

Shards are read with ``tarfile`` (independent of the loader's own tar reader) and JPEGs decoded
with the loader's decoder, so what passes here is what the loader reads.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
import simplejpeg

from pfc.data import manifest as manifest_io
from pfc.datasets.indexing import check_index
from pfc.errors import DataError


@dataclass
class VerifyReport:
    """Result of :func:`verify_shards`; ``problems`` is empty when everything matches the manifest."""

    num_samples: int = 0
    num_classes: int = 0
    num_shards: int = 0
    images_per_class_min: int = 0
    images_per_class_max: int = 0
    problems: list[str] = field(default_factory=list)
    index: str = ""
    """the per-sample index's status (absent, matches the shards, or what is wrong)"""
    max_problems: int = field(default=1000, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        """Record one problem (the first ``max_problems`` are kept)."""
        if len(self.problems) < self.max_problems:
            self.problems.append(text)

    def describe(self) -> str:
        lines = [f"{self.num_shards} shards, {self.num_samples} samples, {self.num_classes} classes "
                 f"({self.images_per_class_min}..{self.images_per_class_max} images per class)"]
        if self.index:
            lines.append(self.index)
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problems")
        return "\n".join(lines)


def verify_shards(out_dir: str, max_problems: int = 1000) -> VerifyReport:
    """Read every sample of the shard set in ``out_dir``: JPEG decodes to the manifest's image size
    (same decoder as the loader), label is an integer in [0, num_classes), every key has exactly one
    ``.jpg`` and one ``.cls``, keys are unique, per-shard / total counts and ``classes.txt`` match
    the manifest, every class has a good sample, and the per-sample index (when there is one)
    is not stale, matches its checksums and equals a fresh scan of the shards. Problems are collected (up to
    ``max_problems``), not raised."""
    report = VerifyReport(max_problems=max_problems)
    try:
        manifest = manifest_io.read_manifest(out_dir)
        urls = manifest_io.shard_urls(out_dir, manifest, check_exists=False)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    report.num_classes = manifest["num_classes"]
    report.num_shards = len(urls)
    per_class = np.zeros(manifest["num_classes"], dtype=np.int64)
    seen_keys: set[str] = set()
    _check_classes_file(os.path.join(out_dir, manifest_io.CLASSES_NAME), manifest["num_classes"], report)
    for shard, url in zip(manifest["shards"], urls):
        name = shard["name"]
        if not os.path.isfile(url):
            report.problem(f"{name}: shard file is missing")
            continue
        good = 0
        for key, files in _read_members(url, name, report).items():
            if key in seen_keys:
                report.problem(f"{name}: key {key} appears in more than one place")
            seen_keys.add(key)
            label = _check_sample(name, key, files, manifest, report)
            if label is not None:
                per_class[label] += 1
                good += 1
        if good != shard["num_samples"]:
            report.problem(f"{name}: {good} good samples but the manifest says {shard['num_samples']}")
        report.num_samples += good
    if report.num_samples != manifest["num_samples"]:
        report.problem(f"{report.num_samples} good samples in all shards but the manifest says "
                       f"{manifest['num_samples']}")
    _check_no_empty_class(per_class, os.path.join(out_dir, manifest_io.CLASSES_NAME), report)
    report.images_per_class_min = int(per_class.min())
    report.images_per_class_max = int(per_class.max())
    report.index, problems = check_index(out_dir)
    for problem in problems:
        report.problem(problem)
    return report


def _check_classes_file(path: str, num_classes: int, report: VerifyReport) -> None:
    """``classes.txt`` exists and has one line per class."""
    if not os.path.isfile(path):
        report.problem(f"{path} is missing")
        return
    with open(path, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    if len(lines) != num_classes:
        report.problem(f"classes.txt has {len(lines)} lines but num_classes is {num_classes}")


def _check_no_empty_class(per_class: np.ndarray, classes_path: str, report: VerifyReport) -> None:
    """Every label in [0, num_classes) has a good sample (an empty class is a packing mistake: the
    packer leaves such classes out of the label space)."""
    empty = np.flatnonzero(per_class == 0)
    if not len(empty):
        return
    names = []
    if os.path.isfile(classes_path):
        with open(classes_path, encoding="utf-8") as stream:
            names = stream.read().splitlines()
    for label in empty:
        name = f" ({names[label]})" if label < len(names) else ""
        report.problem(f"class {label}{name} has no good sample; repack with tools/pack_shards.py, "
                       f"which leaves empty classes out")


def _read_members(url: str, name: str, report: VerifyReport) -> dict[str, dict[str, bytes]]:
    """{key: {extension: payload}} of the regular files of one shard; a damaged tar is reported
    and what was read before the damage is kept."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(url, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                payload = archive.extractfile(member).read()
                if extension in members.setdefault(key, {}):
                    report.problem(f"{name}: key {key} has two .{extension} members")
                members[key][extension] = payload
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.problem(f"{name}: unreadable tar ({type(exc).__name__}: {exc})")
    return members


def _check_sample(name: str, key: str, files: dict[str, bytes], manifest: dict, report: VerifyReport) -> int | None:
    """The label of a good sample (jpg + cls, integer label in range, decodes at the manifest's
    size), or None after reporting what is wrong with it."""
    if set(files) != {"jpg", "cls"}:
        report.problem(f"{name}: key {key} has members {sorted(files)}, expected jpg and cls")
        return None
    try:
        label = int(files["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        report.problem(f"{name}: key {key} has label {files['cls'][:20]!r}, not an integer")
        return None
    if not 0 <= label < manifest["num_classes"]:
        report.problem(f"{name}: key {key} has label {label} outside [0, {manifest['num_classes']})")
        return None
    height, width = manifest["image_size"]
    try:
        pixels = simplejpeg.decode_jpeg(files["jpg"], colorspace="RGB")
    except ValueError as exc:
        report.problem(f"{name}: key {key} does not decode ({exc})")
        return None
    if pixels.shape[:2] != (height, width):
        report.problem(f"{name}: key {key} is {pixels.shape[1]}x{pixels.shape[0]}, expected {width}x{height}")
        return None
    return label
