"""Reader for insightface-style MXNet RecordIO datasets (``PREFIX.rec`` + ``PREFIX.idx``), without mxnet.

A missing, truncated or malformed file raises :class:`pfc.errors.DataError` naming it.

Layout (dmlc-core RecordIO, little-endian):

- A record is one or more *parts*. Each part is ``magic:uint32 = 0xced7230a``, ``lrec:uint32``,
  ``length`` payload bytes, then zero padding to a multiple of 4 bytes. ``lrec >> 29`` is the
  continuation flag ``cflag`` and ``lrec & (2**29 - 1)`` the payload length.
- ``cflag`` 0: the whole record. 1 / 2 / 3: first / middle / last part of a record that the writer
  split where the magic word occurred (4-byte aligned) in the data; the magic itself is not stored,
  so the reader puts the 4 magic bytes back between consecutive parts.
- A record's payload starts with the ``IfQQ`` header (24 bytes): ``flag:uint32``, ``label:float32``,
  ``id:uint64``, ``id2:uint64``. When ``flag > 0``, ``flag`` float32 labels follow the header and the
  record's label is the first of them; otherwise the label is the header's ``label``.
- ``PREFIX.idx`` is text: one ``key<TAB>byte_offset`` line per record.
- insightface convention: record 0 is a header with ``flag > 0`` whose labels are
  ``[first_non_image_key, end]``; the images are keys ``1 … first_non_image_key − 1``. If record 0
  has ``flag == 0`` it is an ordinary image and every key in the index is an image.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from pfc.errors import DataError

MAGIC = 0xCED7230A
_PART = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


@dataclass(frozen=True)
class RecordHeader:
    """The ``IfQQ`` header of a record; ``labels`` holds the ``flag`` extra floats when flag > 0."""

    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...]

    @property
    def primary_label(self) -> float:
        """The record's label: the first extra float when flag > 0, else the header label."""
        return self.labels[0] if self.flag > 0 else self.label


def read_record(stream) -> bytes | None:
    """Read one (possibly multi-part) record from ``stream`` at its current position.

    Returns the payload with the magic words re-inserted between parts, or None at a clean end of
    file. Raises DataError on a bad magic word, a truncated part or an out-of-order cflag.
    """
    parts: list[bytes] = []
    while True:
        head = stream.read(_PART.size)
        if not head and not parts:
            return None
        if len(head) != _PART.size:
            raise DataError("truncated RecordIO part header")
        magic, lrec = _PART.unpack(head)
        if magic != MAGIC:
            raise DataError(f"bad RecordIO magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        expected = (0, 1) if not parts else (2, 3)
        if cflag not in expected:
            raise DataError(f"RecordIO continuation flag {cflag} where {expected} was expected")
        padded = (length + 3) & ~3
        data = stream.read(padded)
        if len(data) != padded:
            raise DataError(f"truncated RecordIO record: {len(data)} of {padded} bytes")
        parts.append(data[:length])
        if cflag in (0, 3):
            return MAGIC.to_bytes(4, "little").join(parts)


def unpack_record(payload: bytes) -> tuple[RecordHeader, bytes]:
    """Split a record payload into its header and the remaining bytes (the encoded image)."""
    if len(payload) < _HEADER.size:
        raise DataError(f"record of {len(payload)} bytes is shorter than its {_HEADER.size}-byte header")
    flag, label, id_, id2 = _HEADER.unpack_from(payload)
    start = _HEADER.size
    extra: tuple[float, ...] = ()
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise DataError(f"record header announces {flag} labels but the record is too short")
        extra = struct.unpack_from(f"<{flag}f", payload, start)
        start = end
    return RecordHeader(flag, label, id_, id2, extra), payload[start:]


def read_index(idx_path: str) -> dict[int, int]:
    """Parse ``PREFIX.idx`` (``key<TAB>offset`` per line) into {key: byte offset}."""
    offsets: dict[int, int] = {}
    with open(idx_path, "r", encoding="ascii") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DataError(f"{idx_path}:{number}: expected 'key offset', got {line.strip()!r}")
            try:
                offsets[int(fields[0])] = int(fields[1])
            except ValueError:
                raise DataError(f"{idx_path}:{number}: key and offset must be integers, "
                                f"got {line.strip()!r}") from None
    return offsets


class IndexedRecordFile:
    """Random access to ``PREFIX.rec`` through ``PREFIX.idx``; open one per process.

    ``image_keys`` lists the image records (insightface convention, see the module docstring).
    """

    def __init__(self, prefix: str):
        self.rec_path, self.idx_path = prefix + ".rec", prefix + ".idx"
        for path in (self.rec_path, self.idx_path):
            if not os.path.isfile(path):
                raise DataError(f"RecordIO file {path} does not exist")
        self.offsets = read_index(self.idx_path)
        if not self.offsets:
            raise DataError(f"{self.idx_path} lists no records")
        self._file = open(self.rec_path, "rb")
        self.image_keys = self._find_image_keys()

    def _find_image_keys(self) -> list[int]:
        if 0 not in self.offsets:
            return sorted(self.offsets)
        header, _ = unpack_record(self.read(0))
        if header.flag == 0:
            return sorted(self.offsets)
        end = int(header.labels[0])
        missing = [k for k in range(1, end) if k not in self.offsets]
        if missing:
            raise DataError(f"record 0 announces images 1..{end - 1} but {len(missing)} of them "
                            f"(first: {missing[0]}) are not in {self.idx_path}")
        return list(range(1, end))

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (header included)."""
        if key not in self.offsets:
            raise DataError(f"record {key} is not in {self.idx_path}")
        self._file.seek(self.offsets[key])
        payload = read_record(self._file)
        if payload is None:
            raise DataError(f"record {key} at offset {self.offsets[key]} is past the end of {self.rec_path}")
        return payload

    def read_header(self, key: int) -> RecordHeader:
        """Only the header of record ``key``; reads just its first bytes when they hold it whole."""
        if key not in self.offsets:
            raise DataError(f"record {key} is not in {self.idx_path}")
        self._file.seek(self.offsets[key])
        head = self._file.read(_PART.size + _HEADER.size + 4 * 8)
        if len(head) >= _PART.size + _HEADER.size:
            magic, lrec = _PART.unpack_from(head)
            length = lrec & _LENGTH_MASK
            flag = _HEADER.unpack_from(head, _PART.size)[0]
            needed = _HEADER.size + 4 * flag
            if magic == MAGIC and lrec >> 29 == 0 and needed <= length and _PART.size + needed <= len(head):
                return unpack_record(head[_PART.size:_PART.size + needed])[0]
        return unpack_record(self.read(key))[0]

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
