"""Typed, documented dataclasses on the command line: overrides, type checks and ``--help``.

Works on any tree of dataclasses (``pfc.train.config.TrainConfig`` is one). A leaf field is
addressed by its dotted path (``head.margin.m2``); its documentation is the string literal right
under it in the class body (an attribute docstring), read with :mod:`ast` from the class source.

    pairs = parse_overrides(["--lr", "0.1", "--head.margin.m2=0.4", "seed=3"])
    config = apply_overrides(config, pairs, aliases={"lr": "optim.lr"})

Everything here raises :class:`pfc.errors.ConfigError` naming the field.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
import types
import typing

from pfc.errors import ConfigError


@functools.cache
def field_types(cls) -> dict[str, object]:
    """``{field name: resolved annotation}`` of the dataclass ``cls``."""
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """``{field name: attribute docstring}`` of the dataclass ``cls`` (the string under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def leaves(config, prefix: str = ""):
    """Yield ``(dotted path, owner object, field name, annotation)`` for every leaf field, in order."""
    for name, annotation in field_types(type(config)).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(annotation):
            yield from leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", config, name, annotation


def groups(config, prefix: str = "") -> list[str]:
    """Dotted paths of the nested dataclass fields (the groups), in order."""
    found = []
    for name, annotation in field_types(type(config)).items():
        if dataclasses.is_dataclass(annotation):
            found.append(prefix + name)
            found.extend(groups(getattr(config, name), f"{prefix}{name}."))
    return found


def _optional(annotation):
    """``X`` for an annotation ``X | None`` (a field whose None means "taken from elsewhere"), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1 and len(typing.get_args(annotation)) == 2:
            return rest[0]
    return None


def _is_range(annotation) -> bool:
    """``tuple[float, float]``: a (low, high) range, written ``LOW,HIGH`` on the command line."""
    return typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (float, float)


def _item_type(annotation):
    """The item type of ``tuple[X, ...]`` (``str`` or ``float``)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
    return args[0] if args else str


def type_name(annotation) -> str:
    """``int``, ``float``, ``str``, ``bool``, ``LOW,HIGH`` (two numbers), ``LIST`` (a
    comma-separated tuple of strings), ``FLOATS`` (of numbers), or ``float|none`` for an optional field."""
    inner = _optional(annotation)
    if inner is not None:
        return f"{type_name(inner)}|none"
    if _is_range(annotation):
        return "LOW,HIGH"
    if typing.get_origin(annotation) is tuple:
        return "FLOATS" if _item_type(annotation) is float else "LIST"
    return getattr(annotation, "__name__", str(annotation))


def convert(label: str, text: str, annotation):
    """Parse the command-line string ``text`` as ``annotation`` (int, float, str, bool,
    tuple[float, float] from ``LOW,HIGH``, tuple[str, ...], tuple[float, ...], or ``X | None``:
    ``none`` is None)."""
    inner = _optional(annotation)
    if inner is not None:
        return None if text.strip().lower() in ("none", "") else convert(label, text, inner)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{label}: expected a boolean (true/false), got {text!r}")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"--{label}: expected {kind}, got {text!r}") from None
    if annotation is str:
        return text
    if _is_range(annotation):
        parts = text.split(",")
        try:
            if len(parts) == 2:
                return float(parts[0]), float(parts[1])
        except ValueError:
            pass
        raise ConfigError(f"--{label}: expected two numbers LOW,HIGH, got {text!r}")
    if typing.get_origin(annotation) is tuple:
        parts = tuple(part for part in text.split(",") if part)
        if _item_type(annotation) is float:
            try:
                return tuple(float(part) for part in parts)
            except ValueError:
                raise ConfigError(f"--{label}: expected comma-separated numbers, got {text!r}") from None
        return parts
    raise ConfigError(f"--{label}: cannot be set from the command line (type {annotation})")


def check_type(path: str, value, annotation) -> None:
    """ConfigError unless ``value`` has the field's type (an int is accepted for a float; None
    for ``X | None``) and, for a number, is finite."""
    inner = _optional(annotation)
    if inner is not None:
        if value is not None:
            check_type(path, value, inner)
        return
    if _is_range(annotation):
        ok = (isinstance(value, tuple) and len(value) == 2
              and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value))
        if ok and not all(math.isfinite(item) for item in value):
            raise ConfigError(f"config field {path!r} must be two finite numbers, got {value!r}")
    elif typing.get_origin(annotation) is tuple:
        item = _item_type(annotation)
        accepted = (int, float) if item is float else item
        ok = isinstance(value, tuple) and all(isinstance(x, accepted) and not isinstance(x, bool) for x in value)
        if ok and item is float and not all(math.isfinite(x) for x in value):
            raise ConfigError(f"config field {path!r} must hold finite numbers, got {value!r}")
    elif annotation in (int, float):
        accepted = (int, float) if annotation is float else int
        ok = isinstance(value, accepted) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(f"config field {path!r} must be a finite number, got {value!r}")
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise ConfigError(f"config field {path!r}: expected {type_name(annotation)}, "
                          f"got {type(value).__name__} {value!r}")


