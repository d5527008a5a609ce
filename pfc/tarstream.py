"""A lean sequential reader of webdataset tar shards: samples as {"__key__", "__url__", ext: bytes}.

Why not ``tarfile`` (through webdataset's ``tarfile_samples``): on 112x112 faces it measured
~57 µs per sample against ~6 µs here — 20–40 % of a JPEG decode, which the loader's
"≥ 90 % of the decode floor" target cannot afford. Streams are still opened by webdataset's
``gopen`` (local paths, URLs, ``pipe:``), and shards are still written by its ``TarWriter``.

Handles POSIX ustar / GNU / pax members: regular files ('0', '\\0'), pax per-file headers ('x',
``path`` and ``size``), GNU long names ('L'); other entries are skipped. Samples are grouped like
webdataset does: key = the member path up to the first '.' of its file name, extension = the rest
(lower-cased). A damaged header (bad checksum, bad size) or a cut-off member raises TarDamage.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)


class TarDamage(ValueError):
    """The tar stream is truncated or its header is corrupt."""


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:   # GNU base-256 for large values
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarDamage(f"bad number {field!r} in a tar header") from None


def _checksum_ok(header: bytes) -> bool:
    """The header's byte sum with its checksum field counted as 8 spaces equals the stored value."""
    stored = _number(header[148:156])
    computed = int(np.frombuffer(header, dtype=np.uint8).sum(dtype=np.int64)) - sum(header[148:156]) + 8 * 32
    return stored == computed


def _pax_records(data: bytes) -> dict[str, str]:
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] != b"\0":
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        position += length
    return records


class _Chunks:
    """Reads a stream in large chunks and hands out slices (fewer calls than reading per member)."""

    def __init__(self, stream, chunk_size: int = 1 << 22):
        self.stream, self.chunk_size = stream, chunk_size
        self.buffer, self.position = b"", 0

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer only at the end of the stream)."""
        start, end = self.position, self.position + size
        if end > len(self.buffer):
            self._fill(size)
            start, end = 0, size
        self.position = min(end, len(self.buffer))
        return self.buffer[start:end]

    def skip(self, size: int) -> None:
        """Pass over ``size`` bytes; TarDamage if the stream ends first."""
        if self.position + size <= len(self.buffer):
            self.position += size
            return
        size -= len(self.buffer) - self.position
        self.buffer, self.position = b"", 0
        try:
            self.stream.seek(size, 1)
            return
        except (AttributeError, OSError, ValueError):   # not seekable (pipes, sockets)
            pass
        while size > 0:
            chunk = self.stream.read(min(size, self.chunk_size))
            if not chunk:
                raise TarDamage("tar stream ends inside a member")
            size -= len(chunk)

    def _fill(self, size: int) -> None:
        rest = self.buffer[self.position:]
        parts, have = [rest], len(rest)
        while have < size:
            chunk = self.stream.read(max(self.chunk_size, size - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self.buffer, self.position = b"".join(parts), 0


def iter_members(stream, skip_data=None) -> Iterator[tuple[str, bytes | None]]:
    """(path, data) of each regular file member; ``skip_data(path)`` True → data not read (None)."""
    chunks = _Chunks(stream)
    long_name = None
    pax: dict[str, str] = {}
    while True:
        header = chunks.take(BLOCK)
        if not header or header == ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise TarDamage("tar stream ends inside a header")
        # ustar/GNU headers (all that tarfile and webdataset write) are recognised by their magic;
        # the byte-sum checksum costs ~40 % of this reader's time, so only magic-less (v7)
        # headers pay it. A damaged header still fails: a bad size or a lost alignment makes the
        # next header lack the magic.
        if header[257:262] != b"ustar" and not _checksum_ok(header):
            raise TarDamage("bad tar header (no ustar magic, wrong checksum)")
        kind = header[156:157]
        size = _number(header[124:136])
        if "size" in pax:
            size = int(pax["size"])
        if size < 0:
            raise TarDamage(f"negative member size {size}")
        padding = (-size) % BLOCK
        if kind in (b"x", b"L"):
            data = chunks.take(size)
            if len(data) < size:
                raise TarDamage("tar stream ends inside a member")
            chunks.skip(padding)
            if kind == b"x":
                pax = _pax_records(data)
            else:
                long_name = data.split(b"\0", 1)[0].decode("utf-8")
            continue
        if kind not in (b"0", b"\0"):
            chunks.skip(size + padding)
            long_name, pax = None, {}
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        if header[257:263] == b"ustar\0" and header[345:346] != b"\0":   # POSIX name prefix
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        path = pax.get("path") or long_name or name
        long_name, pax = None, {}
        if skip_data is not None and skip_data(path):
            chunks.skip(size + padding)
            yield path, None
            continue
        data = chunks.take(size)
        if len(data) < size:
            raise TarDamage("tar stream ends inside a member")
        chunks.skip(padding)
        yield path, data


def split_key(path: str) -> tuple[str, str]:
    """webdataset's naming: ("dir/name", "ext.more") for "dir/name.ext.more"."""
    folder, _, base = path.rpartition("/")
    stem, _, extension = base.partition(".")
    return (folder + "/" + stem if folder else stem), extension.lower()


def iter_samples(stream, url: str, skip: int = 0) -> Iterator[dict]:
    """Samples of a tar stream, in order; the first ``skip`` samples are passed over without
    reading their data (seeking where possible). A duplicate extension within a key, or a
    key that appears again later, starts a new sample, as in webdataset."""
    current: dict | None = None
    index = 0

    def skipping(path: str) -> bool:
        key = split_key(path)[0]
        position = index if current is not None and current["__key__"] == key else index + (current is not None)
        return position < skip

    for path, data in iter_members(stream, skipping if skip > 0 else None):
        key, extension = split_key(path)
        if current is not None and (key != current["__key__"] or extension in current):
            if index >= skip:
                yield current
            index += 1
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[extension] = data
    if current is not None and index >= skip:
        yield current
