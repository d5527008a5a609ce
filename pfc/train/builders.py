"""Small factories: each component of a training run built from the config.

``build_runner`` is the one place that picks the backbone's engine (DDP or DeepSpeed).
"""
from __future__ import annotations

import torch
from torch import nn

from pfc.backbones import build_backbone
from pfc.errors import ConfigError
from pfc.head.kernels import resolve_kernels
from pfc.head.row_optimizer import SparseRowOptimizer
from pfc.head.partial_fc import PartialFC
from pfc.train.cli import check_component
from pfc.train.config import TrainConfig, check_freeze
from pfc.train.runners.base import BackboneRunner
from pfc.train.runners.ddp import DDPRunner
from pfc.train.runtime import Runtime
from pfc.train.state import TrainState

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build_head(config: TrainConfig, runtime: Runtime) -> PartialFC:
    """PartialFC over ``data.num_classes`` centers, sharded over the default group (see
    :meth:`pfc.train.config.HeadConfig.build`)."""
    try:   # head.kernels is checked against the device only here (triton there, or its interpreter)
        resolve_kernels(config.head.kernels, runtime.device)
    except ValueError as error:
        raise ConfigError(f"config field 'head.kernels': {error}") from None
    return config.head.build(config.data.num_classes, config.backbone.embedding_size, seed=config.seed,
                             device=runtime.device)


