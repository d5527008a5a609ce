"""The trainer's configuration: one typed dataclass per component, recipe files, overrides.

    config = load_config("configs/ms1mv3_r50.py", ["--lr", "0.05", "--head.margin.m2", "0.4"])
    config = apply_dataset(config, num_classes, num_samples, source)   # from the shards' manifest
    margin = config.head.margin.build()                               # each component from its config

A recipe file is Python that builds ``config = TrainConfig(...)`` with only what differs from the
defaults below. Overrides are ``--path value``, ``--path=value`` or ``path=value`` with a field's
dotted path (``--head.mhe.half_space true``) or its flat name in the earlier config
(:data:`ALIASES`: ``--lr``, ``--data DIR``, ``--margin.m2``). The string under each field is its
meaning, printed by ``launch/train.py --help``. :func:`validate` checks types (numbers finite),
the rules of no single component, and builds each component so that its own checks run (once, in
the component), naming the config field in a :class:`pfc.errors.ConfigError`.
"""
from __future__ import annotations

import dataclasses
import os
import runpy
from dataclasses import dataclass, field

import torch

from pfc.backbones import available_backbones, supports_grad_checkpointing
from pfc.data.augment import Augmentation
from pfc.errors import ConfigError
from pfc.evaluation.ijb.meta import TARGETS as IJB_TARGETS
from pfc.head.optim import SparseRowSGD
from pfc.head.row_optimizer import CENTER_OPTIMIZERS
from pfc.train import cli
from pfc.train.head_config import ROUNDINGS, STORAGE_DTYPES, HeadConfig, MarginConfig  # noqa: F401 (re-exported)
from pfc.train.schedule import LRSchedule

ENGINES = ("ddp", "deepspeed")
PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adamw")
SAMPLERS = ("shuffle", "pk")
AUGMENTATION_FIELDS = tuple(field.name for field in dataclasses.fields(Augmentation))   # DataConfig has each


@dataclass
class DataConfig:
    """Training data: the shards and the loader."""

    root: str = ""
    """folder (or URL) with the webdataset shards and dataset.json"""
    batch_size: int = 128
    """images per rank per micro-batch"""
    num_workers: int = 2
    """data-loader worker processes per rank"""
    augment: bool = True
    """random horizontal flip in the loader"""
    num_classes: int = 0
    """identities; 0: taken from dataset.json (a set value must agree with it)"""
    num_samples: int = 0
    """training images; 0: taken from dataset.json (a set value must agree with it)"""
    sampler: str = "shuffle"
    """shuffle: shards in windows | pk: pk_k images of each of batch_size/pk_k identities (local shards + index)"""
    pk_k: int = 4
    """images per identity in a P×K batch (sampler pk; must divide batch_size)"""
    # augmentation besides the flip (pfc.data.augment): a probability per image each, 0 = off;
    # insightface's DALI recipe: low_resolution 0.1, blur 0.2, color_jitter 0.2, grayscale 0.1
    random_resized_crop: float = 0.0
    """probability of a random resized crop (area fraction crop_scale, aspect ratio crop_ratio), back to full size"""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """the crop's area as a fraction of the image's"""
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    """the crop's width / height (log-uniform)"""
    low_resolution: float = 0.0
    """probability of shrinking the image by a factor in low_resolution_factor and resizing it back"""
    low_resolution_factor: tuple[float, float] = (0.5, 0.8)
    """the side of the shrunk image as a fraction of the original's"""
    blur: float = 0.0
    """probability of a Gaussian blur of sigma in blur_sigma (pixels)"""
    blur_sigma: tuple[float, float] = (0.8, 0.8)
    """the blur's sigma in pixels (0.8: DALI's for insightface's 3x3 window)"""
    color_jitter: float = 0.0
    """probability of a colour jitter: brightness, contrast, saturation factors and hue shift from their ranges"""
    brightness: tuple[float, float] = (1.0, 1.0)
    """colour jitter's brightness factor"""
    contrast: tuple[float, float] = (1.0, 1.0)
    """colour jitter's contrast factor (about the image's mean luma)"""
    saturation: tuple[float, float] = (1.0, 1.2)
    """colour jitter's saturation factor"""
    hue: tuple[float, float] = (0.0, 20.0)
    """colour jitter's hue shift in degrees"""
    grayscale: float = 0.0
    """probability of replacing the image by its luma (ITU-R BT.601)"""

    def augmentation(self) -> Augmentation:
        """The loader's :class:`pfc.data.augment.Augmentation` of these fields (ValueError naming
        the field for a probability outside [0, 1] or a bad range)."""
        return Augmentation(**{name: getattr(self, name) for name in AUGMENTATION_FIELDS})

    def check(self) -> None:
        """The sampler's own rules: a known sampler, and K dividing the batch for P×K."""
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"config field 'data.sampler': {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.sampler == "pk" and (self.pk_k < 1 or self.batch_size % self.pk_k):
            raise ConfigError(f"--sampler pk needs batch_size divisible by pk_k: batch_size {self.batch_size} "
                              f"is not a multiple of pk_k {self.pk_k}")


