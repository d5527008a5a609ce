"""The backbone inside a DeepSpeed engine (ZeRO 1/2, bf16/fp16, clipping); the head stays outside.

    runner = build_deepspeed_runner(backbone, "configs/deepspeed_zero2_bf16.json",
                                    optimizer=torch_optimizer, micro_batch_size=128)
    loss = runner.forward_backward(images, labels, head, last_micro=True)
    runner.step(head_optimizer)     # the head steps only when DeepSpeed applied its step

A :class:`pfc.train.runners.base.BackboneRunner`: embeddings come out in float32 whatever the
engine's precision; ``backward`` undoes the fp16 loss scale for the head's gradients; DeepSpeed's
own checkpointing keeps the engine state (module, ZeRO-partitioned optimizer, engine LR
scheduler). DeepSpeed averages the backbone gradients over the ranks like DDP, so the head's
gradient convention (x.grad = N·∂loss/∂x_r) gives the exact gradient. DeepSpeed is optional
(``pip install -e ".[deepspeed]"`` in pfc's clone) and imported only when an engine is built.

Precision: with bf16 (or fp16) DeepSpeed casts the module's parameters and leaves its buffers
in fp32; pfc keeps BatchNorm in fp32 on top (running statistics fp32, each layer normalising
with its scale and shift upcast to fp32 on the low-precision input, torch's mixed-type kernel:
see :mod:`pfc.train.runners.fp32_batchnorm`), as autocast and apex O2 do; without it every
BatchNorm layer fails ("expected scalar type BFloat16 but found Float"). fp16 needs a GPU:
DeepSpeed's CPU accelerator refuses it (:func:`resolve_deepspeed_config` says so); bf16 runs on
the CPU too.

On CPU the engine runs with DeepSpeed's ``cpu`` accelerator over the gloo group that is
already initialised. DeepSpeed's communication backend would compile its ``shm_comm`` op with g++
on the first engine start (30–100 s on 2 cores; cached in ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). That op only serves DeepSpeed's *inference* all-reduce
(tensor-parallel inference layers), never training, so pfc marks it unavailable before the
engine starts unless ``build_cpu_comm_op=True``; all collectives then go through the gloo group.

DeepSpeed internals this module relies on (the only module of pfc that touches them; checked
against deepspeed 0.19):
- ``engine._get_optimizer_loss_scale()``: the fp16 loss scale, to unscale the head's gradients;
- ``engine._config``: the engine's parsed config, needed to build a replacement checkpoint engine;
- ``deepspeed.ops.__compatible_ops__``: the op-probe cache, to mark ``shm_comm`` unavailable.
"""
from __future__ import annotations

import copy
import json
import pickle
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from pfc.errors import CheckpointError, ConfigError
from pfc.train.runners.fp32_batchnorm import keep_batchnorm_in_fp32

ENGINE = "deepspeed"
ENGINE_TAG = "engine"  # the tag of DeepSpeed's checkpoint inside the engine directory

# What the trainer's own config fills in when the DeepSpeed config leaves it out (or sets "auto").
_TRAINER_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def _loss_scale(engine) -> float:
    """The factor DeepSpeed's ``backward`` multiplies the loss by (1 unless fp16)."""
    scale = engine._get_optimizer_loss_scale() if engine.fp16_enabled() else None
    return float(scale) if scale else 1.0


def _import_deepspeed():
    """Import DeepSpeed, selecting its CPU accelerator when there is no GPU (before the import)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError("engine 'deepspeed' needs DeepSpeed, which is not installed: "
                          "pip install -e '.[deepspeed]' in pfc's clone, or pip install 'deepspeed>=0.14' "
                          "(or use --engine ddp)") from exc
    return deepspeed


def load_deepspeed_config(config: dict | str | os.PathLike) -> dict:
    """A DeepSpeed config from a dict (copied) or a JSON file; ConfigError when unreadable."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return loaded


