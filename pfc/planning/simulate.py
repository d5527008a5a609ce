"""One rank of a training job, run with the trainer's own code under the memory and work counters.

    result = simulate(job)                       # fake CUDA, fake process group of job.gpus ranks
    result = run_tracked(job, runtime, ...)      # the same steps for real (the validation on CPU)

What runs is the trainer's: :func:`pfc.train.builders.build_train_state` (backbone in its
runner, PartialFC, both optimizers) and :func:`pfc.train.loop.train_step` with its guard and
rollback, for ``steps`` full steps (the first allocates the optimizer states and the head's
scratch; the last is the steady state whose host syncs are counted). The batch is handed over
already on the device. Module hooks only name the phase that allocates (backbone forward, head,
backbone backward, optimizer step) and tag storages known by identity (parameters, centers,
their momentum, gradients, optimizer states).

The simulated rank is a GPU rank: the head makes its centers on the device (its device path),
while the real CPU run of the validation takes the head's CPU path; the two differ at setup
only. Two things stand in for what fake tensors cannot run: the backbone is made on the device
directly (a fake parameter cannot be moved by ``Module.to``), and DDP is :class:`SimulatedDDP`
(its C++ reducer reads tensor data); the runner's autocast and fp16 loss scaling, enabled on
device type ``cuda`` only, are enabled the same way on the simulated GPU (bf16/fp16 autocast; fp16
with a ``GradScaler`` on the device, so the head's update leaves its backward as on a GPU).
Attention (the ViTs) takes CUDA's fused kernels, flash or memory-efficient, as on a GPU
(:func:`pfc.planning.sim_device.gpu_attention`), not the math path a Python device gets.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from pfc.host_syncs import HostSyncCounter
from pfc.planning.fake_gpu import FakeGpu
from pfc.planning.job import Job, train_config
from pfc.planning.sim_device import fake_process_group, fake_tensor_mode, gpu_attention, sim_device
from pfc.planning.tracker import MemoryTracker
from pfc.planning.work import WorkCounter
from pfc.train.runtime import Runtime


@dataclass
class RankResult:
    """What one rank's run saw, as plain numbers (so that runs at two class counts combine):
    per phase, bytes by category at its high-water mark; the last step's host syncs and fake-GPU
    findings (``"kind at file:line"`` → count) and setup's findings; the last step's flops, bytes
    moved, kernel launches and collective payload per part, bytes per op class and part, and
    roofline seconds per GPU and part."""

    phase_peaks: dict[str, dict[str, int]]
    host_syncs: dict[str, int]
    step_findings: dict[str, int] = field(default_factory=dict)
    setup_findings: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    moved_bytes: dict[str, int] = field(default_factory=dict)
    comm_bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    launches: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, dict[str, int]] = field(default_factory=dict)
    num_local: int = 0
    sampled_rows: int = 0

    @property
    def peak_bytes(self) -> int:
        return max((sum(categories.values()) for categories in self.phase_peaks.values()), default=0)

    @property
    def categories(self) -> dict[str, int]:
        """Bytes by category at the overall high-water mark."""
        return max(self.phase_peaks.values(), key=lambda categories: sum(categories.values()))


class _Batches:
    """The loader of a simulation: the same batch, already on the device, every time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.batch = (images, labels)

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch


class _Phases:
    """Names the phase for every counter at once: tracker label, fake-CUDA phase, work part."""

    def __init__(self, tracker: MemoryTracker, work: WorkCounter | None, fake: FakeGpu | None):
        self.tracker, self.work, self.fake = tracker, work, fake

    def set(self, label, part: str) -> None:
        self.tracker.label = label
        self.tracker.phase = part
        if self.work is not None:
            self.work.part = part
        if self.fake is not None:
            self.fake.set_phase(part)


def _head_label(embedding_size: int, gathered: int, local: int):
    """Category of a storage the head creates: ``[rows, D]`` blocks that are neither this rank's
    features nor the gathered batch are sampled center rows (or their momentum, or copies of
    them); everything else is logits and the softmax's scratch."""
    def label(tensor: torch.Tensor) -> str:
        if tensor.dim() == 2 and tensor.shape[1] == embedding_size and tensor.shape[0] not in (local, gathered):
            return "sampled rows"
        return "logits and head scratch"
    return label


