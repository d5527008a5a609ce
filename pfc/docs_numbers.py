"""Generated blocks in Markdown: numbers a command writes and a test checks, so they cannot drift.

A block is the text between two HTML comments, each on a line of its own (Markdown renders
neither):

    <!-- generated: demo -->
    | held-out, 1,200 pairs | accuracy (10-fold) | … |
    <!-- end: demo -->

    replace_block(text, "demo", body)   # text with the block's lines replaced by body
    write_or_check_block(path, "demo", body, check=True, remedy="make …")   # a generator's --write/--check
    read_block(text, "demo")            # the block's lines, as replace_block wrote them
    block_names(text)                   # ["demo", …] in the order they appear

Everything between the markers belongs to the generator: an edit by hand is overwritten on the
next run and fails the check before that. A NAME is letters, digits, ``_``, ``-`` and ``.``;
each NAME appears once per file. Malformed markers (an ``end`` without its ``generated``, a
block inside another, a NAME twice, a missing block) raise :class:`BlockError` naming the marker
and its line.

How a README number is made (``tools/readme_numbers.py``, ``make readme-numbers``):

1. a command measures it and writes a committed results file ``docs/results/NAME.json``
   (``make readme-numbers`` runs ``make demo`` and writes ``docs/results/demo.json``);
2. a renderer, a function ``results dict -> Markdown`` registered under NAME in
   ``tools/readme_numbers.py``'s ``RENDERERS``, turns the file into the block's text;
3. ``python tools/readme_numbers.py write`` rewrites every registered block of README.md from
   its file; ``check`` (and ``tests/test_readme_numbers.py``) fails when a block differs from
   what the renderer writes from the committed file, or when the file was measured with
   another definition of its command (the file records a digest of what defines the run).

A new block (say the planner's capacity table, from ``docs/results/capacity.json``): put the
two markers into README.md around the table; write a renderer ``render_capacity(results) -> str``
and register it, ``RENDERERS["capacity"] = ("capacity.json", render_capacity)``; register what
defines the measurement, ``DEFINITIONS["capacity.json"] = (digest, "make NAME")`` with
``digest(repository root) -> str`` stored in the file as ``"definition_sha256"`` (optional: a
results file without an entry is never called stale); and give the measurement a
command (a ``tools/readme_numbers.py`` subcommand or a make target) that writes the results file
and then calls ``write_readme()``. The test then covers the new block with no change.
"""
from __future__ import annotations

import difflib
import re
import sys

_NAME = r"[A-Za-z0-9_.-]+"
_MARKER = re.compile(rf"^<!-- (generated|end): ({_NAME}) -->[ \t]*$")


class BlockError(ValueError):
    """A generated block is missing or its markers are malformed."""


def _blocks(text: str) -> dict[str, tuple[int, int]]:
    """NAME -> (index of the line after ``generated``, index of the ``end`` line), checked."""
    lines = text.split("\n")
    spans: dict[str, tuple[int, int]] = {}
    open_name, open_line = None, -1
    for index, line in enumerate(lines):
        marker = _MARKER.match(line)
        if marker is None:
            if re.match(r"^<!-- (generated|end):", line):
                raise BlockError(f"line {index + 1}: malformed marker {line.strip()!r} "
                                 "(expected '<!-- generated: NAME -->' or '<!-- end: NAME -->')")
            continue
        kind, name = marker.groups()
        if kind == "generated":
            if open_name is not None:
                raise BlockError(f"line {index + 1}: block {name!r} starts inside block {open_name!r} "
                                 f"(opened on line {open_line + 1})")
            if name in spans:
                raise BlockError(f"line {index + 1}: block {name!r} appears twice")
            open_name, open_line = name, index
        else:
            if name != open_name:
                raise BlockError(f"line {index + 1}: '<!-- end: {name} -->' without its "
                                 f"'<!-- generated: {name} -->'"
                                 + (f" (block {open_name!r} is open)" if open_name else ""))
            spans[name] = (open_line + 1, index)
            open_name = None
    if open_name is not None:
        raise BlockError(f"line {open_line + 1}: block {open_name!r} has no '<!-- end: {open_name} -->'")
    return spans


def block_names(text: str) -> list[str]:
    """The names of the generated blocks in ``text``, in order of appearance."""
    spans = _blocks(text)
    return sorted(spans, key=lambda name: spans[name][0])


def read_block(text: str, name: str) -> str:
    """The lines between ``<!-- generated: name -->`` and ``<!-- end: name -->`` (no trailing
    newline); BlockError when the block is not there."""
    spans = _blocks(text)
    if name not in spans:
        raise BlockError(f"no block '<!-- generated: {name} -->' … '<!-- end: {name} -->'")
    start, end = spans[name]
    return "\n".join(text.split("\n")[start:end])


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines of block ``name`` replaced by ``body`` (its trailing newlines
    dropped; the markers and everything outside them unchanged). ``read_block`` of the result
    is ``body`` without trailing newlines. BlockError when the block is not there or ``body``
    contains a marker line."""
    body = body.rstrip("\n")
    for line in body.split("\n"):
        if re.match(r"^<!-- (generated|end):", line):
            raise BlockError(f"the text for block {name!r} contains a marker line {line!r}")
    spans = _blocks(text)
    if name not in spans:
        raise BlockError(f"no block '<!-- generated: {name} -->' … '<!-- end: {name} -->'")
    start, end = spans[name]
    lines = text.split("\n")
    return "\n".join(lines[:start] + ([body] if body else []) + lines[end:])


def write_or_check_block(path: str, name: str, body: str, check: bool, remedy: str) -> int:
    """What a generator's ``--write FILE`` / ``--check FILE`` does with the fresh ``body`` of block
    ``name``: check: 0 when the file's block is ``body`` already, else print the unified diff and
    ``remedy`` (the command that rewrites it) and return 1; write: replace the block in the file
    (atomically, :func:`pfc.files.write_atomic`) and return 0."""
    from pfc.files import write_atomic

    with open(path, encoding="utf-8") as f:
        current = f.read()
    updated = replace_block(current, name, body)
    if check:
        if updated == current:
            print(f"{path}: the {name} block is up to date")
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), updated.splitlines(True), path,
                                                   f"{path} (regenerated)"))
        print(f"{path}: the {name} block is stale: run {remedy}", file=sys.stderr)
        return 1
    write_atomic(path, updated)
    print(f"{path}: {name} block written")
    return 0
