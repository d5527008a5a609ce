"""The per-sample index of a shard set ("pfc-index-1"): where each sample's JPEG lies, by identity.

The P×K sampler (:mod:`pfc.data.pk`) reads samples at random, so it needs to know where each one
is without scanning the shards. The packer writes the index beside ``dataset.json`` (and
``tools/pack_shards.py index OUT`` builds it for an existing shard set), as a folder of numpy
arrays that workers memory-map (42M samples: about 0.8 GB on disk, touched a row at a time):

    OUT/index/index.json      {"format": "pfc-index-1", "num_samples": S, "num_classes": C,
                               "manifest_sha256": ..., "shard_bytes": [size of each shard file],
                               "arrays": {name: {"bytes": int, "sha256": str}}}
    OUT/index/shard.npy       int32 [S]   the shard (position in the manifest's list)
    OUT/index/offset.npy      int64 [S]   byte offset of the sample's JPEG member data in its shard
    OUT/index/size.npy        int32 [S]   its size in bytes
    OUT/index/label.npy       int32 [S]   its label
    OUT/index/class_start.npy int64 [C+1] rows [class_start[c], class_start[c+1]) hold label c

Rows are sorted by (label, shard, offset), so an identity's samples are one contiguous range and
the sampler needs only ``class_start`` in memory. The folder is written under a temporary name
and renamed into place: a reader sees a complete index or none.

A stale index (one built before the shards or the manifest changed) would make the sampler read
the wrong bytes; :func:`open_index` refuses one whose recorded manifest digest or shard file sizes
differ from what is on disk now (cheap: one hash of ``dataset.json``, one ``stat`` per shard).
The array checksums and the rows themselves are checked by ``tools/pack_shards.py verify``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from pfc.data.manifest import MANIFEST_NAME, is_url, manifest_location
from pfc.errors import DataError

FORMAT = "pfc-index-1"
INDEX_DIR = "index"
INDEX_JSON = "index.json"
ROW_ARRAYS = {"shard": np.int32, "offset": np.int64, "size": np.int32, "label": np.int32}
ARRAYS = {**ROW_ARRAYS, "class_start": np.int64}
REBUILD = "rebuild it with: python tools/pack_shards.py index {root}"


def index_dir(root_or_manifest: str) -> str:
    """The index folder of a local dataset location (a directory or its ``dataset.json``)."""
    _, base = manifest_location(root_or_manifest)
    return os.path.join(base, INDEX_DIR)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read 8 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class SampleIndex:
    """An opened index: the row arrays memory-mapped (read-only), ``class_start`` in memory."""

    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    class_start: np.ndarray
    info: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_start) - 1

    def class_sizes(self) -> np.ndarray:
        """Samples per label, int64 [C]."""
        return np.diff(self.class_start)


def open_index(root_or_manifest: str, manifest: dict, urls: list[str]) -> SampleIndex:
    """The index of the local shard set at ``root_or_manifest`` (validated ``manifest``, shard
    ``urls``); DataError when it is missing, malformed or stale (the message says how to rebuild it)."""
    manifest_path, base = manifest_location(root_or_manifest)
    rebuild = REBUILD.format(root=base)
    if is_url(manifest_path) or any(is_url(url) for url in urls):
        raise DataError(f"the per-sample index needs local shards; {manifest_path} names URLs")
    folder = os.path.join(base, INDEX_DIR)
    info_path = os.path.join(folder, INDEX_JSON)
    if not os.path.isfile(info_path):
        raise DataError(f"{base} has no per-sample index ({info_path} is missing); {rebuild}")
    try:
        with open(info_path, encoding="utf-8") as stream:
            info = json.load(stream)
    except ValueError as exc:
        raise DataError(f"{info_path} is not valid JSON ({exc}); {rebuild}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{info_path}: format is {info.get('format') if isinstance(info, dict) else info!r}, "
                        f"expected {FORMAT!r}; {rebuild}")
    stale = _stale_reason(info, manifest, manifest_path, urls)
    if stale:
        raise DataError(f"the per-sample index {folder} is stale: {stale}; {rebuild}")
    arrays = {}
    for name, dtype in ARRAYS.items():
        path = os.path.join(folder, f"{name}.npy")
        try:
            arrays[name] = np.load(path, mmap_mode="r" if name in ROW_ARRAYS else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path} ({exc}); {rebuild}") from None
        expected = manifest["num_classes"] + 1 if name == "class_start" else info["num_samples"]
        if arrays[name].dtype != dtype or arrays[name].shape != (expected,):
            raise DataError(f"{path} holds {arrays[name].dtype} {arrays[name].shape}, expected "
                            f"{np.dtype(dtype)} ({expected},); {rebuild}")
    starts = arrays["class_start"]
    if starts[0] != 0 or starts[-1] != info["num_samples"] or np.any(np.diff(starts) < 0):
        raise DataError(f"{folder}/class_start.npy does not cover the {info['num_samples']} rows in order; {rebuild}")
    return SampleIndex(**arrays, info=info)


def _stale_reason(info: dict, manifest: dict, manifest_path: str, urls: list[str]) -> str:
    """Why the index does not belong to the shard set on disk now ("" when it does)."""
    if info.get("num_classes") != manifest["num_classes"]:
        return f"built for {info.get('num_classes')} classes, the manifest has {manifest['num_classes']}"
    if info.get("manifest_sha256") != file_sha256(manifest_path):
        return f"{MANIFEST_NAME} changed since it was built"
    recorded = info.get("shard_bytes")
    if not isinstance(recorded, list) or len(recorded) != len(urls):
        return f"built for {len(recorded) if isinstance(recorded, list) else '?'} shards, the manifest lists {len(urls)}"
    for url, size in zip(urls, recorded):
        actual = os.path.getsize(url) if os.path.isfile(url) else None
        if actual != size:
            return f"shard {url} is {actual} bytes, the index was built when it was {size}"
    if not isinstance(info.get("num_samples"), int) or info["num_samples"] < 0:
        return f"num_samples {info.get('num_samples')!r} is not a count"
    return ""