def resolve_deepspeed_config(config: dict | str | os.PathLike, micro_batch_size: int, grad_accumulation: int = 1,
                             grad_clip: float = 0.0, world_size: int = 1, has_client_optimizer: bool = True) -> dict:
    """The DeepSpeed config with the trainer's batch size, accumulation and clipping filled in.

    A value the DeepSpeed config sets explicitly must agree with the trainer's (ConfigError naming
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
            raise ConfigError(f"DeepSpeed config sets {name}={given}, the trainer config says {wanted[name]}; "
                             f"remove it from the DeepSpeed config or make them agree")
    global_batch = resolved["train_micro_batch_size_per_gpu"] * resolved["gradient_accumulation_steps"] * world_size
    given_batch = resolved.get("train_batch_size", "auto")
    if given_batch == "auto":
        resolved["train_batch_size"] = global_batch
    elif int(given_batch) != global_batch:
        raise ConfigError(f"DeepSpeed config sets train_batch_size={given_batch}, but micro batch × accumulation × "
                         f"world size = {global_batch}")
    if resolved.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ConfigError("DeepSpeed fp16 needs a GPU (its CPU accelerator refuses it); use \"bf16\" on CPU")
    if has_client_optimizer:
        if "optimizer" in resolved:
            raise ConfigError("both a DeepSpeed config 'optimizer' and a torch optimizer were given; use one")
        resolved.setdefault("zero_allow_untested_optimizer", True)
    elif "optimizer" not in resolved:
        raise ConfigError("DeepSpeed config has no 'optimizer' and no torch optimizer was given")
    elif not torch.cuda.is_available():
        params = resolved["optimizer"].setdefault("params", {})
        if str(resolved["optimizer"].get("type", "")).lower() in ("adam", "adamw"):
            params.setdefault("torch_adam", True)
    stage = int(resolved.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2):
        raise ConfigError(f"ZeRO stage {stage} is not supported for the backbone (use 1 or 2): stage 0 is plain "
                         "data parallelism (use engine ddp), stage 3 partitions the parameters, which the trainer's "
                         "direct use of the module (evaluation, export) does not handle")
    return resolved


def _safe_globals() -> list:
    """The DeepSpeed classes its ZeRO optimizer checkpoints pickle (plain data holders)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def load_engine_file(path: str | os.PathLike, map_location=None):
    """One of DeepSpeed's checkpoint files, read with ``torch.load(weights_only=True)`` admitting
    only the classes of :func:`_safe_globals`. torch's weights-only unpickler maps a global's
    full name to an allowed object by dictionary (no attribute walk: ``….os.system`` is refused)
    and refuses STACK_GLOBAL; a refused or damaged file raises CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip()[:300]
        raise CheckpointError(f"{path}: refusing to load a DeepSpeed checkpoint file with a global that is not "
                              f"allowed, or a damaged one: {reason}") from exc


def _use_weights_only_loading(engine) -> None:
    """Make the engine read its checkpoint files with ``torch.load(weights_only=True)``.

    DeepSpeed's own torch checkpoint engine unpickles with ``weights_only=False``; this one
    admits only tensors, containers and the few DeepSpeed data classes of :func:`_safe_globals`.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ConfigError(f"DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__} is not supported: "
                         "pfc reads engine checkpoints only with torch.load(weights_only=True); remove the "
                         "'checkpoint' engine settings from the DeepSpeed config")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_engine_file(path, map_location)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