def build_backbone_optimizer(config: TrainConfig, backbone: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay on every parameter, as the recipes) or AdamW over the backbone.

    Under the DDP engine the fused implementation (one kernel for all parameters), which skips a
    step on the device when the step guard sets its ``found_inf`` (no host synchronisation, as
    with GradScaler); DeepSpeed wraps the optimizer in its own and keeps the plain one."""
    optim = config.optim
    parameters = [p for p in backbone.parameters() if p.requires_grad]
    fused = config.backbone.engine == "ddp"
    if optim.name == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           fused=fused)


def build_head_optimizer(config: TrainConfig, head: PartialFC, update_in_backward: bool) -> SparseRowOptimizer:
    """The centers' row-sparse optimizer (``head.optimizer``): SGD with the backbone's momentum, or
    AdamW with ``head.betas``/``head.eps``; at ``head.lr`` and ``head.weight_decay``, each the
    backbone's (``optim.lr``, ``optim.weight_decay``) when not set. Centers and momentum (AdamW:
    both moments) in their storage types (``center_dtype``, ``momentum_dtype``), updates rounded
    into them as ``head.rounding`` says, seeded by the run's seed. ``update_in_backward``: the
    update inside the head's backward (no stored gradient, four random passes over the sampled
    rows instead of six), possible when the runner backpropagates the loss as it is."""
    head_config, optim = config.head, config.optim
    lr = optim.lr if head_config.lr is None else head_config.lr
    weight_decay = optim.weight_decay if head_config.weight_decay is None else head_config.weight_decay
    common = dict(rounding=head_config.rounding, seed=config.seed, update_in_backward=update_in_backward)
    if head_config.optimizer == "adamw":
        return head.adamw(lr=lr, betas=tuple(head_config.betas), eps=head_config.eps, weight_decay=weight_decay,
                          moment_dtype=head_config.momentum_storage_dtype, **common)
    return head.optimizer(lr=lr, momentum=optim.momentum, weight_decay=weight_decay,
                          momentum_dtype=head_config.momentum_storage_dtype, **common)


def deepspeed_settings(config: TrainConfig, runtime: Runtime) -> dict:
    """The DeepSpeed config: the file of ``backbone.deepspeed_config``, whose precision must agree
    with ``backbone.precision`` (ConfigError otherwise: a file without bf16 would silently train
    a ``--precision bf16`` run in fp32), or ZeRO-1 defaults with the trainer's precision. Unlike
    the DDP engine's autocast, DeepSpeed's precision applies on the CPU too: bf16 trains there,
    fp16 is refused there when the engine is built (DeepSpeed's CPU accelerator has no fp16)."""
    from pfc.train.runners.deepspeed import load_deepspeed_config

    backbone = config.backbone
    wanted = {"bf16": backbone.precision == "bf16", "fp16": backbone.precision == "fp16"}
    if not backbone.deepspeed_config:
        settings: dict = {"zero_optimization": {"stage": 1}}
        settings.update({name: {"enabled": True} for name, enabled in wanted.items() if enabled})
        return settings
    settings = load_deepspeed_config(backbone.deepspeed_config)
    given = {name: bool(settings.get(name, {}).get("enabled", False)) for name in wanted}
    if backbone.precision != "fp32" and given != wanted:
        in_file = ", ".join(name for name, enabled in given.items() if enabled) or "fp32"
        raise ConfigError(f"config field 'backbone.precision' is {backbone.precision!r} but the DeepSpeed config "
                          f"{backbone.deepspeed_config} trains in {in_file}: make them agree (or leave "
                          f"precision at fp32 to let the DeepSpeed file decide)")
    return settings


def build_runner(config: TrainConfig, runtime: Runtime, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> BackboneRunner:
    """The backbone in its data-parallel engine: DDP (bare on one rank), or with
    ``engine == "deepspeed"`` a DeepSpeed engine (ZeRO stage, bf16, … from ``deepspeed_config``,
    default ZeRO-1; micro batch, accumulation and clipping from the config)."""
    optim, precision = config.optim, config.backbone.precision
    if config.backbone.engine == "deepspeed":
        from pfc.train.runners.deepspeed import build_deepspeed_runner

        return build_deepspeed_runner(model, deepspeed_settings(config, runtime),
                                      micro_batch_size=config.data.batch_size,
                                      grad_accumulation=optim.grad_accumulation, grad_clip=optim.grad_clip,
                                      optimizer=optimizer)
    on_gpu = runtime.device.type == "cuda"
    autocast = _AUTOCAST_DTYPES.get(precision) if on_gpu else None
    scaler = torch.amp.GradScaler("cuda") if on_gpu and precision == "fp16" else None
    return DDPRunner(model, optimizer, grad_clip=optim.grad_clip, grad_accumulation=optim.grad_accumulation,
                     autocast_dtype=autocast, grad_scaler=scaler, wrap=runtime.world_size > 1)


def build_train_state(config: TrainConfig, runtime: Runtime, image_size: int, steps_per_epoch: int,
                      resolved_config: dict, init_weights: dict[str, torch.Tensor] | None = None) -> TrainState:
    """Backbone (same initial weights on every rank: ``init_weights`` when given, a fine-tuning
    run's, else seeded) in its runner, head, both optimizers and their LR schedules. The
    backbone's schedule starts after its ``backbone.freeze_steps`` frozen steps
    (:mod:`pfc.train.finetune`), the head's at step 0."""
    torch.manual_seed(config.seed)  # identical backbone init on every rank (DDP also broadcasts it)
    backbone, optim = config.backbone, config.optim
    total_steps = config.schedule.max_steps or config.schedule.num_epochs * steps_per_epoch
    schedule = backbone_schedule = None

    def build_schedule() -> None:  # the real length is known only now: its checks run here
        nonlocal schedule, backbone_schedule
        schedule = config.schedule.build(total_steps, optim.lr)
        backbone_schedule = config.schedule.build(total_steps, optim.lr, start_step=backbone.freeze_steps)

    check_freeze(config, total_steps)
    check_component(config, "schedule", build_schedule, {"total_steps": "max_steps", "min_ratio": "min_lr"})
    model = build_backbone(backbone.network, backbone.embedding_size, backbone.dropout, image_size,
                           grad_checkpointing=backbone.grad_checkpointing)
    if init_weights is not None:  # before an engine wraps it: DeepSpeed casts and partitions what it finds
        model.load_state_dict(init_weights)
    model = model.to(runtime.device)
    head = build_head(config, runtime)
    backbone_optimizer = build_backbone_optimizer(config, model)
    runner = build_runner(config, runtime, model, backbone_optimizer)
    head_optimizer = build_head_optimizer(config, head, runner.head_update_in_backward)
    schedulers = {"backbone": torch.optim.lr_scheduler.LambdaLR(runner.optimizer, backbone_schedule),
                  "head": torch.optim.lr_scheduler.LambdaLR(head_optimizer, schedule)}
    return TrainState(runner=runner, head=head, head_optimizer=head_optimizer, schedulers=schedulers,
                      config=resolved_config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def build_loader(config: TrainConfig, runtime: Runtime, epoch: int, start_batch: int = 0):
    """This rank's loader for ``epoch`` from its batch ``start_batch`` on (a resumed run: the
    batches the whole epoch's loader yields from there, none before it read): ``(images [b,3,H,W]
    in [−1,1], labels [b])``; ``len()`` = the epoch's batches per rank − ``start_batch``, equal on all ranks."""
    from pfc.data.loader import make_loader

    data = config.data
    return make_loader(data.root, batch_size=data.batch_size, rank=runtime.rank, world_size=runtime.world_size,
                       num_workers=data.num_workers, seed=config.seed, epoch=epoch, augment=data.augment,
                       device=runtime.device, start_batch=start_batch, sampler=data.sampler, pk_k=data.pk_k,
                       augmentation=data.augmentation())
