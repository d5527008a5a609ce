"""Listing a class-per-folder tree ``root/<class>/.../<image>``: which links are followed.

    listing = list_class_tree("faces/", (".jpg", ".png"))
    listing.classes      # [(class folder name, [image path relative to root, ...]), ...], sorted
    listing.ignored      # [(path relative to root, why it was not read), ...]
    listing.read_folders # real paths of the source folder and of every linked folder read

Links are followed only out of the tree, so that every image is read once under one class:

* a link to a folder or an image file is followed when its target lies outside everything read so
  far: a tree of identity folders (or images) that are links into a dataset kept elsewhere packs
  as if the folders were there;
* a link whose target lies inside the source folder, inside a folder already reached through
  another link, or that contains one of them (``loop -> .``, ``up -> ..``, a second link to one
  folder) is not followed and is listed in ``ignored``, as is a link whose target is missing.

Each class folder's real location is claimed before any class is walked, so a link inside one
class never pulls in another class's images; image links are checked after the whole walk, against
every folder read. Only links cost a ``realpath``; plain entries are listed with ``os.scandir``.
Hidden top-level folders (``.pack``, ``.git``) are not classes; below the top, as in ``os.walk``,
every non-folder entry whose name ends with an image extension is an image. A folder that cannot
be listed raises :class:`pfc.errors.DataError` naming it (``os.walk`` would skip it silently).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from pfc.errors import DataError

MISSING = "link to a missing target: not followed"


@dataclass
class TreeListing:
    """What :func:`list_class_tree` found; see the module docstring."""

    classes: list[tuple[str, list[str]]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    read_folders: set[str] = field(default_factory=set)   # real paths: the source, each link followed


class _Claims:
    """Real paths of the folders read so far; a link target inside or above one is refused."""

    def __init__(self, root_real: str):
        self.root_real = root_real
        self.folders: dict[str, str] = {}     # real path -> how it was reached (relative path)
        self.above: set[str] = set()          # proper ancestors of the claimed folders
        self.claim(root_real, "the source folder")

    def claim(self, real: str, reached_as: str) -> None:
        self.folders[real] = reached_as
        parent = os.path.dirname(real)
        while parent not in self.above and parent != real:
            self.above.add(parent)
            real, parent = parent, os.path.dirname(parent)

    def conflict(self, real: str) -> str | None:
        """Why a link to the real path ``real`` must not be followed, or None."""
        if real == self.root_real:
            return f"link to {real}, the source folder itself (a loop): not followed"
        probe = real
        while True:
            if probe in self.folders:
                relation = "which is" if probe == real else "inside"
                return f"link to {real}, {relation} {self.folders[probe]} (read already): not followed"
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if self.root_real.startswith(real.rstrip(os.sep) + os.sep):
            return f"link to {real}, which contains the source tree (a loop): not followed"
        if real in self.above:
            return f"link to {real}, which contains a folder read already: not followed"
        return None


def list_class_tree(root: str, extensions: tuple[str, ...]) -> TreeListing:
    """Class folders of ``root`` (sorted names) with their images (paths relative to ``root``,
    files sorted before sub-folders in each folder, as ``os.walk`` top-down gives them), following
    links only out of the tree as the module docstring says. Class folders may end up empty."""
    listing = TreeListing()
    claims = _Claims(os.path.realpath(root))
    tops = []
    for entry in _sorted_entries(root):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            if not os.path.exists(entry.path):
                listing.ignored.append((entry.name, MISSING))
                continue
            if not os.path.isdir(entry.path):
                continue   # a file at the top is no class
            real = os.path.realpath(entry.path)
            reason = claims.conflict(real)
            if reason is not None:
                listing.ignored.append((entry.name, reason))
                continue
        elif entry.is_dir():
            real = os.path.join(claims.root_real, entry.name)
        else:
            continue
        claims.claim(real, f"class {entry.name}")
        tops.append(entry.name)
    file_links: list[tuple[str, str]] = []   # (relative path, real target), in walk order
    for name in tops:
        images: list[str] = []
        _walk(root, name, claims, listing, extensions, images, file_links)
        listing.classes.append((name, images))
    refused = _refused_file_links(file_links, claims, listing)
    if refused:
        listing.classes = [(name, [path for path in images if path not in refused])
                           for name, images in listing.classes]
    listing.read_folders = set(claims.folders)
    return listing


def _walk(root, relative, claims, listing, extensions, images, file_links) -> None:
    """Append the images under ``root/relative`` (a folder already claimed) to ``images``, and the
    image links among them also to ``file_links`` (checked once the whole tree is claimed)."""
    folders = []
    for entry in _sorted_entries(os.path.join(root, relative)):
        path = os.path.join(relative, entry.name)
        if entry.is_symlink():
            if not os.path.exists(entry.path):
                listing.ignored.append((path, MISSING))
            elif os.path.isdir(entry.path):
                real = os.path.realpath(entry.path)
                reason = claims.conflict(real)
                if reason is not None:
                    listing.ignored.append((path, reason))
                else:
                    claims.claim(real, path)
                    folders.append(path)
            elif entry.name.lower().endswith(extensions):
                images.append(path)
                file_links.append((path, os.path.realpath(entry.path)))
        elif entry.is_dir():
            folders.append(path)
        elif entry.name.lower().endswith(extensions):
            images.append(path)
    for folder in folders:
        _walk(root, folder, claims, listing, extensions, images, file_links)


def _sorted_entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as exc:
        raise DataError(f"cannot list source folder {folder}: {exc.strerror or exc}") from None


def _refused_file_links(file_links: list[tuple[str, str]], claims: _Claims, listing: TreeListing) -> set[str]:
    """The image links not to follow (target inside a folder read, or the target of an earlier
    link), each listed in ``listing.ignored``."""
    targets: dict[str, str] = {}
    refused = set()
    for path, real in file_links:
        reason = claims.conflict(real)
        if reason is None and real in targets:
            reason = f"link to {real}, also the target of {targets[real]}: not followed"
        if reason is not None:
            listing.ignored.append((path, reason))
            refused.add(path)
        else:
            targets[real] = path
    return refused