class DeepSpeedRunner:
    """The backbone inside a DeepSpeed engine (a :class:`pfc.train.runners.base.BackboneRunner`);
    see the module docstring for the step."""

    engine = ENGINE
    head_update_in_backward = False  # DeepSpeed scales and divides the loss before the head's backward

    def __init__(self, engine, optimizer: torch.optim.Optimizer | None, grad_accumulation: int = 1):
        self.deepspeed_engine = engine
        self.optimizer = optimizer if optimizer is not None else engine.optimizer
        self.grad_accumulation = grad_accumulation
        self.training, self.frozen = True, False

    @property
    def model(self) -> torch.nn.Module:
        return self.deepspeed_engine.module

    @property
    def dtype(self) -> torch.dtype:
        if self.deepspeed_engine.bfloat16_enabled():
            return torch.bfloat16
        if self.deepspeed_engine.fp16_enabled():
            return torch.float16
        return torch.float32

    def train(self, mode: bool = True) -> None:
        self.training = mode
        self.deepspeed_engine.train(mode and not self.frozen)

    def set_frozen(self, frozen: bool) -> None:
        """Hold the backbone (``frozen``) or let it train: while frozen the engine never runs (its
        module embeds in eval mode under ``no_grad``; no backward, no engine step, its optimizer
        and counters untouched) and only the head steps (see :mod:`pfc.train.finetune`)."""
        if frozen != self.frozen:
            self.frozen = frozen
            self.train(self.training)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[b, D]`` in float32 (the head computes in full precision)."""
        return self.deepspeed_engine(images.to(self.dtype)).float()

    def backward(self, loss: torch.Tensor, head_parameters=()) -> None:
        """Back-propagate ``loss`` through the head and the engine.

        DeepSpeed scales the loss by the fp16 loss scale and divides it by the accumulation
        steps; the head's gradients are unscaled here (the division by the accumulation steps
        stays, as for the backbone), so the head optimizer sees true gradients.
        """
        scale = _loss_scale(self.deepspeed_engine)
        self.deepspeed_engine.backward(loss)
        if scale != 1.0:
            for parameter in head_parameters:
                if parameter.grad is not None:
                    parameter.grad.mul_(1.0 / scale)

    def forward_backward(self, images, labels, head, last_micro):
        if self.frozen:  # the head alone; its loss divided by the accumulation steps as DeepSpeed's backward does
            with torch.no_grad():
                embeddings = self.deepspeed_engine.module(images.to(self.dtype)).float()
            loss = head(embeddings, labels) / self.grad_accumulation
            loss.backward()
            return loss.detach()
        loss = head(self.embed(images), labels)
        self.backward(loss, head_parameters=[head.weight])
        if not last_micro:  # DeepSpeed accumulates itself: its step updates only at the boundary
            self.deepspeed_engine.step()
        return loss.detach() / self.grad_accumulation

    def gradients_finite(self) -> bool:
        """True: DeepSpeed checks the gradients itself (ZeRO-1/2 skip a step whose gradients are
        not finite, all ranks alike, and :meth:`step` then returns False); the ZeRO-partitioned
        gradients are not the parameters' ``.grad``."""
        return True

    def engine_step(self) -> bool:
        """One optimizer step of the engine (at an accumulation boundary); False when DeepSpeed
        skipped it: ZeRO-1/2 skip a step whose gradients hold inf/NaN (fp16 overflow, or a
        non-finite gradient norm in fp32/bf16), decided on all ranks alike."""
        self.deepspeed_engine.step()
        return bool(self.deepspeed_engine.was_step_applied())

    def step(self, head_optimizer, found_inf=None):
        skip = found_inf is not None and bool(found_inf)  # on the host: DeepSpeed's own step reads its flags there too
        if self.frozen:
            if not skip:
                head_optimizer.step()
            head_optimizer.zero_grad(set_to_none=True)
            return not skip
        if skip:
            self.skip(head_optimizer)
            return False
        applied = self.engine_step()  # clipping and the backbone step are DeepSpeed's
        if applied:
            head_optimizer.step()
        self.deepspeed_engine.zero_grad()
        head_optimizer.zero_grad(set_to_none=True)
        return applied

    def skip(self, head_optimizer):
        # DeepSpeed's own step keeps its counters right; ZeRO-1/2 skip the update themselves when
        # the gradients are not finite (which a non-finite loss makes them)
        if self.engine_step():
            warnings.warn("DeepSpeed applied the backbone update of a step whose loss was not finite "
                          "(its gradients were)")
        self.deepspeed_engine.zero_grad()
        head_optimizer.zero_grad(set_to_none=True)

    def checkpoint_state(self) -> dict[str, Any]:
        return {}  # module, ZeRO partitions and engine state go to DeepSpeed's own files

    def save_engine_state(self, directory: Path) -> None:
        """DeepSpeed's own (collective) save of module, ZeRO optimizer partitions, scheduler."""
        self.deepspeed_engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)

    def parts_to_load(self, saved_engine: str) -> set[str]:
        return set() if saved_engine == ENGINE else {"backbone"}

    def restore(self, parts, engine_directory, saved_engine, same_world_size):
        """From DeepSpeed on the same world size: DeepSpeed's own load (weights, ZeRO optimizer
        partitions, engine state). On another world size (ZeRO-1/2 partitions cannot be
        re-partitioned by DeepSpeed) and from a DDP checkpoint: the weights only."""
        if saved_engine != ENGINE:
            self.load_module_weights(parts["backbone"])
            return False
        load_path, _ = self.deepspeed_engine.load_checkpoint(
            str(engine_directory), tag=ENGINE_TAG, load_module_only=not same_world_size,
            load_optimizer_states=same_world_size, load_lr_scheduler_states=same_world_size)
        if load_path is None:
            raise CheckpointError(f"no DeepSpeed engine checkpoint {ENGINE_TAG!r} in {engine_directory}")
        return same_world_size

    def load_module_weights(self, state_dict: dict) -> None:
        """Put backbone weights (e.g. from a DDP checkpoint) into the engine, fp32 masters included."""
        self.deepspeed_engine.module.load_state_dict(state_dict)
        if hasattr(self.deepspeed_engine.optimizer, "refresh_fp32_params"):
            self.deepspeed_engine.optimizer.refresh_fp32_params()


