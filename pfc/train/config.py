"""The trainer's configuration: typed dataclasses, recipe files, and command-line overrides.

    config = load_config("configs/ms1mv3_r50.py", ["--lr", "0.05", "--margin.m2", "0.4"])
    config = apply_manifest(config, manifest)      # num_classes / num_samples from dataset.json

A recipe file is Python that builds ``config = TrainConfig(...)`` with only the fields that differ
from the defaults below. Overrides are ``--field value``, ``--field=value`` or ``field=value``;
nested fields use dotted names (``--margin.m2 0.4``). An unknown field or a value of the wrong type
raises ValueError naming the field.
"""
from __future__ import annotations

import dataclasses
import os
import runpy
import typing
from dataclasses import dataclass, field

MARGIN_KINDS = ("combined", "sphereface")
OPTIMIZERS = ("sgd", "adamw")
ENGINES = ("ddp", "deepspeed")
LR_SCHEDULES = ("poly", "cosine", "constant")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class MarginConfig:
    """Margin on the target logit; see DESIGN.md "Margins".

    ``kind="combined"``: cos(m1·θ + m2) − m3, scaled by s (ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.4)).
    ``kind="sphereface"``: multiplicative margin m1 (an integer) with λ-annealing
    λ = max(base·(1 + gamma·iteration)^(−power), lambda_min).
    ``fallback="insightface"``: ArcFace past θ + m2 > π uses c − m2·sin(m2) instead of the capped
    angle; ``straight_through``: margin in the forward value only, gradient that of s·c.
    """

    kind: str = "combined"
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0
    fallback: str = "cap"
    straight_through: bool = False


@dataclass
class TrainConfig:
    """Every knob of a training run; defaults are insightface's ArcFace-R50 recipe on 8 GPUs."""

    # data
    data: str = ""                    # folder with the shards and dataset.json
    output: str = "runs/default"
    num_classes: int = 0              # 0: taken from dataset.json; otherwise must agree with it
    num_samples: int = 0              # 0: taken from dataset.json; otherwise must agree with it
    num_workers: int = 2              # data-loader workers per rank
    augment: bool = True              # random horizontal flip in the loader
    # model
    network: str = "iresnet50"
    embedding_size: int = 512
    dropout: float = 0.0
    precision: str = "fp32"           # fp16 / bf16: autocast of the backbone on GPU
    # head (Partial FC)
    margin: MarginConfig = field(default_factory=MarginConfig)
    sample_rate: float = 1.0
    interclass_filter: float = 0.0    # > 0: leave non-target cosines above it out of the softmax
    mhe_weight: float = 0.0           # > 0: add weight·MHE energy on the sampled centers (SphereFace+)
    mhe_kernel: str = "euclidean"     # euclidean | log | angular
    mhe_power: float = 2.0
    triplet_weight: float = 0.0       # > 0: add weight·angular triplet term on the gathered batch
    triplet_m: int = 2
    # optimisation
    batch_size: int = 128             # per rank, per micro-batch
    grad_accumulation: int = 1        # micro-batches per optimizer step
    optimizer: str = "sgd"            # backbone optimizer; the centers use head.optimizer (SGD)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_epochs: int = 20
    max_steps: int = 0                # optimizer steps; 0: num_epochs × steps per epoch
    warmup_steps: int = 0
    lr_schedule: str = "poly"
    lr_power: float = 2.0             # exponent of the polynomial decay
    min_lr: float = 0.0
    grad_clip: float = 5.0            # max L2 norm of the backbone gradient; 0 disables
    # bookkeeping
    seed: int = 2048
    log_every: int = 10
    eval_every: int = 0               # 0: evaluate only at the end
    save_every: int = 0               # checkpoint period in steps; 0: none (a stop signal still saves)
    resume: str = ""                  # "auto" (newest complete checkpoint in output) | PATH | "" (fresh)
    keep_checkpoints: int = 3         # newest complete checkpoints kept in output
    max_nonfinite_skips: int = 5      # stop (with a checkpoint) after this many non-finite losses in a row; 0: never
    # backbone engine
    engine: str = "ddp"               # "ddp" | "deepspeed" (ZeRO-1/2, see README "DeepSpeed")
    deepspeed_config: str = ""        # DeepSpeed JSON file (ZeRO stage, bf16, …); "" = ZeRO-1 defaults
    val_pairs: str = ""               # pairs list ``path1 path2 1|0`` …
    val_root: str = ""                # … with paths relative to this folder (default: the list's)
    val_bins: tuple[str, ...] = ()    # insightface .bin sets (comma-separated on the command line)
    eval_batch_size: int = 64


def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _convert(name: str, text: str, annotation):
    """Parse the command-line string ``text`` as ``annotation`` (int, float, str, bool, tuple[str, ...])."""
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected a boolean (true/false), got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name}: expected a number, got {text!r}") from None
    if annotation is str:
        return text
    if typing.get_origin(annotation) is tuple:
        return tuple(part for part in text.split(",") if part)
    raise ValueError(f"--{name}: cannot be set from the command line (type {annotation})")


