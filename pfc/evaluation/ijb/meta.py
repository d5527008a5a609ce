"""The IJB-B / IJB-C protocol files in insightface's layout, read and checked.

    ROOT/meta/{p}_name_5pts_score.txt      NAME x1 y1 … x5 y5 SCORE    (one line per face)
    ROOT/meta/{p}_face_tid_mid.txt         NAME TEMPLATE_ID MEDIA_ID   (the same faces, same order)
    ROOT/meta/{p}_template_pair_label.txt  TID1 TID2 LABEL             (1:1 pairs, LABEL 1 = mated)
    ROOT/meta/{p}_1N_gallery_{G1,G2}.csv   header row; TEMPLATE_ID,SUBJECT_ID,…   (one row per image)
    ROOT/meta/{p}_1N_probe_mixed.csv       the same columns, the 1:N search templates
    ROOT/loose_crop/NAME                   the face images

``p`` is ``ijbc`` (galleries G1, G2) for ``IJBC`` and ``ijbb`` (galleries S1, S2) for ``IJBB``.
The 1:N files are optional as a set (all three, or none: then no identification is reported).

Everything the protocol joins is checked, since insightface's scripts silently map an unknown
template to template 0: a missing meta file, a malformed line, the two face files differing in
row count or names, a pair or a 1:N row naming a template that has no faces, a 1:N template given
two subjects. Each is a :class:`pfc.errors.DataError` naming the file and its 1-based line.
Large files (IJB-C: 469,375 faces, 15.7M pairs) are parsed by numpy's C reader; a slow line scan
runs only to locate an error.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from pfc.errors import DataError

Target = Literal["IJBB", "IJBC"]
TARGETS: tuple[str, ...] = get_args(Target)
GALLERIES: dict[str, tuple[str, str]] = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}
NUM_LANDMARK_VALUES = 10


@dataclass(frozen=True)
class IjbLayout:
    """Where the files of ``target`` lie under ``root``."""

    root: str
    target: Target

    def __post_init__(self):
        if self.target not in TARGETS:
            raise DataError(f"IJB target {self.target!r} is not one of {', '.join(TARGETS)}")

    @property
    def prefix(self) -> str:
        return self.target.lower()

    def meta(self, name: str) -> str:
        """``ROOT/meta/{prefix}_{name}``."""
        return os.path.join(self.root, "meta", f"{self.prefix}_{name}")

    @property
    def faces_file(self) -> str:
        return self.meta("name_5pts_score.txt")

    @property
    def templates_file(self) -> str:
        return self.meta("face_tid_mid.txt")

    @property
    def pairs_file(self) -> str:
        return self.meta("template_pair_label.txt")

    def gallery_file(self, gallery: str) -> str:
        return self.meta(f"1N_gallery_{gallery}.csv")

    @property
    def probes_file(self) -> str:
        return self.meta("1N_probe_mixed.csv")

    def image(self, name: str) -> str:
        """``ROOT/loose_crop/NAME``."""
        return os.path.join(self.root, "loose_crop", name)


@dataclass
class IjbFaces:
    """Every face of the protocol, in file order: ``names`` [N] str, ``landmarks`` float64 [N, 5, 2]
    (pixels of the loose crop), ``detector_scores`` float64 [N], ``templates`` and ``medias`` int64 [N]."""

    names: np.ndarray
    landmarks: np.ndarray
    detector_scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class IjbPairs:
    """The 1:1 pairs in file order: template ids ``first``, ``second`` int64 [P], ``labels`` bool [P]."""

    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SearchSet:
    """A 1:N gallery or probe set: unique ``templates`` int64 [T] (order of first appearance) and
    the ``subjects`` int64 [T] they show."""

    name: str
    templates: np.ndarray
    subjects: np.ndarray


@dataclass
class IjbMeta:
    """The whole protocol of one target; ``galleries`` and ``probes`` are None without 1:N files."""

    layout: IjbLayout
    faces: IjbFaces
    pairs: IjbPairs
    galleries: dict[str, SearchSet] | None
    probes: SearchSet | None


def read_ijb_meta(root: str, target: Target = "IJBC") -> IjbMeta:
    """Read and cross-check the protocol files of ``target`` under ``root`` (module docstring)."""
    layout = IjbLayout(root, target)
    faces = read_faces(layout)
    known = np.unique(faces.templates)
    pairs = read_pairs(layout.pairs_file, known, layout.templates_file)
    galleries, probes = read_identification(layout, known)
    return IjbMeta(layout=layout, faces=faces, pairs=pairs, galleries=galleries, probes=probes)


def read_faces(layout: IjbLayout) -> IjbFaces:
    """The two face files, joined by row order (their names must agree)."""
    points_file, templates_file = layout.faces_file, layout.templates_file
    names, numbers = _read_named_rows(points_file, 1 + NUM_LANDMARK_VALUES, np.float64, "NAME x1 y1 … x5 y5 SCORE")
    template_names, ids = _read_named_rows(templates_file, 2, np.int64, "NAME TEMPLATE_ID MEDIA_ID")
    if len(names) != len(template_names):
        raise DataError(f"{templates_file} has {len(template_names)} faces but {points_file} has "
                        f"{len(names)}; the two are matched by row order")
    if len(names) == 0:
        raise DataError(f"{points_file} lists no faces")
    differing = np.flatnonzero(names != template_names)
    if differing.size:
        line = int(differing[0])
        raise DataError(f"{templates_file} line {line + 1}: face {str(template_names[line])!r} differs from "
                        f"{str(names[line])!r} on the same line of {points_file}")
    bad = np.flatnonzero(~np.isfinite(numbers).all(axis=1))
    if bad.size:
        raise DataError(f"{points_file} line {int(bad[0]) + 1}: landmarks and score must be finite numbers")
    return IjbFaces(names=names, landmarks=numbers[:, :NUM_LANDMARK_VALUES].reshape(-1, 5, 2),
                    detector_scores=numbers[:, NUM_LANDMARK_VALUES], templates=ids[:, 0], medias=ids[:, 1])


def read_pairs(path: str, known_templates: np.ndarray, templates_file: str = "the face list") -> IjbPairs:
    """``TID1 TID2 LABEL`` lines; every template must be in ``known_templates`` (sorted unique)."""
    values = _read_integers(path, 3, "TID1 TID2 LABEL")
    if len(values) == 0:
        raise DataError(f"{path} lists no pairs")
    bad_label = np.flatnonzero((values[:, 2] != 0) & (values[:, 2] != 1))
    if bad_label.size:
        row = int(bad_label[0])
        raise DataError(f"{path} line {_line_of_row(path, row)}: label {values[row, 2]} is not 0 or 1")
    mated = int((values[:, 2] == 1).sum())
    if mated in (0, len(values)):
        kind = "mated" if mated else "non-mated"
        other = "non-mated" if mated else "mated"
        raise DataError(f"{path}: all {len(values)} pairs are {kind}; a ROC needs {other} pairs too")
    for column in (0, 1):
        _check_known(values[:, column], known_templates, path, templates_file,
                     line_of=lambda row: _line_of_row(path, row))
    return IjbPairs(first=values[:, 0], second=values[:, 1], labels=values[:, 2] == 1)


def read_identification(layout: IjbLayout, known_templates: np.ndarray
                        ) -> tuple[dict[str, SearchSet] | None, SearchSet | None]:
    """The two galleries and the mixed probes, or (None, None) when none of their files exists."""
    files = [layout.gallery_file(g) for g in GALLERIES[layout.target]] + [layout.probes_file]
    present = [os.path.exists(path) for path in files]
    if not any(present):
        return None, None
    if not all(present):
        missing = files[present.index(False)]
        raise DataError(f"missing 1:N meta file {missing} (the 1:N files come as a set: "
                        f"{', '.join(os.path.basename(p) for p in files)})")
    galleries = {g: read_search_set(layout.gallery_file(g), g, known_templates, layout.templates_file)
                 for g in GALLERIES[layout.target]}
    probes = read_search_set(layout.probes_file, "probes", known_templates, layout.templates_file)
    return galleries, probes


def read_search_set(path: str, name: str, known_templates: np.ndarray, templates_file: str = "the face list"
                    ) -> SearchSet:
    """A 1:N CSV: a header row, then ``TEMPLATE_ID,SUBJECT_ID,…`` per image."""
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read 1:N meta file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a text file: {exc}") from exc
    rows = lines[1:]
    if not rows:
        raise DataError(f"{path} has no rows after its header")
    ids = np.empty((len(rows), 2), dtype=np.int64)
    for number, line in enumerate(rows):
        fields = line.split(",")
        try:
            ids[number] = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise DataError(f"{path} line {number + 2}: expected TEMPLATE_ID,SUBJECT_ID,…, "
                            f"got {line[:80]!r}") from None
    _check_known(ids[:, 0], known_templates, path, templates_file, line_of=lambda row: row + 2)
    templates, first_rows = np.unique(ids[:, 0], return_index=True)
    order = np.argsort(first_rows, kind="stable")
    templates, first_rows = templates[order], first_rows[order]
    subjects = ids[first_rows, 1]
    positions = _positions(templates, ids[:, 0])
    conflict = np.flatnonzero(subjects[positions] != ids[:, 1])
    if conflict.size:
        row = int(conflict[0])
        raise DataError(f"{path} line {row + 2}: template {ids[row, 0]} has subject {ids[row, 1]} here but "
                        f"{subjects[positions[row]]} on line {int(first_rows[positions[row]]) + 2}")
    return SearchSet(name=name, templates=templates, subjects=subjects)


def _positions(values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index in ``values`` (unique, any order) of each query (all present)."""
    order = np.argsort(values, kind="stable")
    return order[np.searchsorted(values[order], queries)]


