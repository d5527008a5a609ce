"""Files written whole or not at all."""
from __future__ import annotations

import os


def write_atomic(path: str, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary name beside it, synced before
    the rename: a reader or a crash never sees a half-written ``path``."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as stream:
        stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