def _instrument(state, phases: _Phases, tracker: MemoryTracker, job: Job, world_size: int):
    """Hooks that name the phases and tag gradients; returns their handles."""
    model, head = state.runner.model, state.head
    handles = [model.register_forward_pre_hook(lambda *_: phases.set("activations", "backbone"))]
    head_label = _head_label(job.embedding_size, job.batch_size * world_size, job.batch_size)

    def head_pre(_module, inputs):
        phases.set(head_label, "head")
        features = inputs[0]
        if features.requires_grad:  # fires once the head's backward has produced it
            features.register_hook(lambda grad: phases.set("activations", "backbone"))

    handles.append(head.register_forward_pre_hook(head_pre))
    for parameter in (p for p in model.parameters() if p.requires_grad):
        handles.append(parameter.register_post_accumulate_grad_hook(
            lambda p: tracker.tag(p.grad, "gradients")))
    runner_step, runner_finite = state.runner.step, state.runner.gradients_finite

    def step(head_optimizer, *args, **kwargs):
        phases.set("optimizer state", "optimizer")
        applied = runner_step(head_optimizer, *args, **kwargs)
        for optimizer in (state.runner.optimizer, head_optimizer):
            for values in optimizer.state.values():
                for value in values.values():
                    if isinstance(value, torch.Tensor) and not any(value is kept for kept in _center_states(state)):
                        tracker.tag(value, "optimizer state")
        phases.set("other", "other")
        return applied

    def gradients_finite():
        phases.set("other", "other")
        return runner_finite()

    state.runner.step, state.runner.gradients_finite = step, gradients_finite
    return handles


def _center_states(state) -> list[torch.Tensor]:
    """The centers' per-row optimizer states (SGD's momentum; AdamW's two moments and step
    counts): the "momentum" category, which grows with the classes as the centers do."""
    return list(state.head_optimizer.row_states(state.head.weight).values())


@contextlib.contextmanager
def _trainer_on_sim_gpu(device: torch.device):
    """Fake tensors cannot move between devices as modules (``Module.to`` swaps each parameter,
    which a fake parameter refuses): the backbone is made on ``device`` directly, and its
    ``.to(device)`` then has nothing to move. The runner autocasts and scales fp16 losses on
    ``device`` as it does on ``cuda``."""
    import pfc.train.builders as builders

    original_build, original_to, original_runner = builders.build_backbone, nn.Module.to, builders.build_runner

    def build_backbone(*args, **kwargs):
        with torch.device(device):
            return original_build(*args, **kwargs)

    def to(module, *args, **kwargs):
        target = torch._C._nn._parse_to(*args, **kwargs)[0]
        tensors = list(module.parameters()) + list(module.buffers())
        if target is not None and all(t.device == torch.device(target) for t in tensors):
            return module
        return original_to(module, *args, **kwargs)

    def build_runner(config, runtime, model, optimizer):
        runner = original_runner(config, runtime, model, optimizer)
        precision = config.backbone.precision
        if precision != "fp32":   # as builders.build_runner on cuda
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            runner.autocast_dtype = dtype
            runner._autocast = lambda where: torch.autocast(where.type, dtype=dtype)
        if precision == "fp16":
            runner.grad_scaler = torch.amp.GradScaler(device.type)
            runner.head_update_in_backward = False
        return runner

    original_ddp = nn.parallel.DistributedDataParallel
    builders.build_backbone, nn.Module.to, builders.build_runner = build_backbone, to, build_runner
    nn.parallel.DistributedDataParallel = SimulatedDDP
    try:
        yield
    finally:
        builders.build_backbone, nn.Module.to, builders.build_runner = original_build, original_to, original_runner
        nn.parallel.DistributedDataParallel = original_ddp


