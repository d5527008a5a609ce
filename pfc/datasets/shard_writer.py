"""Writing one webdataset shard: its name, its tar layout, and its atomic creation."""
from __future__ import annotations

import contextlib
import io
import os
import tarfile


def shard_name(index: int) -> str:
    """The file name of shard ``index``: ``shard-NNNNNN.tar``."""
    return f"shard-{index:06d}.tar"


class ShardTarWriter:
    """Samples {"__key__": KEY, EXT: bytes, ...} as tar members ``KEY.EXT`` in sorted extension
    order, mode 0444, owner "bigdata", mtime 0: byte for byte what ``webdataset.TarWriter(stream,
    encoder=False, mtime=0)`` writes, without importing webdataset (and with it torch) into the
    packer and each of its workers. The integer mtime keeps tarfile from adding a PAX header to
    every member (a float mtime does), which halves the header parsing the loader pays per sample;
    fixed, so that the same inputs give byte-identical shards."""

    def __init__(self, stream):
        self.archive = tarfile.open(fileobj=stream, mode="w|")

    def write(self, sample: dict[str, bytes | str]) -> None:
        key = sample["__key__"]
        for extension in sorted(name for name in sample if name != "__key__"):
            data = sample[extension]
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "bigdata"
            self.archive.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.archive.close()


@contextlib.contextmanager
def shard_writer(final: str):
    """A :class:`ShardTarWriter` into a temporary name that becomes ``final`` when the block ends
    without an error (never a half-written ``final``)."""
    temporary = f"{final}.tmp{os.getpid()}"
    with open(temporary, "wb") as stream:
        writer = ShardTarWriter(stream)
        try:
            yield writer
        finally:
            writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, final)