def read_module_weights(engine_directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone weights from the model-states file DeepSpeed wrote under ``engine_directory``
    (read with ``weights_only=True``; DeepSpeed itself need not be installed)."""
    files = sorted((Path(engine_directory) / ENGINE_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"no DeepSpeed model states under {engine_directory}/{ENGINE_TAG}")
    try:
        payload = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {files[0]}: {exc}") from exc
    if not isinstance(payload, dict) or "module" not in payload:
        raise CheckpointError(f"{files[0]} holds no 'module' weights")
    return payload["module"]


def build_deepspeed_runner(backbone: torch.nn.Module, config: dict | str | os.PathLike, *,
                             micro_batch_size: int, grad_accumulation: int = 1, grad_clip: float = 0.0,
                             optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                             group=None, build_cpu_comm_op: bool = False) -> DeepSpeedRunner:
    """Wrap ``backbone`` with ``deepspeed.initialize`` (torch.distributed must be initialised).

    ``config`` is a DeepSpeed config dict or JSON file (ZeRO stage, bf16/fp16, …); batch size,
    accumulation and clipping come from the trainer (see :func:`resolve_deepspeed_config`).
    ``optimizer``: a torch optimizer over ``backbone.parameters()`` (or None to let the config
    build one). ``lr_scheduler`` is stepped by DeepSpeed after every applied step.
    ``build_cpu_comm_op``: let DeepSpeed compile its CPU inference all-reduce op (see the module
    docstring); training does not use it.
    """
    import torch.distributed as dist

    deepspeed = _import_deepspeed()
    if not dist.is_initialized():
        raise ConfigError("the DeepSpeed engine needs an initialised process group (launch with torchrun)")
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError("LOCAL_RANK is not set: DeepSpeed needs it (torchrun sets it; set it when "
                         "launching otherwise)")
    if not build_cpu_comm_op and not torch.cuda.is_available():
        _skip_cpu_comm_op()
    resolved = resolve_deepspeed_config(config, micro_batch_size, grad_accumulation, grad_clip,
                                        dist.get_world_size(group), has_client_optimizer=optimizer is not None)
    engine, _, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=resolved, model_parameters=None if optimizer is not None
                                           else [p for p in backbone.parameters() if p.requires_grad],
                                           mpu=None, dist_init_required=False)
    _use_weights_only_loading(engine)
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        keep_batchnorm_in_fp32(engine.module)
    return DeepSpeedRunner(engine, optimizer, grad_accumulation)


def _skip_cpu_comm_op() -> None:
    """Tell DeepSpeed its CPU ``shm_comm`` op is unavailable, so that starting its communication
    backend does not compile it (DeepSpeed keeps the probe result in one module-level dict, read
    when the backend starts; an unavailable op makes it use the process group only)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