class SimulatedDDP(nn.Module):
    """DDP's memory and traffic on fake tensors, whose C++ reducer cannot run on them: one flat
    gradient bucket per dtype made at construction (DDP's default, ``gradient_as_bucket_view=
    False``, keeps a copy of every gradient in its buckets), all-reduced once every gradient of
    the last micro-batch is accumulated (outside ``no_sync``). The real CPU run of the
    validation uses the real DDP, which checks this model."""

    def __init__(self, module: nn.Module, device_ids=None, **_options):
        super().__init__()
        self.module = module
        self._parameters_left = [p for p in module.parameters() if p.requires_grad]
        sizes: dict[torch.dtype, int] = {}
        for parameter in self._parameters_left:
            sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
        device = self._parameters_left[0].device
        self.buckets = [torch.empty(size, dtype=dtype, device=device) for dtype, size in sizes.items()]
        self._sync, self._ready = True, 0
        for parameter in self._parameters_left:
            parameter.register_post_accumulate_grad_hook(self._gradient_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _gradient_ready(self, _parameter) -> None:
        self._ready += 1
        if self._ready == len(self._parameters_left):
            self._ready = 0
            if self._sync:
                for bucket in self.buckets:
                    torch.distributed.all_reduce(bucket)


def run_tracked(job: Job, runtime: Runtime, tracker: MemoryTracker, *, steps: int = 2, work: WorkCounter | None = None,
                fake: FakeGpu | None = None, batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                progress=None) -> RankResult:
    """Build the trainer's state for ``job`` on ``runtime`` and run ``steps`` steps under ``tracker``
    (already active), with ``work`` counting the last step. ``batch``: this rank's (images,
    labels) on the device (default: empty images, zero labels). ``progress(n)`` is called as
    phases finish."""
    from pfc.distributed.fault import StepGuard, StopSignals
    from pfc.train.builders import build_train_state
    from pfc.train.loop import train_step
    from pfc.train.rollback import StepRollback

    config = train_config(job)
    phases = _Phases(tracker, work, fake)
    phases.set("other", "setup")
    if batch is None:
        batch = (torch.empty(job.batch_size, 3, job.image_size, job.image_size, device=runtime.device),
                 torch.zeros(job.batch_size, dtype=torch.int64, device=runtime.device))
    for tensor in batch:
        tracker.tag(tensor, "activations")
    state = build_train_state(config, runtime, job.image_size, steps, {})
    _tag_state(state, tracker)
    if progress:
        progress(1)
    rollback = StepRollback(state.runner.model, state.head, state.head_optimizer, state.runner.head_update_in_backward)
    # the host's control flags go over a CPU group beside the device's (gloo beside NCCL); a fake
    # default group serves them as well
    control = torch.distributed.group.WORLD if fake is not None else None
    guard, stop_signals = StepGuard(config.checkpoint.max_nonfinite_skips, control=control), StopSignals()
    handles = _instrument(state, phases, tracker, job, runtime.world_size)
    counter, step_findings = HostSyncCounter(), {}
    state.runner.train()
    state.head.train()
    try:
        for number in range(steps):
            last = number == steps - 1
            phases.set("other", "other")
            if last and work is not None:
                work.reset()
            before = dict(fake.findings) if fake is not None else {}
            with counter if last else contextlib.nullcontext():
                # as the trainer: inputs checked collectively on the first step (and log steps)
                train_step(state, config, runtime, _Batches(*batch), guard, stop_signals, rollback,
                           check_inputs=number == 0)
            if last and fake is not None:
                step_findings = {site: n - before.get(site, 0) for site, n in fake.findings.items()
                                 if n > before.get(site, 0)}
            if last and work is not None:
                step_findings.update({f"pfc op without a declared cost (charged as elementwise): {name}": calls
                                      for name, calls in work.undeclared.items()})
            phases.set("other", "other")
            if progress:
                progress(1)
    finally:
        stop_signals.restore()
        rollback.close()
        for handle in handles:
            handle.remove()
    index = state.head.last_sample[0] if state.head.last_sample else None
    result = RankResult(tracker.phase_peaks(), dict(counter.sites), step_findings,
                        dict(fake.by_phase.get("setup", {})) if fake else {},
                        num_local=state.head.num_local,
                        sampled_rows=state.head.num_local if index is None else int(index.shape[0]))
    if work is not None:
        result.flops, result.moved_bytes, result.comm_bytes = dict(work.flops), dict(work.bytes), dict(work.comm_bytes)
        result.launches = dict(work.launches)
        result.by_class = {part: dict(classes) for part, classes in work.by_class.items()}
        for (gpu, part), seconds in work.seconds.items():
            result.seconds.setdefault(gpu, {})[part] = seconds
    return result


def _tag_state(state, tracker: MemoryTracker) -> None:
    model = state.runner.model
    for tensor in list(model.parameters()) + list(model.buffers()):
        tracker.tag(tensor, "backbone parameters")
    tracker.tag(state.head.weight, "centers")
    for tensor in _center_states(state):
        tracker.tag(tensor, "momentum")


def simulate(job: Job, *, steps: int = 2, progress=None, counter=WorkCounter) -> RankResult:
    """Rank 0 of ``job`` on fake CUDA tensors with a fake process group of ``job.gpus`` ranks;
    ``counter``: the work counter's class (a WorkCounter)."""
    tracker, work, fake = MemoryTracker(), counter(), FakeGpu()
    runtime = Runtime(rank=0, world_size=job.gpus, local_rank=0, device=sim_device())
    # the work counter sits above the fake GPU (entered last, it sees each op first): it sees
    # the fused optimizers, which the fake GPU answers without running them
    with fake_process_group(job.gpus), _trainer_on_sim_gpu(runtime.device), fake_tensor_mode(), tracker, fake, work, \
            gpu_attention():
        return run_tracked(job, runtime, tracker, steps=steps, work=work, fake=fake, progress=progress)


