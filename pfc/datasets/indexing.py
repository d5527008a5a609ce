"""Build and check the per-sample index of a shard set (format: :mod:`pfc.data.sample_index`).

    rows, problems = build_index("data/shards", workers=8)   # writes data/shards/index/
    problems = check_index("data/shards")                     # [] when it matches the shards

Each shard is read with ``tarfile`` (the member data offsets come from its headers); a sample is
indexed when it has one ``.jpg`` and one ``.cls`` holding an integer label in [0, num_classes),
the same rule the loader applies. Samples that break it are left out and listed in ``problems``
(``verify`` reports them in detail). The packer builds the index at the end of a pack.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tarfile

import numpy as np

from pfc.data import manifest as manifest_io
from pfc.data import sample_index
from pfc.data.tarstream import split_key
from pfc.errors import DataError


def scan_shard(task: tuple[int, str, int]) -> tuple[np.ndarray, list[str]]:
    """(rows int64 [n, 4] of (shard, JPEG data offset, size, label) in member order, problems) of
    one shard; ``task`` = (shard position, path, num_classes)."""
    position, path, num_classes = task
    samples: dict[str, dict] = {}
    problems: list[str] = []
    name = os.path.basename(path)
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = split_key(member.name)
                sample = samples.setdefault(key, {})
                if extension in sample:
                    problems.append(f"{name}: key {key} has two .{extension} members")
                if extension == "jpg":
                    sample["jpg"] = (member.offset_data, member.size)
                elif extension == "cls":
                    sample["cls"] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{name}: unreadable tar ({type(exc).__name__}: {exc}); indexed what came before")
    rows = []
    for key, sample in samples.items():
        if "jpg" not in sample or "cls" not in sample:
            problems.append(f"{name}: key {key} lacks a .jpg or a .cls member; not indexed")
            continue
        try:
            label = int(sample["cls"])
        except ValueError:
            problems.append(f"{name}: key {key} has label {sample['cls'][:20]!r}, not an integer; not indexed")
            continue
        if not 0 <= label < num_classes:
            problems.append(f"{name}: key {key} has label {label} outside [0, {num_classes}); not indexed")
            continue
        rows.append((position, *sample["jpg"], label))
    return np.array(rows, dtype=np.int64).reshape(-1, 4), problems


def scan_shards(out_dir: str, workers: int = 1) -> tuple[dict[str, np.ndarray], list[str]]:
    """The index arrays (:data:`pfc.data.sample_index.ARRAYS`, rows sorted by label, shard,
    offset) of the local shard set in ``out_dir``, and the problems met."""
    manifest = manifest_io.read_manifest(out_dir)
    urls = manifest_io.shard_urls(out_dir, manifest)
    if any(manifest_io.is_url(url) for url in urls):
        raise DataError(f"the per-sample index needs local shards; {out_dir}'s manifest names URLs")
    tasks = [(position, url, manifest["num_classes"]) for position, url in enumerate(urls)]
    if workers > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(scan_shard, tasks)
    else:
        results = [scan_shard(task) for task in tasks]
    rows = np.concatenate([found for found, _ in results])
    problems = [problem for _, found in results for problem in found]
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0], rows[:, 3]))]
    arrays = {name: rows[:, column].astype(dtype)
              for column, (name, dtype) in enumerate(sample_index.ROW_ARRAYS.items())}
    arrays["class_start"] = np.searchsorted(arrays["label"], np.arange(manifest["num_classes"] + 1)).astype(np.int64)
    return arrays, problems


def build_index(out_dir: str, workers: int = 1) -> tuple[int, list[str]]:
    """Scan the shard set in ``out_dir`` and write its index folder (replacing an old one as a
    whole: a reader sees the old index, none, or the new one, never a mixture); returns (rows
    indexed, problems). The caller holds the packer's lock of ``out_dir``."""
    arrays, problems = scan_shards(out_dir, workers)
    manifest = manifest_io.read_manifest(out_dir)
    urls = manifest_io.shard_urls(out_dir, manifest)
    final = os.path.join(out_dir, sample_index.INDEX_DIR)
    for leftover in os.listdir(out_dir):   # of a build that was killed (the lock says none is running)
        if leftover.startswith((f"{sample_index.INDEX_DIR}.tmp", f"{sample_index.INDEX_DIR}.old")):
            shutil.rmtree(os.path.join(out_dir, leftover), ignore_errors=True)
    temporary = f"{final}.tmp{os.getpid()}"
    os.makedirs(temporary)
    info = {"format": sample_index.FORMAT, "num_samples": int(len(arrays["label"])),
            "num_classes": manifest["num_classes"],
            "manifest_sha256": sample_index.file_sha256(manifest_io.manifest_source(out_dir)),
            "shard_bytes": [os.path.getsize(url) for url in urls], "arrays": {}}
    for name, values in arrays.items():
        path = os.path.join(temporary, f"{name}.npy")
        with open(path, "wb") as stream:
            np.save(stream, values, allow_pickle=False)
            stream.flush()
            os.fsync(stream.fileno())
        info["arrays"][name] = {"bytes": os.path.getsize(path), "sha256": sample_index.file_sha256(path)}
    with open(os.path.join(temporary, sample_index.INDEX_JSON), "w", encoding="utf-8") as stream:
        json.dump(info, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())
    old = f"{final}.old{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)
    return info["num_samples"], problems


def check_index(out_dir: str) -> tuple[str, list[str]]:
    """(a one-line status, problems) of ``out_dir``'s index: absent (not a problem: only the P×K
    sampler needs it), or checked: readable and not stale, array checksums as recorded, rows equal
    to a fresh scan of the shards."""
    folder = os.path.join(out_dir, sample_index.INDEX_DIR)
    if not os.path.exists(folder):
        return f"no per-sample index (only --sampler pk needs it: tools/pack_shards.py index {out_dir})", []
    rebuild = sample_index.REBUILD.format(root=out_dir)
    try:
        manifest = manifest_io.read_manifest(out_dir)
        index = sample_index.open_index(out_dir, manifest, manifest_io.shard_urls(out_dir, manifest))
    except DataError as exc:
        return "per-sample index unusable", [str(exc)]
    problems = []
    for name, record in index.info.get("arrays", {}).items():
        if sample_index.file_sha256(os.path.join(folder, f"{name}.npy")) != record.get("sha256"):
            problems.append(f"index/{name}.npy does not match its checksum in index.json; {rebuild}")
    expected, _ = scan_shards(out_dir)
    for name, values in expected.items():
        stored = getattr(index, name)
        if stored.shape != values.shape or not np.array_equal(stored, values):
            problems.append(f"index/{name}.npy does not match the shards; {rebuild}")
    return ("per-sample index matches the shards" if not problems else "per-sample index is wrong"), problems
