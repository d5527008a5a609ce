"""The backbone inside a DeepSpeed engine (ZeRO 1/2, bf16/fp16, clipping); the head stays outside.

    backbone_engine = build_deepspeed_backbone(backbone, "configs/deepspeed_zero2.json",
                                               optimizer=torch_optimizer, micro_batch_size=128)
    embeddings = backbone_engine(images)          # float32 [b, D] whatever the engine's precision
    loss = head(embeddings, labels)
    backbone_engine.backward(loss, head_parameters=[head.weight])   # loss scale undone for the head
    if backbone_engine.step():                    # False: fp16 overflow, DeepSpeed skipped the step
        head_optimizer.step()
    backbone_engine.zero_grad(); head_optimizer.zero_grad()

It offers what the trainer uses of a DDP module: call, ``module``, ``backward``, ``step``,
``zero_grad``, ``param_groups`` for the LR schedule, and DeepSpeed's own checkpointing
(``save_checkpoint``/``load_checkpoint``) for the engine state (module, ZeRO-partitioned
optimizer, engine LR scheduler). DeepSpeed averages the backbone gradients over the ranks like
DDP, so the head's gradient convention (x.grad = N·∂loss/∂x_r) gives the exact gradient.

On CPU the engine runs with DeepSpeed's ``cpu`` accelerator over the gloo group that is
already initialised. DeepSpeed's communication backend would compile its ``shm_comm`` op with g++
on the first engine start (30–100 s on 2 cores; cached in ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). That op only serves DeepSpeed's *inference* all-reduce
(tensor-parallel inference layers), never training, so pfc marks it unavailable before the
engine starts unless ``build_cpu_comm_op=True``; all collectives then go through the gloo group.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

# What the trainer's own config fills in when the DeepSpeed config leaves it out (or sets "auto").
_TRAINER_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def _import_deepspeed():
    """Import DeepSpeed, selecting its CPU accelerator when there is no GPU (before the import)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    return deepspeed


def load_deepspeed_config(config: dict | str | os.PathLike) -> dict:
    """A DeepSpeed config from a dict (copied) or a JSON file; ValueError when unreadable."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist")
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object")
    return loaded


def resolve_deepspeed_config(config: dict | str | os.PathLike, micro_batch_size: int, grad_accumulation: int = 1,
                             grad_clip: float = 0.0, world_size: int = 1, has_client_optimizer: bool = True) -> dict:
    """The DeepSpeed config with the trainer's batch size, accumulation and clipping filled in.

    A value the DeepSpeed config sets explicitly must agree with the trainer's (ValueError naming
    both otherwise). fp16 on a machine without a GPU is refused (DeepSpeed's CPU accelerator
    does not support it; bf16 works). With a torch optimizer passed in, ZeRO is allowed to wrap
    it (``zero_allow_untested_optimizer``); a config optimizer must use ``"torch_adam": true``
    on CPU, where DeepSpeed's fused Adam cannot be built.
    """
    resolved = load_deepspeed_config(config)
    wanted = {"train_micro_batch_size_per_gpu": int(micro_batch_size),
              "gradient_accumulation_steps": int(grad_accumulation),
              "gradient_clipping": float(grad_clip)}
    for name in _TRAINER_FIELDS:
        given = resolved.get(name, "auto")
        if given == "auto":
            resolved[name] = wanted[name]
        elif float(given) != float(wanted[name]):
            raise ValueError(f"DeepSpeed config sets {name}={given}, the trainer config says {wanted[name]}; "
                             f"remove it from the DeepSpeed config or make them agree")
    global_batch = resolved["train_micro_batch_size_per_gpu"] * resolved["gradient_accumulation_steps"] * world_size
    given_batch = resolved.get("train_batch_size", "auto")
    if given_batch == "auto":
        resolved["train_batch_size"] = global_batch
    elif int(given_batch) != global_batch:
        raise ValueError(f"DeepSpeed config sets train_batch_size={given_batch}, but micro batch × accumulation × "
                         f"world size = {global_batch}")
    if resolved.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ValueError("DeepSpeed fp16 needs a GPU (its CPU accelerator refuses it); use \"bf16\" on CPU")
    if has_client_optimizer:
        if "optimizer" in resolved:
            raise ValueError("both a DeepSpeed config 'optimizer' and a torch optimizer were given; use one")
        resolved.setdefault("zero_allow_untested_optimizer", True)
    elif "optimizer" not in resolved:
        raise ValueError("DeepSpeed config has no 'optimizer' and no torch optimizer was given")
    elif not torch.cuda.is_available():
        params = resolved["optimizer"].setdefault("params", {})
        if str(resolved["optimizer"].get("type", "")).lower() in ("adam", "adamw"):
            params.setdefault("torch_adam", True)
    stage = int(resolved.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2):
        raise ValueError(f"ZeRO stage {stage} is not supported for the backbone (use 1 or 2): stage 0 is plain "
                         "data parallelism (use engine ddp), stage 3 partitions the parameters, which the trainer's "
                         "direct use of the module (evaluation, export) does not handle")
    return resolved


def _safe_globals() -> list:
    """The DeepSpeed classes its ZeRO optimizer checkpoints pickle (plain data holders)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _use_weights_only_loading(engine) -> None:
    """Make the engine read its checkpoint files with ``torch.load(weights_only=True)``.

    DeepSpeed's own torch checkpoint engine unpickles with ``weights_only=False``; this one
    admits only tensors, containers and the few DeepSpeed data classes of :func:`_safe_globals`.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__} is not supported: "
                         "pfc reads engine checkpoints only with torch.load(weights_only=True); remove the "
                         "'checkpoint' engine settings from the DeepSpeed config")
    allowed = _safe_globals()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


class DeepSpeedBackbone:
    """A backbone wrapped by ``deepspeed.initialize``; see the module docstring for the step."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[b, D]`` in float32 (the head computes in full precision)."""
        return self.engine(images.to(self.dtype)).float()

    @property
    def dtype(self) -> torch.dtype:
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        if self.engine.fp16_enabled():
            return torch.float16
        return torch.float32

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def param_groups(self) -> list[dict]:
        """The backbone optimizer's param groups (set ``"lr"`` here for the LR schedule)."""
        return self.engine.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        """The factor ``backward`` multiplies the loss by (1 unless fp16)."""
        scale = self.engine._get_optimizer_loss_scale() if self.engine.fp16_enabled() else None
        return float(scale) if scale else 1.0

    def train(self, mode: bool = True) -> "DeepSpeedBackbone":
        self.engine.train(mode)
        return self

    def eval(self) -> "DeepSpeedBackbone":
        return self.train(False)

    def backward(self, loss: torch.Tensor, head_parameters=()) -> None:
        """Back-propagate ``loss`` through the head and the engine.

        DeepSpeed scales the loss by the fp16 loss scale and divides it by the accumulation
        steps; the head's gradients are unscaled here (the division by the accumulation steps
        stays, as for the backbone), so the head optimizer sees true gradients.
        """
        scale = self.loss_scale
        self.engine.backward(loss)
        if scale != 1.0:
            for parameter in head_parameters:
                if parameter.grad is not None:
                    parameter.grad.mul_(1.0 / scale)

    def step(self) -> bool:
        """One optimizer step of the engine (at an accumulation boundary); False when DeepSpeed
        skipped it: ZeRO-1/2 skip a step whose gradients hold inf/NaN (fp16 overflow, or a
        non-finite gradient norm in fp32/bf16), decided on all ranks alike: skip the head's too."""
        self.engine.step()
        return bool(self.engine.was_step_applied())

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def save_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        """DeepSpeed's own (collective) save of module, ZeRO optimizer partitions, scheduler."""
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load_checkpoint(self, directory: str | os.PathLike, tag: str, module_only: bool = False) -> None:
        """DeepSpeed's own (collective) load; ``module_only`` loads the weights only (and
        refreshes ZeRO's fp32 master copies), e.g. on another world size, where DeepSpeed cannot
        re-partition ZeRO-1/2 optimizer state. ValueError when the engine state is not there."""
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_module_only=module_only,
                                                   load_optimizer_states=not module_only,
                                                   load_lr_scheduler_states=not module_only)
        if load_path is None:
            raise ValueError(f"no DeepSpeed engine checkpoint {tag!r} in {directory}")

    def load_module_weights(self, state_dict: dict) -> None:
        """Put backbone weights (e.g. from a DDP checkpoint) into the engine, fp32 masters included."""
        self.engine.module.load_state_dict(state_dict)
        if hasattr(self.engine.optimizer, "refresh_fp32_params"):
            self.engine.optimizer.refresh_fp32_params()


