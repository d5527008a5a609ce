"""The job a plan is for, and the trainer configuration that runs it.

    job = Job(num_classes=parse_count("100M"), gpus=8, network="iresnet100", batch_size=128,
              sample_rate=0.1, precision="bf16", center_dtype="bf16")
    config = train_config(job)        # a checked pfc.train.config.TrainConfig

Every check raises :class:`pfc.errors.ConfigError` naming the bad value.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from pfc.errors import ConfigError
from pfc.head.chunking import auto_chunk_rows
from pfc.head.kernels import KERNEL_CHOICES
from pfc.head.row_optimizer import CENTER_OPTIMIZERS
from pfc.head.softmax import LOGITS_MODES
from pfc.train.config import OPTIMIZERS, STORAGE_DTYPES, HeadConfig, TrainConfig, validate

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_COUNT = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbg]?)\s*$", re.IGNORECASE)
# the largest class count planned: 10^12 identities (2 PB of fp16 centers at D = 1024), beyond
# any job and where a plan's byte counts stop being exact in float64
MAX_CLASSES = 10**12
CENTER_DTYPES = ("fp32", "bf16", "fp16")


def parse_count(text: str, what: str = "count") -> int:
    """``"100M"`` → 100000000; accepts k/M/B suffixes and ``2e8``; a whole number in
    ``[1, MAX_CLASSES]``."""
    match = _COUNT.match(str(text))
    if not match:
        raise ConfigError(f"{what} {text!r} is not a number like 100M, 1.5B, 2e8 or 250000")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ConfigError(f"{what} {text!r} must be a whole number ≥ 1")
    if value > MAX_CLASSES:
        raise ConfigError(f"{what} {text!r} is more than {MAX_CLASSES:,}, the largest count the planner answers for")
    return int(value)


@dataclass(frozen=True)
class Job:
    """One data-parallel backbone + Partial-FC job: ``gpus`` ranks, ``batch_size`` per rank.
    ``kernels``: the head's kernels (``head.kernels``); "triton" is what a CUDA run with triton
    installed resolves "auto" to, so it is the default for a planned GPU job. ``chunk_rows``: the
    head's rows per chunk (``head.chunk_rows``); None or 0: automatic, as on a GPU.
    ``optimizer``: the backbone's ``optim.name`` (sgd: one momentum per parameter | adamw: two
    moments, as the ViT recipes). ``head_optimizer``: the centers' ``head.optimizer`` (sgd | adamw;
    the planner runs the real optimizers, so their states are what they allocate). ``logits``: the
    head's ``head.logits`` (keep the ``[S, B]`` block for the backward, or recompute it: one GEMM
    more; auto decides by memory, see :class:`pfc.head.PartialFC`). ``grad_checkpointing``: the
    backbone's ``backbone.grad_checkpointing`` (activations recomputed in the backward)."""

    num_classes: int
    gpus: int
    network: str = "iresnet100"
    batch_size: int = 128
    sample_rate: float = 0.1
    precision: str = "bf16"
    center_dtype: str = "fp32"
    head_optimizer: str = "sgd"
    optimizer: str = "sgd"
    engine: str = "ddp"
    kernels: str = "triton"
    embedding_size: int = 512
    image_size: int = 112
    chunk_rows: int | None = None
    logits: str = "auto"
    grad_checkpointing: bool = False

    @property
    def head_chunk_rows(self) -> int:
        """The sampled centers per chunk of the head's fused softmax on the simulated GPU:
        ``chunk_rows``, or when it is None/0 what the head picks on a GPU
        (:func:`pfc.head.chunking.auto_chunk_rows`: a 1 GiB scratch budget at ``batch_size · gpus``
        gathered columns, D = ``embedding_size``, the centers' storage type)."""
        if self.chunk_rows:
            return self.chunk_rows
        storage = STORAGE_DTYPES.get(self.center_dtype, STORAGE_DTYPES["fp32"])
        # any device but the CPU gets the budget's rows; "meta" stands for the simulated GPU
        return auto_chunk_rows("meta", self.batch_size * self.gpus, self.embedding_size, storage)

    def with_classes(self, num_classes: int) -> Job:
        return dataclasses.replace(self, num_classes=num_classes)


def centers_configurable() -> bool:
    """Whether this pfc can store the centers in another type than fp32 (``head.center_dtype``)."""
    return any(f.name == "center_dtype" for f in dataclasses.fields(HeadConfig))


def train_config(job: Job) -> TrainConfig:
    """The trainer configuration of ``job`` (checked as ``launch/train.py`` checks it)."""
    if job.gpus < 1:
        raise ConfigError(f"--gpus must be ≥ 1, got {job.gpus}")
    if job.num_classes < job.gpus:
        raise ConfigError(f"{job.num_classes} classes cannot be sharded over {job.gpus} GPUs (fewer than one each)")
    if job.center_dtype not in CENTER_DTYPES:
        raise ConfigError(f"--center-dtype {job.center_dtype!r} is not one of {', '.join(CENTER_DTYPES)}")
    if job.head_optimizer not in CENTER_OPTIMIZERS:
        raise ConfigError(f"--head-optimizer {job.head_optimizer!r} is not one of {', '.join(CENTER_OPTIMIZERS)}")
    if job.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {job.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if job.kernels not in KERNEL_CHOICES:
        raise ConfigError(f"--kernels {job.kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if job.logits not in LOGITS_MODES:
        raise ConfigError(f"--logits {job.logits!r} is not one of {', '.join(LOGITS_MODES)}")
    if job.chunk_rows is not None and job.chunk_rows < 0:
        raise ConfigError(f"--chunk-rows must be ≥ 0 (0: automatic), got {job.chunk_rows}")
    if job.engine != "ddp":
        raise ConfigError(f"--engine {job.engine!r}: the planner simulates the ddp engine only (DeepSpeed "
                          "does not initialise on fake tensors)")
    config = TrainConfig()
    config.data.num_classes = job.num_classes
    config.data.batch_size = job.batch_size
    config.data.num_workers = 0
    config.backbone.network = job.network
    config.backbone.precision = job.precision
    config.backbone.engine = job.engine
    config.backbone.embedding_size = job.embedding_size
    config.backbone.grad_checkpointing = job.grad_checkpointing
    config.head.sample_rate = job.sample_rate
    config.head.kernels = job.kernels
    config.head.chunk_rows = job.chunk_rows or 0
    config.head.logits = job.logits
    config.head.optimizer = job.head_optimizer
    config.optim.name = job.optimizer
    config.schedule.max_steps = 1000
    config.checkpoint.every_minutes = 0
    if centers_configurable():
        config.head.center_dtype = job.center_dtype
    elif job.center_dtype != "fp32":
        raise ConfigError(f"--center-dtype {job.center_dtype}: this pfc stores the centers in fp32 only "
                          "(no head.center_dtype yet)")
    validate(config)
    return config
