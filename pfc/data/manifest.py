"""The shard-set manifest ``dataset.json`` ("pfc-shards-1"): reading, validating, locating shards.

    {"format": "pfc-shards-1", "num_classes": int, "num_samples": int, "image_size": [H, W],
     "shards": [{"name": "shard-000000.tar", "num_samples": int}, ...], "source": str}

Shard names are relative to the directory (or URL prefix) holding ``dataset.json`` unless they are
absolute paths or URLs themselves. A dataset location is a directory, the path of its
``dataset.json`` or a URL (of either); every problem with it raises :class:`pfc.errors.DataError`
naming the manifest.

    manifest = read_manifest("data/shards")          # validated dict
    side = image_side(manifest)                        # 112: the backbones need square images
    where = manifest_source("data/shards")             # "data/shards/dataset.json", for messages
    urls = shard_urls("data/shards", manifest)         # every shard's path or URL
"""
from __future__ import annotations

import json
import os
import re

from pfc.errors import DataError

FORMAT = "pfc-shards-1"
MANIFEST_NAME = "dataset.json"
CLASSES_NAME = "classes.txt"
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def is_url(path: str) -> bool:
    """True for ``scheme:...`` strings (http:, s3:, pipe:, file: ...), False for local paths."""
    return bool(_URL.match(path)) and not re.match(r"^[a-zA-Z]:[\\/]", path)


def manifest_location(root_or_manifest: str) -> tuple[str, str]:
    """(manifest path or URL, base location of the shards) for a directory, a dataset.json path or a URL."""
    if not isinstance(root_or_manifest, (str, os.PathLike)) or not str(root_or_manifest):
        raise DataError(f"dataset location must be a non-empty path or URL, got {root_or_manifest!r}")
    location = str(root_or_manifest)
    if is_url(location):
        if location.endswith(".json"):
            return location, location.rsplit("/", 1)[0]
        return location.rstrip("/") + "/" + MANIFEST_NAME, location.rstrip("/")
    if os.path.isdir(location):
        return os.path.join(location, MANIFEST_NAME), location
    return location, os.path.dirname(os.path.abspath(location))


def _load_json(path: str, allow_pipe: bool) -> dict:
    if is_url(path):
        if path.startswith("pipe:") and not allow_pipe:
            raise DataError(f"{path}: pipe: URLs run shell commands; pass allow_pipe=True to allow them")
        import webdataset as wds
        try:
            with wds.gopen(path) as stream:
                text = stream.read()
        except Exception as exc:  # any transport error is a missing manifest to the user
            raise DataError(f"cannot read manifest {path}: {exc}") from exc
    else:
        if not os.path.isfile(path):
            raise DataError(_missing_manifest(path))
        with open(path, "rb") as stream:
            text = stream.read()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"manifest {path} is not valid JSON: {exc}") from exc


def _missing_manifest(path: str) -> str:
    """Why a local manifest path does not name a file, in the terms the user gave it: a data
    folder that does not exist, a folder that is not a packed shard set, or a missing .json."""
    folder = os.path.dirname(path) or "."
    pack_hint = "pack images into it with pfc-pack or tools/pack_shards.py"
    if os.path.isdir(path):
        return f"manifest {path} is a folder, not a file"
    if os.path.basename(path) == MANIFEST_NAME and not os.path.exists(folder):
        return f"data folder {folder} does not exist ({pack_hint})"
    if os.path.basename(path) == MANIFEST_NAME:
        return f"data folder {folder} holds no {MANIFEST_NAME}: not a packed shard set ({pack_hint})"
    if not path.endswith(".json"):
        return f"data folder {path} does not exist ({pack_hint})"
    return f"manifest {path} does not exist"


def validate_manifest(manifest: dict, where: str = "manifest") -> dict:
    """Check the fields and their consistency; returns ``manifest`` or raises DataError naming the problem."""
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    for field in ("num_classes", "num_samples"):
        value = manifest.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{where}: {field} must be a non-negative integer, got {value!r}")
    if manifest["num_classes"] == 0:
        raise DataError(f"{where}: num_classes is 0")
    size = manifest.get("image_size")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise DataError(f"{where}: image_size must be [height, width] positive integers, got {size!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{where}: the shard list is empty")
    names = set()
    for index, shard in enumerate(shards):
        if (not isinstance(shard, dict) or not isinstance(shard.get("name"), str) or not shard["name"]
                or not isinstance(shard.get("num_samples"), int) or shard["num_samples"] < 0):
            raise DataError(f"{where}: shard entry {index} must be "
                            f"{{'name': str, 'num_samples': int >= 0}}, got {shard!r}")
        if shard["name"] in names:
            raise DataError(f"{where}: shard {shard['name']} is listed twice")
        names.add(shard["name"])
    total = sum(shard["num_samples"] for shard in shards)
    if total != manifest["num_samples"]:
        raise DataError(f"{where}: shards hold {total} samples but num_samples is {manifest['num_samples']}")
    if total == 0:
        raise DataError(f"{where}: the shards hold no samples")
    if not isinstance(manifest.get("source", ""), str):
        raise DataError(f"{where}: source must be a string")
    return manifest


def read_manifest(root_or_manifest: str, allow_pipe: bool = False) -> dict:
    """The validated contents of ``dataset.json`` from a directory, a path to it, or a URL.

    Adds nothing; raises DataError on a missing or malformed manifest or an empty shard list.
    """
    path, _ = manifest_location(root_or_manifest)
    return validate_manifest(_load_json(path, allow_pipe), path)


def manifest_source(root_or_manifest: str) -> str:
    """The path or URL of the ``dataset.json`` a dataset location names, for messages."""
    return manifest_location(root_or_manifest)[0]


def image_side(manifest: dict) -> int:
    """Side of the square training images of a validated manifest (``image_size`` = [S, S]).

    DataError when the images are not square: the backbones need H = W.
    """
    height, width = manifest["image_size"]
    if height != width:
        raise DataError(f"{MANIFEST_NAME} image_size {[height, width]} is not square; the backbones need H = W")
    return height


def shard_urls(root_or_manifest: str, manifest: dict, allow_pipe: bool = False,
               check_exists: bool = True) -> list[str]:
    """The location of every shard in manifest order; local shards must exist when ``check_exists``
    (DataError naming the first missing one)."""
    _, base = manifest_location(root_or_manifest)
    urls = []
    for shard in manifest["shards"]:
        name = shard["name"]
        if is_url(name) or os.path.isabs(name):
            url = name
        elif is_url(base):
            url = base + "/" + name
        else:
            url = os.path.join(base, name)
        if url.startswith("pipe:") and not allow_pipe:
            raise DataError(f"shard {url}: pipe: URLs run shell commands; pass allow_pipe=True to allow them")
        if check_exists and not is_url(url) and not os.path.isfile(url):
            raise DataError(f"shard {url} listed in the manifest does not exist")
        urls.append(url)
    return urls