def build_deepspeed_backbone(backbone: torch.nn.Module, config: dict | str | os.PathLike, *,
                             micro_batch_size: int, grad_accumulation: int = 1, grad_clip: float = 0.0,
                             optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                             group=None, build_cpu_comm_op: bool = False) -> DeepSpeedBackbone:
    """Wrap ``backbone`` with ``deepspeed.initialize`` (torch.distributed must be initialised).

    ``config`` is a DeepSpeed config dict or JSON file (ZeRO stage, bf16/fp16, …); batch size,
    accumulation and clipping come from the trainer (see :func:`resolve_deepspeed_config`).
    ``optimizer``: a torch optimizer over ``backbone.parameters()`` (or None to let the config
    build one). ``lr_scheduler`` is stepped by DeepSpeed after every applied step.
    ``build_cpu_comm_op``: let DeepSpeed compile its CPU inference all-reduce op (see the module
    docstring); training does not use it.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("the DeepSpeed engine needs an initialised process group (launch with torchrun)")
    if "LOCAL_RANK" not in os.environ:
        raise ValueError("LOCAL_RANK is not set: DeepSpeed needs it (torchrun sets it; set it when "
                         "launching otherwise)")
    deepspeed = _import_deepspeed()
    if not build_cpu_comm_op and not torch.cuda.is_available():
        _skip_cpu_comm_op()
    resolved = resolve_deepspeed_config(config, micro_batch_size, grad_accumulation, grad_clip,
                                        dist.get_world_size(group), has_client_optimizer=optimizer is not None)
    engine, _, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=resolved, model_parameters=None if optimizer is not None
                                           else [p for p in backbone.parameters() if p.requires_grad],
                                           mpu=None, dist_init_required=False)
    _use_weights_only_loading(engine)
    return DeepSpeedBackbone(engine)


def _skip_cpu_comm_op() -> None:
    """Tell DeepSpeed its CPU ``shm_comm`` op is unavailable, so that starting its communication
    backend does not compile it (DeepSpeed keeps the probe result in one module-level dict, read
    when the backend starts; an unavailable op makes it use the process group only)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