def _check_type(name: str, value, annotation) -> None:
    """Raise ValueError when ``value`` is not of the field's type (int accepted for float)."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, annotation):
            raise ValueError(f"config field {name!r}: expected {annotation.__name__}, got {type(value).__name__}")
        return
    if typing.get_origin(annotation) is tuple:
        ok = isinstance(value, tuple) and all(isinstance(item, str) for item in value)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise ValueError(f"config field {name!r}: expected {_type_name(annotation)}, "
                         f"got {type(value).__name__} {value!r}")


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``["--lr", "0.1", "--margin.m2=0.4", "seed=3"]`` → ``[("lr", "0.1"), ("margin.m2", "0.4"), ("seed", "3")]``."""
    pairs, index = [], 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--"):
            key = token[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            else:
                if index + 1 >= len(argv):
                    raise ValueError(f"--{key}: missing value")
                index += 1
                value = argv[index]
        elif "=" in token:
            key, value = token.split("=", 1)
        else:
            raise ValueError(f"unexpected argument {token!r}: overrides are '--field value' or 'field=value'")
        if not key:
            raise ValueError(f"empty field name in {token!r}")
        pairs.append((key, value))
        index += 1
    return pairs


def apply_overrides(config: TrainConfig, overrides: list[tuple[str, str]]) -> TrainConfig:
    """A copy of ``config`` with each ``(dotted_name, text)`` override parsed to its field's type."""
    config = dataclasses.replace(config, margin=dataclasses.replace(config.margin))
    for dotted, text in overrides:
        target, parts = config, dotted.split(".")
        for depth, part in enumerate(parts):
            types = _field_types(type(target))
            if part not in types:
                prefix = ".".join(parts[:depth])
                known = ", ".join(f"{prefix + '.' if prefix else ''}{name}" for name in types)
                raise ValueError(f"unknown config field {dotted!r} (known: {known})")
            if depth < len(parts) - 1:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    raise ValueError(f"config field {'.'.join(parts[:depth + 1])!r} has no sub-fields ({dotted!r})")
            else:
                if dataclasses.is_dataclass(types[part]):
                    raise ValueError(f"config field {dotted!r} is a group: set its fields, e.g. --{dotted}.NAME")
                setattr(target, part, _convert(dotted, text, types[part]))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Check every field's type and the allowed values; ValueError naming the first bad field."""
    for cls_name, obj in (("", config), ("margin.", config.margin)):
        for name, annotation in _field_types(type(obj)).items():
            _check_type(cls_name + name, getattr(obj, name), annotation)
    choices = {"margin.kind": (config.margin.kind, MARGIN_KINDS),
               "margin.fallback": (config.margin.fallback, ("cap", "insightface")),
               "mhe_kernel": (config.mhe_kernel, ("euclidean", "log", "angular")), "optimizer": (config.optimizer, OPTIMIZERS),
               "engine": (config.engine, ENGINES),
               "lr_schedule": (config.lr_schedule, LR_SCHEDULES), "precision": (config.precision, PRECISIONS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config field {name!r}: {value!r} is not one of {', '.join(allowed)}")
    positive = ("embedding_size", "batch_size", "grad_accumulation", "num_epochs", "log_every", "eval_batch_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"config field {name!r} must be ≥ 1, got {getattr(config, name)}")
    non_negative = ("interclass_filter", "mhe_weight", "triplet_weight", "num_classes", "num_samples", "num_workers", "max_steps", "warmup_steps", "eval_every",
                    "save_every", "keep_checkpoints", "max_nonfinite_skips", "grad_clip", "weight_decay", "min_lr", "momentum")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ValueError(f"config field {name!r} must be ≥ 0, got {getattr(config, name)}")
    if config.margin.kind == "sphereface" and (config.margin.m1 != int(config.margin.m1) or config.margin.m1 < 1):
        raise ValueError(f"config field 'margin.m1': SphereFace needs a positive integer, got {config.margin.m1}")
    if not 0.0 < config.sample_rate <= 1.0:
        raise ValueError(f"config field 'sample_rate' must be in (0, 1], got {config.sample_rate}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config field 'dropout' must be in [0, 1), got {config.dropout}")
    if config.lr <= 0:
        raise ValueError(f"config field 'lr' must be > 0, got {config.lr}")
    if config.max_steps and config.warmup_steps >= config.max_steps:
        raise ValueError(f"config field 'warmup_steps' ({config.warmup_steps}) must be smaller than "
                         f"max_steps ({config.max_steps})")


def load_config(path: str | None, argv: list[str] = ()) -> TrainConfig:
    """Load the recipe file ``path`` (or the defaults when None) and apply the overrides in ``argv``."""
    if path is None:
        config = TrainConfig()
    else:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} does not exist")
        try:
            namespace = runpy.run_path(path)
        except TypeError as exc:  # a misspelt field in TrainConfig(...)
            raise ValueError(f"{path}: {exc}") from exc
        config = namespace.get("config")
        if not isinstance(config, TrainConfig):
            raise ValueError(f"{path} must define 'config = TrainConfig(...)'")
    validate(config)
    return apply_overrides(config, parse_overrides(list(argv)))


def apply_manifest(config: TrainConfig, manifest: dict, source: str = "dataset.json") -> TrainConfig:
    """Fill num_classes / num_samples from the shards' manifest; a set value that disagrees is an error."""
    updates = {}
    for name in ("num_classes", "num_samples"):
        if name not in manifest:
            raise ValueError(f"{source} has no {name!r}")
        actual, configured = int(manifest[name]), getattr(config, name)
        if configured and configured != actual:
            raise ValueError(f"config {name}={configured} disagrees with {source} ({name}={actual}); "
                             f"remove it from the config or use the matching shards")
        updates[name] = actual
    return dataclasses.replace(config, **updates)


def to_dict(config: TrainConfig) -> dict:
    """Plain, JSON-ready dict of the resolved config (nested dataclasses as dicts, tuples as lists)."""
    return dataclasses.asdict(config)