@dataclass
class BackboneConfig:
    """The data-parallel network: image → embedding."""

    network: str = "iresnet50"
    """registered backbone: iresnet18/34/50/100/200, mbf, mbf_large (insightface's MobileFaceNet),
    mobilefacenet, vit_t/s/b/l/h (and insightface's vit_* names), tiny"""
    embedding_size: int = 512
    """dimension D of the embedding"""
    dropout: float = 0.0
    """dropout on the last feature map, in [0, 1)"""
    precision: str = "fp32"
    """fp32 | fp16 | bf16: autocast of the backbone (GPU only)"""
    engine: str = "ddp"
    """ddp | deepspeed (ZeRO-1/2, see README "DeepSpeed")"""
    deepspeed_config: str = ""
    """DeepSpeed JSON file (ZeRO stage, bf16, …); "": ZeRO-1 defaults"""
    grad_checkpointing: bool = False
    """recompute activations in the backward, per residual unit / transformer block (iresnet*, vit_*): less memory, one forward more"""
    init: str = ""
    """fine-tuning: a backbone.pt (or a run's output folder) whose weights a fresh run starts from (not on resume)"""
    freeze_steps: int = 0
    """fine-tuning: the first N optimizer steps train only the head (backbone in eval mode, not updated)"""


@dataclass
class OptimConfig:
    """Optimizers: the backbone's (SGD or AdamW) and the centers' row-sparse SGD."""

    name: str = "sgd"
    """backbone optimizer: sgd | adamw (the centers': head.optimizer)"""
    lr: float = 0.1
    """base learning rate of the backbone, and of the centers unless head.lr is set"""
    momentum: float = 0.9
    """SGD momentum, in [0, 1) (the backbone's, and the centers' with head.optimizer sgd)"""
    weight_decay: float = 5e-4
    """weight decay on every parameter, and on the centers unless head.weight_decay is set"""
    grad_clip: float = 5.0
    """max L2 norm of the backbone gradient; 0: off"""
    grad_accumulation: int = 1
    """micro-batches per optimizer step"""

    def check(self) -> None:
        """The center optimizer's own checks (lr, momentum, weight decay), on a 1×1 parameter."""
        SparseRowSGD([torch.zeros(1, 1)], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


@dataclass
class ScheduleConfig:
    """Length of the run and the learning-rate schedule (per optimizer step)."""

    num_epochs: int = 20
    """epochs to train when max_steps is 0"""
    max_steps: int = 0
    """optimizer steps to train; 0: num_epochs × steps per epoch"""
    warmup_steps: int = 0
    """linear warmup steps, fewer than the run's steps"""
    kind: str = "poly"
    """after warmup: poly | cosine | constant"""
    power: float = 2.0
    """exponent of the polynomial decay"""
    min_lr: float = 0.0
    """floor of the decayed learning rate"""

    def build(self, total_steps: int, lr: float, start_step: int = 0) -> LRSchedule:
        """The multiplier of ``lr`` per step over a run of ``total_steps`` steps; 0 before
        ``start_step`` (a frozen backbone), the warmup and decay spanning the steps after it."""
        return LRSchedule(total_steps, self.warmup_steps, self.kind, self.power, self.min_lr / lr, start_step)


@dataclass
class EvalConfig:
    """Verification during and after training (insightface's protocol)."""

    pairs: str = ""
    """pairs list: lines 'path1 path2 1|0'"""
    root: str = ""
    """folder the pairs list's paths are relative to; "": the list's folder"""
    bins: tuple[str, ...] = ()
    """insightface .bin verification sets (comma-separated on the command line)"""
    every: int = 0
    """evaluate every this many steps; 0: only at the end"""
    batch_size: int = 64
    """images per evaluation batch"""
    ijb: str = ""
    """IJB-B/C root in insightface's layout (meta/, loose_crop/): also log the 1:1 TAR at ijb_far"""
    ijb_target: str = "IJBC"
    """IJBC | IJBB: which protocol of the ijb root"""
    ijb_far: float = 1e-4
    """the FAR at which the IJB 1:1 TAR is logged (insightface's nearest ROC point)"""


@dataclass
class CheckpointConfig:
    """Checkpoints in the output folder, resume, and the non-finite-loss guard."""

    every: int = 0
    """checkpoint period in steps; 0: none (a stop signal still saves)"""
    every_minutes: float = 30.0
    """checkpoint period in minutes of wall time (rank 0's clock); 0: none"""
    keep: int = 3
    """newest complete checkpoints kept"""
    resume: str = ""
    """auto: the newest complete checkpoint in output | PATH | "": a fresh start"""
    max_nonfinite_skips: int = 5
    """stop (with a checkpoint) after this many non-finite losses in a row; 0: never"""


@dataclass
class TrainConfig:
    """Every knob of a training run; defaults are insightface's ArcFace-R50 recipe on 8 GPUs."""

    output: str = "runs/default"
    """folder for config.json, metrics, checkpoints and the exported backbone"""
    overwrite: bool = False
    """a fresh run into an output folder holding another run's files first removes them"""
    seed: int = 2048
    """seed of the initialisation, the sampling and the data order"""
    log_every: int = 10
    """log metrics every this many steps"""
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


ALIASES: dict[str, str] = {
    # the flat names of the earlier TrainConfig → dotted paths; output, seed, log_every are unchanged.
    # "margin" is a prefix: margin.X → head.margin.X. "data" alone is data.root; data.X is the group.
    "data": "data.root", "batch_size": "data.batch_size", "num_workers": "data.num_workers",
    "augment": "data.augment", "num_classes": "data.num_classes", "num_samples": "data.num_samples",
    "sampler": "data.sampler", "pk_k": "data.pk_k",
    "network": "backbone.network", "embedding_size": "backbone.embedding_size", "dropout": "backbone.dropout",
    "precision": "backbone.precision", "engine": "backbone.engine", "deepspeed_config": "backbone.deepspeed_config",
    "margin": "head.margin", "sample_rate": "head.sample_rate", "interclass_filter": "head.interclass_filter",
    "mhe_weight": "head.mhe.weight", "mhe_kernel": "head.mhe.kernel", "mhe_power": "head.mhe.power",
    "triplet_weight": "head.triplet.weight", "triplet_m": "head.triplet.m",
    "optimizer": "optim.name", "lr": "optim.lr", "momentum": "optim.momentum",
    "weight_decay": "optim.weight_decay", "grad_clip": "optim.grad_clip", "grad_accumulation": "optim.grad_accumulation",
    "num_epochs": "schedule.num_epochs", "max_steps": "schedule.max_steps", "warmup_steps": "schedule.warmup_steps",
    "lr_schedule": "schedule.kind", "lr_power": "schedule.power", "min_lr": "schedule.min_lr",
    "val_pairs": "eval.pairs", "val_root": "eval.root", "val_bins": "eval.bins", "eval_every": "eval.every",
    "eval_batch_size": "eval.batch_size",
    "save_every": "checkpoint.every", "save_every_minutes": "checkpoint.every_minutes",
    "keep_checkpoints": "checkpoint.keep", "resume": "checkpoint.resume",
    "max_nonfinite_skips": "checkpoint.max_nonfinite_skips",
}

# short flags of newer fields, and fields that moved (kept working where they were)
FLAGS: dict[str, str] = {
    "center_dtype": "head.center_dtype",
    "init_backbone": "backbone.init", "freeze_backbone_steps": "backbone.freeze_steps",
    "optim.head_momentum_dtype": "head.momentum_dtype",   # the momentum's type was set there before center_dtype
}


def validate(config: TrainConfig) -> None:
    """Check every field's type (numbers finite), the rules of no single component, and each
    component's own checks by building it; ConfigError naming the first bad field."""
    cli.check_types(config)
    for path, value, allowed in (("backbone.engine", config.backbone.engine, ENGINES),
                                 ("backbone.precision", config.backbone.precision, PRECISIONS),
                                 ("optim.name", config.optim.name, OPTIMIZERS),
                                 ("head.center_dtype", config.head.center_dtype, tuple(STORAGE_DTYPES)),
                                 ("head.momentum_dtype", config.head.momentum_dtype, ("", *STORAGE_DTYPES)),
                                 ("head.rounding", config.head.rounding, ROUNDINGS),
                                 ("head.optimizer", config.head.optimizer, CENTER_OPTIMIZERS)):
        if value not in allowed:
            raise ConfigError(f"config field {path!r}: {value!r} is not one of {', '.join(allowed)}")
    at_least = {"data.batch_size": 1, "optim.grad_accumulation": 1, "schedule.num_epochs": 1, "log_every": 1,
                "eval.batch_size": 1, "data.pk_k": 1, "data.num_workers": 0, "data.num_classes": 0, "data.num_samples": 0,
                "schedule.max_steps": 0, "eval.every": 0, "checkpoint.every": 0, "checkpoint.every_minutes": 0,
                "checkpoint.keep": 0, "checkpoint.max_nonfinite_skips": 0, "optim.grad_clip": 0,
                "backbone.freeze_steps": 0}
    for path, minimum in at_least.items():
        value = cli.get_path(config, path)
        if value < minimum:
            raise ConfigError(f"config field {path!r} must be ≥ {minimum}, got {value}")
    config.data.check()
    if config.eval.ijb_target not in IJB_TARGETS:
        raise ConfigError(f"config field 'eval.ijb_target': {config.eval.ijb_target!r} is not one of "
                          f"{', '.join(IJB_TARGETS)}")
    if not 0.0 < config.eval.ijb_far < 1.0:
        raise ConfigError(f"config field 'eval.ijb_far' must be in (0, 1), got {config.eval.ijb_far}")
    if not config.optim.lr > 0:
        raise ConfigError(f"config field 'optim.lr' must be > 0, got {config.optim.lr}")
    if config.backbone.network not in available_backbones():
        raise ConfigError(f"config field 'backbone.network': unknown network {config.backbone.network!r}; "
                          f"known: {', '.join(available_backbones())}")
    if config.backbone.grad_checkpointing and not supports_grad_checkpointing(config.backbone.network):
        raise ConfigError(f"config field 'backbone.grad_checkpointing': network {config.backbone.network!r} has no "
                          "gradient checkpointing (iresnet* and vit_* have)")
    if not 0.0 <= config.backbone.dropout < 1.0:
        raise ConfigError(f"config field 'backbone.dropout' must be in [0, 1), got {config.backbone.dropout}")
    head, schedule, lr = config.head, config.schedule, config.optim.lr
    # the run's length is known only with the dataset unless max_steps is set: check warmup against it then
    total_steps = schedule.max_steps or max(schedule.warmup_steps, 0) + 1
    components = (  # (group, its component's checks, parameters its messages name → other fields)
        ("data", config.data.augmentation, {}),
        ("head.margin", head.margin.build, {"m": "m1"}),
        ("head.mhe", lambda: dataclasses.replace(head.mhe), {}),
        ("head.triplet", lambda: dataclasses.replace(head.triplet), {}),
        ("head", lambda: head.check(config.backbone.embedding_size), {"embedding_size": "backbone.embedding_size",
                                                                        "moment_dtype": "momentum_dtype"}),
        ("optim", config.optim.check, {"learning rate": "lr"}),
        ("schedule", lambda: schedule.build(total_steps, lr), {"total_steps": "max_steps", "min_ratio": "min_lr"}))
    for group, check, renames in components:
        cli.check_component(config, group, check, renames)
    if schedule.max_steps:  # otherwise the run's length is known only with the dataset (build_train_state)
        check_freeze(config, schedule.max_steps)


def check_freeze(config: TrainConfig, total_steps: int) -> None:
    """ConfigError unless the backbone keeps steps to train after its frozen ones and its warmup
    (``backbone.freeze_steps + schedule.warmup_steps < total_steps``): its schedule (warmup,
    decay) spans the steps after the frozen ones."""
    frozen, warmup = config.backbone.freeze_steps, config.schedule.warmup_steps
    if frozen and frozen + warmup >= total_steps:
        raise ConfigError(f"config field 'backbone.freeze_steps': {frozen} frozen steps and {warmup} warmup steps "
                          f"(schedule.warmup_steps) leave the backbone no step to train in a run of {total_steps} "
                          f"steps (its warmup and decay run after the frozen steps)")


def load_config(path: str | None, argv: list[str] = ()) -> TrainConfig:
    """Load the recipe file ``path`` (or the defaults when None) and apply the overrides in ``argv``."""
    if path is None:
        config = TrainConfig()
    else:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            namespace = runpy.run_path(path)
        except TypeError as exc:  # a misspelt field in TrainConfig(...)
            raise ConfigError(f"{path}: {exc}") from exc
        config = namespace.get("config")
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"{path} must define 'config = TrainConfig(...)'")
    validate(config)
    config = cli.apply_overrides(config, cli.parse_overrides(list(argv)), {**ALIASES, **FLAGS})
    validate(config)
    return config


def apply_dataset(config: TrainConfig, num_classes: int, num_samples: int, source: str) -> TrainConfig:
    """A copy of ``config`` with data.num_classes / data.num_samples from the dataset read at
    ``source``; a configured (non-zero) value that disagrees raises ConfigError."""
    for name, actual in (("num_classes", num_classes), ("num_samples", num_samples)):
        configured = getattr(config.data, name)
        if configured and configured != actual:
            raise ConfigError(f"config {name}={configured} disagrees with {source} ({name}={actual}); "
                              f"remove it from the config or use the matching shards")
    data = dataclasses.replace(config.data, num_classes=int(num_classes), num_samples=int(num_samples))
    return dataclasses.replace(config, data=data)


def to_dict(config: TrainConfig) -> dict:
    """Plain, JSON-ready nested dict of the resolved config (groups as dicts, tuples as lists)."""
    return dataclasses.asdict(config, dict_factory=lambda pairs: {
        key: list(value) if isinstance(value, tuple) else value for key, value in pairs})


def help_text(config: TrainConfig) -> str:
    """Every field of ``config`` by component: dotted name, type, value (the default, or the
    recipe's), meaning; then the legacy flat names."""
    return cli.help_text(config, {**ALIASES, **FLAGS})
