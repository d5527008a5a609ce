"""The training loop: data-parallel backbone, model-parallel Partial-FC head, verification, outputs.

    summary = train(load_config("configs/synthetic_cpu.py", argv))   # under torchrun, or one process

One optimizer step (N ranks, ``grad_accumulation`` micro-batches of ``batch_size`` per rank):
  for each micro-batch: x = backbone(images) (DDP, gradient all-reduce only on the last
  micro-batch; or a DeepSpeed engine), loss = head(x, labels) / grad_accumulation, backward;
  then one collective decision (skip the update if any rank's loss is not finite, stop after
  the step if any rank got SIGTERM/SIGINT), clip the backbone gradient, step both optimizers,
  advance both LR schedules and ``head.set_iteration``. The head is never wrapped in DDP: it owns
  its shard of the class centers and does its own collectives (see pfc/head.py).

Everything a resume needs lives in :class:`TrainState` (see "checkpoints" below: saved every
``save_every`` steps, on a stop and at the end; restored by ``resume``); the data-parallel
wrapping is the one function :func:`wrap_backbone`.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pfc.distributed import collectives as pfc_dist
from pfc.backbones import build_backbone
from pfc.train.checkpoint.api import CheckpointError, TrainingState, load_checkpoint, resolve_resume, save_checkpoint
from pfc.train.config import TrainConfig, apply_manifest, to_dict
from pfc.evaluation.verification import VerificationSet, evaluate, read_bin, read_pairs, save_roc_plot
from pfc.distributed.agree import agree_on_error
from pfc.distributed.fault import StepDecision, StepGuard, StopSignals, init_process_group
from pfc.train.schedule import LRSchedule


# --------------------------------------------------------------------------------- runtime

@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, local rank and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(timeout_minutes: float = 30.0) -> Runtime:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set), else run alone.

    Backend: NCCL with one GPU per local rank when CUDA is available (with gloo beside it for CPU
    tensors), gloo on CPU otherwise.
    An already initialised default group is reused.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        # a store namespace per torchrun restart attempt (see pfc.distributed.fault.init_process_group)
        # With CUDA, NCCL for GPU tensors and gloo for the few CPU ones (the per-step fault flags)
        init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", datetime.timedelta(minutes=timeout_minutes))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Runtime(pfc_dist.get_rank(), pfc_dist.get_world_size(), local_rank, device)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch; the rank is mixed in so that ranks draw different augmentations."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


# --------------------------------------------------------------------------------- components

def build_margin(config: TrainConfig):
    """The head's margin from ``config.margin`` (combined (m1, m2, m3) or SphereFace λ-annealed)."""
    from pfc.head import margins

    margin = config.margin
    if margin.kind == "sphereface":
        return margins.SphereFace(s=margin.s, m=int(margin.m1), base=margin.base, gamma=margin.gamma,
                                  power=margin.power, lambda_min=margin.lambda_min,
                                  straight_through=margin.straight_through)
    return margins.CombinedMargin(s=margin.s, m1=margin.m1, m2=margin.m2, m3=margin.m3,
                                  fallback=margin.fallback, straight_through=margin.straight_through)


def build_head(config: TrainConfig, runtime: Runtime) -> nn.Module:
    """PartialFC over ``config.num_classes`` centers, sharded over the default group, with the
    optional regularisers (MHE, angular triplet) and inter-class filtering; a weight of 0 is off."""
    from pfc.head.partial_fc import PartialFC
    from pfc.head.regularizers import MHE, AngularTriplet

    mhe = MHE(weight=config.mhe_weight, kernel=config.mhe_kernel, power=config.mhe_power) if config.mhe_weight else None
    triplet = AngularTriplet(weight=config.triplet_weight, m=config.triplet_m) if config.triplet_weight else None
    return PartialFC(num_classes=config.num_classes, embedding_size=config.embedding_size,
                     margin=build_margin(config), sample_rate=config.sample_rate, group=None,
                     seed=config.seed, device=runtime.device, mhe=mhe, triplet=triplet,
                     interclass_filter=config.interclass_filter or None)