def _check_known(templates: np.ndarray, known: np.ndarray, path: str, templates_file: str, line_of) -> None:
    """DataError naming the first template (row → line by ``line_of``) not in ``known`` (sorted)."""
    position = np.minimum(np.searchsorted(known, templates), len(known) - 1)
    unknown = np.flatnonzero(known[position] != templates)
    if unknown.size:
        row = int(unknown[0])
        raise DataError(f"{path} line {line_of(row)}: template {templates[row]} has no faces in {templates_file}")


def _line_of_row(path: str, row: int) -> int:
    """1-based line of data row ``row`` (numpy's reader skips blank lines; only errors need this)."""
    seen = -1
    with open(path, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, start=1):
            seen += bool(line.strip())
            if seen == row:
                return number
    return row + 1


# ------------------------------------------------------------------------------ parsing

def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"missing IJB meta file {path}")
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except OSError as exc:
        raise DataError(f"cannot read IJB meta file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not a text file: {exc}") from exc


def _read_named_rows(path: str, values: int, dtype, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Lines ``NAME v1 … v_values``: (names str [lines], values ``dtype`` [lines, values]); the
    numbers by numpy's C reader, the line of the first malformed one located only on failure."""
    text = _read_text(path)
    lines = text.splitlines()
    if not lines:
        return np.empty(0, dtype=str), np.empty((0, values), dtype=dtype)
    if len(text.split()) != (values + 1) * len(lines):
        _locate_malformed(path, values + 1, form, dtype, first_numeric_field=2)
    names = np.array([line.split(None, 1)[0] for line in lines])
    try:
        numbers = np.loadtxt(io.StringIO(text), dtype=dtype, usecols=range(1, values + 1), comments=None, ndmin=2)
    except ValueError:
        _locate_malformed(path, values + 1, form, dtype, first_numeric_field=2)
        raise DataError(f"{path}: expected lines of {form}") from None
    return names, numbers


def _read_integers(path: str, columns: int, form: str) -> np.ndarray:
    """Lines of ``columns`` integers (numpy's C reader), int64 [lines, columns]."""
    if not os.path.exists(path):
        raise DataError(f"missing IJB meta file {path}")
    try:
        values = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        values = None
    except OSError as exc:
        raise DataError(f"cannot read IJB meta file {path}: {exc.strerror or exc}") from exc
    if values is not None and (values.shape[1] == columns or values.size == 0):
        return values.reshape(-1, columns)
    _locate_malformed(path, columns, form)
    raise DataError(f"{path}: expected lines of {columns} integers ({form})")


def _locate_malformed(path: str, columns: int, form: str, dtype=np.int64, first_numeric_field: int = 1) -> None:
    """Raise naming the first line that is not ``columns`` fields whose fields from
    ``first_numeric_field`` on are numbers of ``dtype`` (the slow path of errors)."""
    convert, kind = (float, "a number") if dtype is np.float64 else (int, "an integer")
    with open(path, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, start=1):
            fields = line.split()
            if len(fields) != columns:
                raise DataError(f"{path} line {number}: expected {columns} fields ({form}), got {len(fields)}")
            for column, text in enumerate(fields[first_numeric_field - 1:], start=first_numeric_field):
                try:
                    convert(text)
                except ValueError:
                    raise DataError(f"{path} line {number}: field {column} {text!r} is not {kind}") from None
