"""What the packer reads: a class-per-folder tree, insightface RecordIO, a landmark file.

A source has ``classes`` (names, label k = ``classes[k]``), ``items`` (reference, label) pairs,
``describe()`` (a string for the manifest's ``source``) and ``read(reference) -> bytes`` (the
encoded image). Sources are pickled to the packing workers without their item list.
Unusable input raises :class:`pfc.errors.DataError` naming it.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from pfc.datasets.recordio import IndexedRecordFile, unpack_record
from pfc.datasets.tree import list_class_tree
from pfc.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class FolderSource:
    """Images under ``root/<class name>/...``; labels are the ranks of the sorted names of the class
    folders that hold images.

    ``empty_classes`` names the class folders without any image (left out of the label space),
    ``ignored`` lists (path, reason) of the links not followed: links are followed only out of the
    tree (see :mod:`pfc.datasets.tree`), so no image is read twice or under two classes.
    ``read_folders`` holds the real paths of the folders read (the source and linked ones).
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise DataError(f"source folder {root} does not exist")
        self.root = root
        listing = list_class_tree(root, IMAGE_EXTENSIONS)
        self.ignored: list[tuple[str, str]] = listing.ignored
        if not listing.classes:
            links = f" ({len(self.ignored)} links not followed, first {self.ignored[0][0]})" if self.ignored else ""
            raise DataError(f"source folder {root} has no class sub-folders{links}")
        kept = [(name, images) for name, images in listing.classes if images]
        self.empty_classes = [name for name, images in listing.classes if not images]
        self.classes = [name for name, _ in kept]
        self.items: list[tuple[str, int]] = [(path, label) for label, (_, images) in enumerate(kept)
                                             for path in images]
        self.read_folders = listing.read_folders
        if not self.items:
            raise DataError(f"source folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")

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
                raise DataError(f"{prefix}.rec holds no image records")
            raw = []
            for key in progress_bar(keys, progress, "reading record headers"):
                label = records.read_header(key).primary_label
                if not np.isfinite(label) or label != int(label) or label < 0:
                    raise DataError(f"record {key} of {prefix}.rec has label {label}, not a non-negative integer")
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


def progress_bar(iterable, enabled: bool, description: str, total: int | None = None):
    """``iterable`` wrapped in a tqdm bar counting images when ``enabled``, else as it is."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=description, total=total, unit="img", smoothing=0.05)


def read_landmarks(path: str) -> dict[str, np.ndarray]:
    """Parse a landmark CSV: ``relative_path, x1, y1, ..., x5, y5`` per line (a header line is allowed)."""
    if not os.path.isfile(path):
        raise DataError(f"landmark file {path} does not exist")
    points: dict[str, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8") as stream:
        for number, row in enumerate(csv.reader(stream), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 11:
                raise DataError(f"{path}:{number}: expected a path and 10 coordinates, got {len(row)} fields")
            try:
                values = np.array([float(v) for v in row[1:]], dtype=np.float64).reshape(5, 2)
            except ValueError:
                if number == 1:
                    continue   # header line
                raise DataError(f"{path}:{number}: coordinates must be numbers, got {row[1:]}") from None
            points[os.path.normpath(row[0].strip())] = values
    if not points:
        raise DataError(f"landmark file {path} holds no landmarks")
    return points