def wrap_backbone(backbone: nn.Module, runtime: Runtime, config: TrainConfig | None = None,
                  optimizer: torch.optim.Optimizer | None = None):
    """Make the backbone data-parallel: DDP when there is more than one rank, or, with
    ``config.engine == "deepspeed"``, a :class:`pfc.train.runners.deepspeed.DeepSpeedBackbone` around
    ``optimizer`` (ZeRO stage, bf16, … from ``config.deepspeed_config``, default ZeRO-1; micro
    batch, accumulation and clipping from ``config``). The only place that knows about the wrapper.
    """
    if config is not None and config.engine == "deepspeed":
        from pfc.train.runners.deepspeed import build_deepspeed_backbone

        deepspeed_config = config.deepspeed_config or {"zero_optimization": {"stage": 1}}
        if not config.deepspeed_config and config.precision == "bf16":
            deepspeed_config["bf16"] = {"enabled": True}
        if not config.deepspeed_config and config.precision == "fp16" and runtime.device.type == "cuda":
            deepspeed_config["fp16"] = {"enabled": True}
        return build_deepspeed_backbone(backbone, deepspeed_config, micro_batch_size=config.batch_size,
                                        grad_accumulation=config.grad_accumulation, grad_clip=config.grad_clip,
                                        optimizer=optimizer)
    if runtime.world_size == 1:
        return backbone
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(backbone, device_ids=device_ids)


def build_backbone_optimizer(config: TrainConfig, backbone: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay on every parameter, as the recipes) or AdamW over the backbone."""
    parameters = [p for p in backbone.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


@dataclass
class TrainState:
    """Everything that changes during training, in one place; :func:`checkpoint_contents` maps it
    to a checkpoint (which adds every rank's RNG states).

    ``backbone`` is the wrapped network (DDP, a :class:`pfc.train.runners.deepspeed.DeepSpeedBackbone`,
    or the bare module on one rank); ``model`` the bare network. ``batch_in_epoch`` counts the
    micro-batches consumed in the current epoch (the data position); ``skipped_steps`` the steps
    whose update was skipped for a non-finite loss.
    """

    backbone: nn.Module
    model: nn.Module
    head: nn.Module
    backbone_optimizer: torch.optim.Optimizer
    head_optimizer: torch.optim.Optimizer
    backbone_scheduler: torch.optim.lr_scheduler.LRScheduler
    head_scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    grad_scaler: torch.amp.GradScaler | None = None


def build_train_state(config: TrainConfig, runtime: Runtime, image_size: int, steps_per_epoch: int) -> TrainState:
    """Backbone (same initial weights on every rank), head, both optimizers and their LR schedules."""
    torch.manual_seed(config.seed)  # identical backbone init on every rank (DDP also broadcasts it)
    model = build_backbone(config.network, config.embedding_size, config.dropout, image_size).to(runtime.device)
    head = build_head(config, runtime)
    backbone_optimizer = build_backbone_optimizer(config, model)
    use_scaler = config.precision == "fp16" and runtime.device.type == "cuda" and config.engine == "ddp"
    # the centers' update inside the head's backward (no stored gradient, four random passes over
    # the sampled rows instead of six) needs the head's loss backpropagated unscaled and undivided
    update_in_backward = config.grad_accumulation == 1 and not use_scaler and config.engine == "ddp"
    head_optimizer = head.optimizer(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                    update_in_backward=update_in_backward)
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    if config.warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps={config.warmup_steps} must be smaller than the {total_steps} training steps")
    schedule = LRSchedule(total_steps, config.warmup_steps, config.lr_schedule, config.lr_power,
                          config.min_lr / config.lr)
    return TrainState(
        backbone=wrap_backbone(model, runtime, config, backbone_optimizer), model=model, head=head,
        backbone_optimizer=backbone_optimizer, head_optimizer=head_optimizer,
        backbone_scheduler=torch.optim.lr_scheduler.LambdaLR(backbone_optimizer, schedule),
        head_scheduler=torch.optim.lr_scheduler.LambdaLR(head_optimizer, schedule),
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        grad_scaler=torch.amp.GradScaler("cuda") if use_scaler else None)


def build_loader(config: TrainConfig, runtime: Runtime, epoch: int):
    """This rank's loader for ``epoch``: ``(images [b,3,H,W] in [−1,1], labels [b])``, equal length on all ranks."""
    from pfc.data.loader import make_loader

    return make_loader(config.data, batch_size=config.batch_size, rank=runtime.rank,
                       world_size=runtime.world_size, num_workers=config.num_workers,
                       seed=config.seed, epoch=epoch, augment=config.augment, device=runtime.device)


def autocast_context(config: TrainConfig, runtime: Runtime):
    """fp16/bf16 autocast of the backbone on GPU; a no-op on CPU or in fp32."""
    if runtime.device.type != "cuda" or config.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if config.precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


# --------------------------------------------------------------------------------- evaluation

def load_val_sets(config: TrainConfig, runtime: Runtime) -> list[VerificationSet]:
    """The verification sets named by the config; every rank checks the files, rank 0 reads them."""
    paths = ([config.val_pairs] if config.val_pairs else []) + list(config.val_bins)
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"verification file {path} does not exist")
    if config.val_root and not os.path.isdir(config.val_root):
        raise ValueError(f"val_root {config.val_root} is not a folder")
    if not runtime.is_main:
        return []
    sets = []
    if config.val_pairs:
        sets.append(read_pairs(config.val_pairs, config.val_root or None))
    sets.extend(read_bin(path) for path in config.val_bins)
    return sets


