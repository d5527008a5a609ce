"""Small factories: each component of a training run built from the config.

``build_runner`` is the one place that picks the backbone's engine (DDP or DeepSpeed).
"""
from __future__ import annotations

import torch
from torch import nn

from pfc.backbones import build_backbone
from pfc.head.partial_fc import PartialFC
from pfc.train.config import TrainConfig
from pfc.train.runners.base import BackboneRunner
from pfc.train.runners.ddp import DDPRunner
from pfc.train.runtime import Runtime
from pfc.train.schedule import LRSchedule
from pfc.train.state import TrainState

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build_head(config: TrainConfig, runtime: Runtime) -> PartialFC:
    """PartialFC over ``num_classes`` centers, sharded over the default group, with the
    optional regularisers (MHE, angular triplet) and inter-class filtering; a weight of 0 is off."""
    from pfc.head.regularizers import MHE, AngularTriplet
    from pfc.head import margins

    margin = config.margin
    if margin.kind == "sphereface":
        head_margin = margins.SphereFace(s=margin.s, m=int(margin.m1), base=margin.base, gamma=margin.gamma,
                                         power=margin.power, lambda_min=margin.lambda_min,
                                         straight_through=margin.straight_through)
    else:
        head_margin = margins.CombinedMargin(s=margin.s, m1=margin.m1, m2=margin.m2, m3=margin.m3,
                                             fallback=margin.fallback, straight_through=margin.straight_through)
    mhe = MHE(weight=config.mhe_weight, kernel=config.mhe_kernel, power=config.mhe_power) if config.mhe_weight else None
    triplet = AngularTriplet(weight=config.triplet_weight, m=config.triplet_m) if config.triplet_weight else None
    return PartialFC(num_classes=config.num_classes, embedding_size=config.embedding_size,
                     margin=head_margin, sample_rate=config.sample_rate, group=None,
                     seed=config.seed, device=runtime.device, mhe=mhe, triplet=triplet,
                     interclass_filter=config.interclass_filter or None)


def build_backbone_optimizer(config: TrainConfig, backbone: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay on every parameter, as the recipes) or AdamW over the backbone."""
    parameters = [p for p in backbone.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _deepspeed_settings(config: TrainConfig, runtime: Runtime) -> dict | str:
    """The DeepSpeed config file, or ZeRO-1 defaults with the precision of the trainer's config."""
    if config.deepspeed_config:
        return config.deepspeed_config
    settings: dict = {"zero_optimization": {"stage": 1}}
    if config.precision == "bf16":
        settings["bf16"] = {"enabled": True}
    if config.precision == "fp16" and runtime.device.type == "cuda":
        settings["fp16"] = {"enabled": True}
    return settings


def build_runner(config: TrainConfig, runtime: Runtime, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> BackboneRunner:
    """The backbone in its data-parallel engine: DDP (bare on one rank), or with
    ``engine == "deepspeed"`` a DeepSpeed engine (ZeRO stage, bf16, … from ``deepspeed_config``,
    default ZeRO-1; micro batch, accumulation and clipping from the config)."""
    if config.engine == "deepspeed":
        from pfc.train.runners.deepspeed import build_deepspeed_runner

        return build_deepspeed_runner(model, _deepspeed_settings(config, runtime), micro_batch_size=config.batch_size,
                                      grad_accumulation=config.grad_accumulation, grad_clip=config.grad_clip,
                                      optimizer=optimizer)
    on_gpu = runtime.device.type == "cuda"
    autocast = _AUTOCAST_DTYPES.get(config.precision) if on_gpu else None
    scaler = torch.amp.GradScaler("cuda") if on_gpu and config.precision == "fp16" else None
    return DDPRunner(model, optimizer, grad_clip=config.grad_clip, grad_accumulation=config.grad_accumulation,
                     autocast_dtype=autocast, grad_scaler=scaler, wrap=runtime.world_size > 1)


def build_train_state(config: TrainConfig, runtime: Runtime, image_size: int, steps_per_epoch: int,
                      resolved_config: dict) -> TrainState:
    """Backbone (same initial weights on every rank) in its runner, head, both optimizers and
    their LR schedules."""
    torch.manual_seed(config.seed)  # identical backbone init on every rank (DDP also broadcasts it)
    model = build_backbone(config.network, config.embedding_size, config.dropout, image_size).to(runtime.device)
    head = build_head(config, runtime)
    backbone_optimizer = build_backbone_optimizer(config, model)
    runner = build_runner(config, runtime, model, backbone_optimizer)
    # the centers' update inside the head's backward: no stored gradient, four random passes over
    # the sampled rows instead of six; possible when the runner backpropagates the loss as it is
    head_optimizer = head.optimizer(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                    update_in_backward=runner.head_update_in_backward)
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    if config.warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps={config.warmup_steps} must be smaller than the {total_steps} training steps")
    schedule = LRSchedule(total_steps, config.warmup_steps, config.lr_schedule, config.lr_power,
                          config.min_lr / config.lr)
    schedulers = {"backbone": torch.optim.lr_scheduler.LambdaLR(runner.optimizer, schedule),
                  "head": torch.optim.lr_scheduler.LambdaLR(head_optimizer, schedule)}
    return TrainState(runner=runner, head=head, head_optimizer=head_optimizer, schedulers=schedulers,
                      config=resolved_config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def build_loader(config: TrainConfig, runtime: Runtime, epoch: int):
    """This rank's loader for ``epoch``: ``(images [b,3,H,W] in [−1,1], labels [b])``, equal length on all ranks."""
    from pfc.data.loader import make_loader

    return make_loader(config.data, batch_size=config.batch_size, rank=runtime.rank,
                       world_size=runtime.world_size, num_workers=config.num_workers,
                       seed=config.seed, epoch=epoch, augment=config.augment, device=runtime.device)