def check_types(config, prefix: str = "") -> None:
    """:func:`check_type` on every field of the tree, groups included (a group must be its dataclass)."""
    for name, annotation in field_types(type(config)).items():
        value, path = getattr(config, name), prefix + name
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, annotation):
                raise ConfigError(f"config field {path!r}: expected {annotation.__name__}, got {type(value).__name__}")
            check_types(value, path + ".")
        else:
            check_type(path, value, annotation)


def parse_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """``["--lr", "0.1", "--head.margin.m2=0.4", "seed=3", "--overwrite"]``
    → ``[("lr", "0.1"), ("head.margin.m2", "0.4"), ("seed", "3"), ("overwrite", None)]``: a ``--name``
    last or followed by another ``--name`` has no value (a boolean field then means true)."""
    pairs, index = [], 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--"):
            key = token[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                value = None
            else:
                index += 1
                value = argv[index]
        elif "=" in token:
            key, value = token.split("=", 1)
        else:
            raise ConfigError(f"unexpected argument {token!r}: overrides are '--field value' or 'field=value'")
        if not key:
            raise ConfigError(f"empty field name in {token!r}")
        pairs.append((key, value))
        index += 1
    return pairs


def resolve(key: str, config, aliases: dict[str, str]) -> str:
    """The dotted path of the leaf field ``key`` names: itself when it is a leaf, else its alias
    (``data`` → ``data.root``), else its first part's alias when that is a group (``margin.m2`` →
    ``head.margin.m2``). ConfigError for a group or an unknown name, with the closest names."""
    paths = {path for path, *_ in leaves(config)}
    group_paths = set(groups(config))
    first, _, rest = key.partition(".")
    if key in paths:
        return key
    if key in aliases:
        key = aliases[key]
    elif rest and first in aliases and aliases[first] in group_paths:
        key = f"{aliases[first]}.{rest}"
    if key in paths:
        return key
    if key in group_paths:
        raise ConfigError(f"config field {key!r} is a group: set its fields, e.g. --{key}.NAME")
    close = difflib.get_close_matches(key, sorted(paths | set(aliases)), n=3, cutoff=0.6)
    close += [path for path in sorted(paths) if path.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else "; see --help"
    raise ConfigError(f"unknown config field {key!r}{hint}")


def apply_overrides(config, overrides: list[tuple[str, str | None]], aliases: dict[str, str]):
    """A deep copy of ``config`` with each ``(name, text)`` override parsed to its field's type
    (``text`` None: true for a boolean field, else a missing value)."""
    config = _deep_copy(config)
    owners = {path: (owner, name, annotation) for path, owner, name, annotation in leaves(config)}
    for key, text in overrides:
        path = resolve(key, config, aliases)
        owner, name, annotation = owners[path]
        label = key if key == path else f"{key} ({path})"
        if text is None and annotation is not bool:
            raise ConfigError(f"--{key}: missing value")
        setattr(owner, name, True if text is None else convert(label, text, annotation))
    return config


def _deep_copy(config):
    """A copy of the dataclass tree (each group copied; leaf values are immutable)."""
    changes = {field.name: _deep_copy(getattr(config, field.name)) for field in dataclasses.fields(config)
               if dataclasses.is_dataclass(getattr(config, field.name))}
    return dataclasses.replace(config, **changes)


def help_text(config, aliases: dict[str, str], width: int = 100) -> str:
    """Every leaf field of ``config`` grouped by its dataclass: ``--path TYPE (default VALUE)`` and
    its attribute docstring; then the legacy flat names and the fields they stand for."""
    lines, current_group = [], None
    for path, owner, name, annotation in leaves(config):
        group = path.rpartition(".")[0]
        if group != current_group:
            current_group = group
            title = (type(owner).__doc__ or "").strip().splitlines()[0]
            lines += ["", f"[{group or 'run'}] {title}"]
        value = getattr(owner, name)
        shown = ",".join(str(item) for item in value) if isinstance(value, tuple) else value
        lines.append(f"  --{path} {type_name(annotation)} (default: {shown!r})")
        doc = field_docs(type(owner)).get(name, "")
        lines += textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    legacy = ", ".join(f"--{old} → {new}" for old, new in aliases.items())
    lines += ["", "Flat names of the earlier config, still accepted (a prefix for a group: --margin.m2):"]
    lines += textwrap.wrap(legacy, width, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines).lstrip("\n")


def get_path(config, path: str):
    """The value at the dotted ``path`` of the dataclass tree ``config``."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


def check_component(config, group: str, check, renames: dict[str, str]) -> None:
    """Run ``check()`` (a component's own checks); a ValueError comes back as ConfigError naming
    the field of ``group`` behind the first parameter its message mentions: a leaf of the group
    by its name, or a name in ``renames`` (→ a field of the group, or a dotted path); the group
    itself when it mentions none."""
    try:
        check()
    except ValueError as exc:
        message = str(exc)
        owner = get_path(config, group)
        parameters = {name: name for name, kind in field_types(type(owner)).items() if not dataclasses.is_dataclass(kind)}
        parameters.update(renames)
        found = [(match.start(), target) for name, target in parameters.items()
                 if (match := re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message))]
        path = min(found)[1] if found else ""
        path = path if "." in path else f"{group}.{path}".rstrip(".")
        raise ConfigError(f"config field {path!r}: {message}") from exc