def run_verification(state: TrainState, val_sets: list[VerificationSet], config: TrainConfig,
                     runtime: Runtime, image_size: int, output: str, plot: bool) -> list[dict]:
    """Rank 0 evaluates the bare backbone on every set (the others wait at a barrier)."""
    summaries = []
    if runtime.is_main and val_sets:
        results = [evaluate(state.model, pairs, image_size, config.eval_batch_size, runtime.device)
                   for pairs in val_sets]
        summaries = [dict(result.summary(), step=state.step) for result in results]
        if plot:
            save_roc_plot(results, os.path.join(output, "roc.png"))
    if runtime.world_size > 1:
        dist.barrier()
    return summaries


# --------------------------------------------------------------------------------- logging

class MetricsWindow:
    """Averages of the loss and the head's stats over the steps since the last log line."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._reset()

    def _reset(self) -> None:
        self.loss, self.count, self.stats, self.start = 0.0, 0, {}, time.perf_counter()

    def add(self, loss: float, stats: dict) -> None:
        self.loss += loss
        self.count += 1
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value

    def record(self, state: TrainState, lr: float) -> dict:
        """The log record (step, epoch, loss, ce, accuracy, …, lr, samples/s, ETA); starts a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record = {"step": state.step, "epoch": state.epoch, "loss": self.loss / self.count}
        record.update({key: value / self.count for key, value in self.stats.items()})
        record["lr"] = lr
        record["samples_per_s"] = self.samples_per_step * self.count / elapsed
        record["eta_s"] = (state.total_steps - state.step) * elapsed / self.count
        self._reset()
        return record


class TrainLogger:
    """Rank-0 logging: console lines, ``metrics.jsonl``, ``eval.jsonl`` and TensorBoard when installed."""

    def __init__(self, output: str, enabled: bool):
        self.enabled = enabled
        self.output = output
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(os.path.join(output, "tensorboard"))

    def _append(self, name: str, record: dict) -> None:
        with open(os.path.join(self.output, name), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_train(self, record: dict, write=print) -> None:
        if not self.enabled:
            return
        self._append("metrics.jsonl", record)
        write(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in record.items()))
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def log_eval(self, summaries: list[dict], write=print) -> None:
        if not self.enabled:
            return
        for summary in summaries:
            self._append("eval.jsonl", summary)
            write(f"eval {summary['set']} step {summary['step']}: accuracy {summary['accuracy']:.4f} "
                  f"± {summary['accuracy_std']:.4f}, tar@far=1e-3 {summary['tar@far=1e-3']:.4f}")
            if self.writer is not None:
                for key in ("accuracy", "tar@far=1e-3", "tar@far=1e-4"):
                    self.writer.add_scalar(f"val_{summary['set']}/{key}", summary[key], summary["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_json(path: str, payload) -> None:
    """Write JSON to a temporary name, then rename: never a half-written file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(temporary, path)


def save_backbone(model: nn.Module, config: TrainConfig, image_size: int, path: str) -> None:
    """``backbone.pt``: the bare network's weights and what is needed to rebuild it (loadable with weights_only)."""
    payload = {"network": config.network, "embedding_size": config.embedding_size,
               "image_size": image_size, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    temporary = f"{path}.tmp"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_backbone(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the network saved by :func:`save_backbone`; returns ``(model in eval mode, metadata)``."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable backbone checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "network" not in payload:
        raise ValueError(f"{path}: not a pfc backbone.pt (missing network/state_dict)")
    model = build_backbone(payload["network"], payload["embedding_size"], 0.0, payload["image_size"])
    model.load_state_dict(payload["state_dict"])
    meta = {key: payload[key] for key in ("network", "embedding_size", "image_size")}
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------- checkpoints

def uses_deepspeed(state: TrainState) -> bool:
    """True when the backbone runs in a DeepSpeed engine (``config.engine == "deepspeed"``)."""
    return not isinstance(state.backbone, nn.Module)


def checkpoint_contents(state: TrainState, config: TrainConfig) -> TrainingState:
    """What a checkpoint holds: the head shard, the backbone (DeepSpeed's own state under DeepSpeed),
    both optimizers and LR schedules, the data position and the resolved config."""
    deepspeed = state.backbone if uses_deepspeed(state) else None
    schedulers = {"backbone": state.backbone_scheduler, "head": state.head_scheduler}
    if state.grad_scaler is not None:
        schedulers["grad_scaler"] = state.grad_scaler
    return TrainingState(
        head=state.head, head_optimizer=state.head_optimizer,
        backbone=None if deepspeed else state.model,
        backbone_optimizer=None if deepspeed else state.backbone_optimizer,
        schedulers=schedulers, deepspeed_engine=deepspeed, config=to_dict(config),
        progress={"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                  "skipped_steps": state.skipped_steps})


def save_train_checkpoint(state: TrainState, config: TrainConfig) -> str:
    """Collective: write ``OUTPUT/checkpoint-STEP`` atomically, keep the newest ``keep_checkpoints``."""
    return str(save_checkpoint(config.output, state.step, checkpoint_contents(state, config),
                               keep_last=config.keep_checkpoints))


def resume_request(config: TrainConfig) -> str:
    """``config.resume``; after a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) an empty one means "auto"."""
    if not config.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return "auto"
    return config.resume


def restore_train_state(state: TrainState, config: TrainConfig, runtime: Runtime) -> str | None:
    """Load the checkpoint the config asks for (if any) into ``state``; returns its path or None.

    A checkpoint from another world size continues at the same number of samples into the epoch
    (``batch_in_epoch`` scaled by old/new world size) with freshly seeded RNGs.
    """
    request = resume_request(config)
    if not request:
        return None
    path, error = None, None
    if runtime.is_main:  # rank 0 decides, so every rank loads the same checkpoint
        try:
            path = resolve_resume(request, config.output)
        except CheckpointError as exc:
            error = str(exc)
    if runtime.world_size > 1:
        box = [path, error]
        dist.broadcast_object_list(box, src=0)
        path, error = box
    if error:
        raise CheckpointError(error)  # on every rank
    if path is None:
        if runtime.is_main:
            print(f"resume auto: no complete checkpoint in {config.output}; starting fresh")
        return None
    info = load_checkpoint(path, checkpoint_contents(state, config))
    progress = info.progress
    state.step, state.epoch = int(progress["step"]), int(progress["epoch"])
    state.skipped_steps = int(progress.get("skipped_steps", 0))
    position = int(progress["batch_in_epoch"]) * info.saved_world_size // runtime.world_size
    position = min(position, state.steps_per_epoch * config.grad_accumulation)
    state.batch_in_epoch = position - position % config.grad_accumulation
    if not info.rng_restored:
        seed_everything(config.seed + state.step, runtime.rank)
    if runtime.is_main:
        print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return str(path)


class NonFiniteLossError(RuntimeError):
    """Training stopped after ``max_nonfinite_skips`` consecutive non-finite losses (a checkpoint was written)."""


# --------------------------------------------------------------------------------- the loop

def manifest_image_size(manifest: dict) -> int:
    """Side of the square training images from dataset.json's ``image_size`` ([H, W] or an int)."""
    size = manifest.get("image_size", 112)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"dataset.json image_size {size} is not square; the backbones need H = W")
        size = size[0]
    return int(size)


def train(config: TrainConfig, runtime: Runtime | None = None) -> dict:
    """Train per ``config``; returns (on every rank) ``{"steps", "final_loss", "eval": [...]}``.

    Outputs in ``config.output`` (rank 0): config.json (resolved), metrics.jsonl, eval.jsonl,
    eval_results.json, roc.png, backbone.pt, tensorboard/ when installed.
    """
    from pfc.data.loader import read_manifest
    from tqdm import tqdm

    runtime = runtime or init_runtime()
    if not config.data:
        raise ValueError("no training data: set --data DIR (a folder with dataset.json and the shards)")
    manifest = read_manifest(config.data)
    config = apply_manifest(config, manifest, os.path.join(config.data, "dataset.json"))
    image_size = manifest_image_size(manifest)
    val_sets = load_val_sets(config, runtime)
    output = config.output
    if runtime.is_main:
        os.makedirs(output, exist_ok=True)
        write_json(os.path.join(output, "config.json"), to_dict(config))
    if runtime.device.type != "cuda" and config.precision != "fp32" and runtime.is_main:
        print(f"note: precision {config.precision} applies on GPU only; training in fp32 on CPU")

    seed_everything(config.seed, runtime.rank)
    batches_per_epoch = len(build_loader(config, runtime, epoch=0))
    steps_per_epoch = batches_per_epoch // config.grad_accumulation
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch has {batches_per_epoch} batches per rank, fewer than grad_accumulation="
                         f"{config.grad_accumulation}: use more data or a smaller batch_size")
    state = build_train_state(config, runtime, image_size, steps_per_epoch)
    restore_train_state(state, config, runtime)
    stop_signals, guard, stopped = StopSignals(), StepGuard(config.max_nonfinite_skips), ""
    logger = TrainLogger(output, runtime.is_main)
    eval_summaries: list[dict] = []
    window = MetricsWindow(config.batch_size * config.grad_accumulation * runtime.world_size)
    train_start = time.perf_counter()
    last_loss = float("nan")

    state.backbone.train()
    state.head.train()
    try:
        while state.step < state.total_steps and not stopped:
            loader = iter(build_loader(config, runtime, state.epoch))
            for _ in range(state.batch_in_epoch):  # a resumed run: the part of the epoch already seen
                next(loader)
            steps_left_in_epoch = steps_per_epoch - state.batch_in_epoch // config.grad_accumulation
            steps_this_epoch = min(steps_left_in_epoch, state.total_steps - state.step)
            bar = tqdm(total=steps_this_epoch, desc=f"epoch {state.epoch}", dynamic_ncols=True, leave=False,
                       disable=not (runtime.is_main and sys.stderr.isatty()))
            for _ in range(steps_this_epoch):
                lr_used = state.backbone_optimizer.param_groups[0]["lr"]
                last_loss, stats, decision = train_step(state, config, runtime, loader, guard, stop_signals)
                state.step += 1
                window.add(last_loss, stats)
                bar.update(1)
                if state.step % config.log_every == 0 or state.step == state.total_steps:
                    logger.log_train(window.record(state, lr_used), write=tqdm.write)
                if config.eval_every and state.step % config.eval_every == 0 and state.step < state.total_steps:
                    summaries = run_verification(state, val_sets, config, runtime, image_size, output, plot=False)
                    logger.log_eval(summaries, write=tqdm.write)
                    eval_summaries.extend(summaries)
                if decision.stop:
                    stopped = decision.reason
                    break
                if config.save_every and state.step % config.save_every == 0:
                    save_train_checkpoint(state, config)
            bar.close()
            if state.batch_in_epoch >= steps_per_epoch * config.grad_accumulation:  # the epoch ran to its end
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        stop_signals.restore()
    if stopped or config.save_every:  # at the end, and on a stop even without periodic checkpoints
        path = save_train_checkpoint(state, config)
        if stopped and runtime.is_main:
            print(f"stopped at step {state.step}: {stopped}; checkpoint {path} (continue with --resume auto)")
    if stopped and guard.consecutive:
        raise NonFiniteLossError(f"{stopped}; the last good state is in the checkpoint of step {state.step}")
    if stopped:
        logger.close()
        return {"steps": state.step, "final_loss": last_loss, "eval": [], "stopped": stopped,
                "skipped_steps": state.skipped_steps}

    # ---- final verification and outputs
    summaries = run_verification(state, val_sets, config, runtime, image_size, output, plot=True)
    logger.log_eval(summaries)
    eval_summaries.extend(summaries)
    if runtime.is_main:
        write_json(os.path.join(output, "eval_results.json"), {"final": summaries, "history": eval_summaries})
        save_backbone(state.model, config, image_size, os.path.join(output, "backbone.pt"))
        print(f"trained {state.step} steps in {time.perf_counter() - train_start:.1f} s; outputs in {output}")
    logger.close()
    return {"steps": state.step, "final_loss": last_loss, "eval": summaries, "skipped_steps": state.skipped_steps}


def train_step(state: TrainState, config: TrainConfig, runtime: Runtime, loader, guard: StepGuard,
               stop_signals: StopSignals) -> tuple[float, dict, StepDecision]:
    """One optimizer step over ``grad_accumulation`` micro-batches from ``loader``; returns
    (loss, head stats, the guard's decision).

    DDP all-reduces the backbone gradient only on the last micro-batch (``no_sync`` before it);
    DeepSpeed accumulates itself (its ``step`` after every micro-batch updates only at the
    boundary). The head's gradient accumulates in its sparse rows. The loss is the mean over
    micro-batches. Before the update, ``guard`` decides on every rank alike: a non-finite loss
    on any rank skips the update; a stop signal on any rank stops after this step.
    """
    state.head.set_iteration(state.step)
    step_loss, stats = 0.0, {}
    for micro in range(config.grad_accumulation):
        error = None
        try:
            images, labels = next(loader)
        except StopIteration:
            error = RuntimeError(f"the loader of epoch {state.epoch} ended after {state.batch_in_epoch} "
                                 f"batches, before the {state.steps_per_epoch} steps it announced")
        except Exception as exc:  # a data error (e.g. a label outside [0, num_classes)): raised on all ranks
            error = exc
        agree_on_error(error, f"loading batch {state.batch_in_epoch} of epoch {state.epoch}")
        images = images.to(runtime.device, non_blocking=True)
        labels = labels.to(runtime.device, non_blocking=True)
        last_micro = micro == config.grad_accumulation - 1
        if uses_deepspeed(state):  # DeepSpeed divides by the accumulation steps itself
            loss = state.head(state.backbone(images), labels)
            state.backbone.backward(loss, head_parameters=[state.head.weight])
            loss = loss.detach() / config.grad_accumulation
            if not last_micro:
                state.backbone.step()
        else:
            sync = contextlib.nullcontext() if last_micro or runtime.world_size == 1 else state.backbone.no_sync()
            with sync:
                with autocast_context(config, runtime):
                    embeddings = state.backbone(images)
                loss = state.head(embeddings.float(), labels) / config.grad_accumulation
                if state.grad_scaler is not None:
                    state.grad_scaler.scale(loss).backward()
                else:
                    loss.backward()
        step_loss += loss.item()
        state.batch_in_epoch += 1
        for key, value in state.head.last_stats.items():
            stats[key] = stats.get(key, 0.0) + value / config.grad_accumulation
    decision = guard.check(step_loss, stop_signals.requested, step=state.step)
    if decision.skip:
        skip_step(state)
        state.skipped_steps += 1
    else:
        optimizer_step(state, config)
    return step_loss, stats, decision


def skip_step(state: TrainState) -> None:
    """A skipped step (non-finite loss on some rank): drop the gradients, change no weight or
    optimizer state, advance the LR schedules (the step index moves on)."""
    if uses_deepspeed(state):
        # DeepSpeed's own step keeps its counters right; ZeRO-1/2 skip the update themselves when
        # the gradients are not finite (which a non-finite loss makes them)
        if state.backbone.step():
            print("warning: DeepSpeed applied the backbone update of a step whose loss was not finite "
                  "(its gradients were)", file=sys.stderr)
        state.backbone.zero_grad()
    state.backbone_optimizer.zero_grad(set_to_none=True)
    state.head_optimizer.zero_grad(set_to_none=True)
    state.backbone_scheduler.step()
    state.head_scheduler.step()


def optimizer_step(state: TrainState, config: TrainConfig) -> None:
    """Clip the backbone gradient, step both optimizers, clear the gradients, advance the LR schedules."""
    if uses_deepspeed(state):  # clipping, the backbone step and its gradients are DeepSpeed's
        if state.backbone.step():  # False: DeepSpeed skipped it (fp16 overflow); skip the head too
            state.head_optimizer.step()
        state.backbone.zero_grad()
        state.head_optimizer.zero_grad(set_to_none=True)
        state.backbone_scheduler.step()
        state.head_scheduler.step()
        return
    scaler = state.grad_scaler
    if scaler is not None:
        scaler.unscale_(state.backbone_optimizer)
        scaler.unscale_(state.head_optimizer)
    if config.grad_clip > 0:
        nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    if scaler is not None:
        scaler.step(state.backbone_optimizer)
        scaler.step(state.head_optimizer)
        scaler.update()
    else:
        state.backbone_optimizer.step()
        state.head_optimizer.step()
    state.backbone_optimizer.zero_grad(set_to_none=True)
    state.head_optimizer.zero_grad(set_to_none=True)
    state.backbone_scheduler.step()
    state.head_scheduler.step()
