"""The training loop: data-parallel backbone, model-parallel Partial-FC head, verification, outputs.

    result = train(load_config("configs/synthetic_cpu.py", argv))   # under torchrun, or one process

One optimizer step (N ranks, ``grad_accumulation`` micro-batches of ``batch_size`` per rank):
  ``head.set_iteration`` seeds the step's sampling; the step's micro-batches are taken from the
  loader (labels range-checked there, on the host, before they move to the device); the host's
  control flags (a stop signal, a save due by rank 0's clock, a loading error) are combined in one
  all-reduce over a CPU group, so every rank raises the same loading error or stops and saves after
  the same step; for each micro-batch the runner embeds the images (DDP or DeepSpeed), the head
  computes the margin softmax over its shard of the class centers and the loss is back-propagated;
  then the step guard's mask (any rank's loss, backbone gradient norm or BatchNorm statistics not
  finite) is all-reduced on the device and the runner clips and steps both optimizers under it,
  and what the step changed before the mask was known is put back where it says skip; both LR
  schedules advance (during a fine-tuning run's first ``freeze_steps`` steps the backbone is
  frozen and only the head trains: :mod:`pfc.train.finetune`). The head is never wrapped in DDP:
  it owns its shard of the class centers and does its own collectives (see pfc/head).

No host synchronisation in a steady-state step (DDP engine): the loss and the head's stats are
summed on the device and read at log steps (every ``log_every``), when the host also learns of
skipped steps (:meth:`pfc.distributed.fault.StepGuard.review`: the warning, and the stop after
``max_nonfinite_skips`` in a row, come up to ``log_every`` steps late; nothing skipped was
applied meanwhile); the head validates its inputs collectively (``head.check_inputs``) only on
the run's first step and on log steps. DeepSpeed's engine reads its overflow flags on the host
inside its own step, so the guarantee is the DDP engine's.

Everything a resume needs lives in :class:`pfc.train.state.TrainState`: saved every
``save_every`` steps and every ``save_every_minutes`` minutes (rank 0's clock, decided in the
step's collective check), on a stop, and at the end when either is set; restored by ``resume``
(:mod:`pfc.train.resume`). A fresh run refuses an output folder holding another run's files
(:mod:`pfc.train.output`); a resumed one continues its logs from the checkpoint's step, what an
earlier attempt logged past it dropped (:func:`pfc.train.metrics.trim_logs`), and its summary
says how many steps it trained itself and in all.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from pfc.data.manifest import image_side, manifest_source, read_manifest
from pfc.distributed.agree import run_on_every_rank
from pfc.distributed.fault import StepDecision, StepGuard, StopSignals
from pfc.errors import ConfigError
from pfc.evaluation.export import save_backbone
from pfc.train.builders import build_loader, build_train_state
from pfc.train.config import TrainConfig, apply_dataset, to_dict
from pfc.train.finetune import read_init_backbone
from pfc.train.finite import NonFiniteLossError, NonFiniteStateError, check_state_finite  # noqa: F401 (re-exported)
from pfc.train.metrics import MetricsWindow, SkippedSamples, TrainLogger, TripletIdleWarning, trim_logs, write_json
from pfc.train.output import claim_output
from pfc.train.resume import INIT_RECORD, checkpoint_to_resume, restore_train_state, save_train_checkpoint
from pfc.train.rollback import StepRollback
from pfc.train.runtime import Runtime, init_runtime, seed_everything
from pfc.train.state import TrainState
from pfc.train.validation import load_val_sets, run_verification


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank: optimizer steps done, the last step's loss, the
    final verification summaries (rank 0; empty after a stop), the steps skipped for a
    non-finite loss, and why the run stopped early ("" when it ran to the end)."""

    steps: int
    final_loss: float
    eval: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    stopped: str = ""


def train(config: TrainConfig, runtime: Runtime | None = None) -> TrainResult:
    """Train per ``config`` under torchrun (or in one process).

    Outputs in ``config.output`` (rank 0): config.json (resolved, with ``init_backbone``: where
    the weights of a fine-tuning run came from, :mod:`pfc.train.finetune`), metrics.jsonl, eval.jsonl,
    eval_results.json, roc.png, backbone.pt, tensorboard/ when installed, and checkpoints.
    Raises NonFiniteLossError (after writing a checkpoint) when the loss stays non-finite, and
    NonFiniteStateError (on every rank, nothing written) when a checkpoint or backbone.pt would
    hold inf/NaN. backbone.pt is written before the final verification.
    """
    runtime = runtime or init_runtime()
    if not config.data.root:
        raise ConfigError("no training data: set --data DIR (a folder with dataset.json and the shards)")
    claim_output(config, runtime)
    manifest = read_manifest(config.data.root)
    config = apply_dataset(config, int(manifest["num_classes"]), int(manifest["num_samples"]),
                           manifest_source(config.data.root))
    image_size = image_side(manifest)
    val_sets = load_val_sets(config, runtime, image_size)
    seed_everything(config.seed, runtime.rank)
    batches_per_epoch = len(build_loader(config, runtime, epoch=0))
    steps_per_epoch = batches_per_epoch // config.optim.grad_accumulation
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch has {batches_per_epoch} batches per rank, fewer than grad_accumulation="
                          f"{config.optim.grad_accumulation}: use more data or a smaller batch_size")
    resume_from = checkpoint_to_resume(config, runtime)
    init = None if resume_from else read_init_backbone(config, runtime, image_size)  # resumed: the checkpoint's weights
    resolved = to_dict(config)
    if init is not None:
        resolved[INIT_RECORD] = init.record()
    state = build_train_state(config, runtime, image_size, steps_per_epoch, resolved,
                              init_weights=init.state_dict if init is not None else None)
    del init  # the weights are in the model now
    restore_train_state(state, config, runtime, resume_from)
    start_step = state.step
    # a resumed run's logs continue from its checkpoint: what an earlier attempt logged after it goes
    earlier_evals = run_on_every_rank(lambda: trim_logs(config.output, start_step) if runtime.is_main else [],
                                      f"trimming the logs in {config.output} to step {start_step}")
    if runtime.is_main:  # only now: a run that fails to start leaves nothing behind
        os.makedirs(config.output, exist_ok=True)
        write_json(os.path.join(config.output, "config.json"), state.config)
        if runtime.device.type != "cuda" and config.backbone.precision != "fp32" and config.backbone.engine == "ddp":
            print(f"note: precision {config.backbone.precision} applies on GPU only; training in fp32 on CPU")
    with TrainLogger(config.output, runtime.is_main, start_step) as logger:
        start = time.perf_counter()
        # _run polls its own handlers; these outer ones are in force once it returns, so that a
        # repeated SIGTERM (schedulers often send two) cannot kill the stop's checkpoint half-way
        outer_signals = StopSignals()
        try:
            last_loss, stopped, guard, history = _run(state, config, runtime, logger, val_sets, image_size)
            if stopped or config.checkpoint.every or config.checkpoint.every_minutes:  # a stop saves regardless
                path = save_train_checkpoint(state, config)
                if stopped and not guard.gave_up and runtime.is_main:
                    print(f"stopped at step {state.step}: {stopped}; checkpoint {path} (continue with --resume auto)")
        finally:
            outer_signals.restore()
        if stopped and guard.gave_up:
            raise NonFiniteLossError(f"stopped at step {state.step}: {stopped}; the last good state is in the "
                                     f"checkpoint {path}")
        if stopped:
            return TrainResult(state.step, last_loss, [], state.skipped_steps, stopped)
        summaries = _finish(state, config, runtime, logger, val_sets, image_size, earlier_evals + history)
        if runtime.is_main:
            in_all = f" ({state.step} in all)" if start_step else ""
            print(f"trained {state.step - start_step} steps{in_all} in {time.perf_counter() - start:.1f} s; "
                  f"outputs in {config.output}")
    return TrainResult(state.step, last_loss, summaries, state.skipped_steps)


def _run(state: TrainState, config: TrainConfig, runtime: Runtime, logger: TrainLogger, val_sets, image_size: int):
    """The epochs, from ``state``'s position to ``total_steps`` or a stop; returns
    ``(last loss, stop reason or "", the step guard, verification summaries so far)``.

    Host reads of device values happen at "host steps" only: log steps, saves and stops (the
    guard's counts, so that a checkpoint holds the exact number of skipped steps)."""
    stop_signals, guard = StopSignals(), StepGuard(config.checkpoint.max_nonfinite_skips)
    last_save, save_period_s = time.monotonic(), config.checkpoint.every_minutes * 60
    window = MetricsWindow(config.data.batch_size * config.optim.grad_accumulation * runtime.world_size)
    idle_triplet = TripletIdleWarning(config.head.triplet.weight, runtime.is_main)
    last_loss, stopped, history, first_step = None, "", [], True
    batches_per_epoch = state.steps_per_epoch * config.optim.grad_accumulation
    state.runner.train()
    state.head.train()
    rollback = StepRollback(state.runner.model, state.head, state.head_optimizer,
                            state.runner.head_update_in_backward)
    samples_skipped = SkippedSamples(guard.control_group)
    skipped_before = state.skipped_steps  # a resumed run's earlier skips
    try:
        while state.step < state.total_steps and not stopped:
            # a resumed run starts at its position in the epoch (nothing before it is read again)
            epoch_loader = build_loader(config, runtime, state.epoch, start_batch=state.batch_in_epoch)
            samples_skipped.follow(epoch_loader)
            loader = iter(epoch_loader)
            steps = min(state.steps_per_epoch - state.batch_in_epoch // config.optim.grad_accumulation,
                        state.total_steps - state.step)
            bar = tqdm(total=steps, desc=f"epoch {state.epoch}", dynamic_ncols=True, leave=False,
                       disable=not (runtime.is_main and sys.stderr.isatty()))
            for _ in range(steps):
                lr_used = state.runner.optimizer.param_groups[0]["lr"]
                save_due = runtime.is_main and 0 < save_period_s <= time.monotonic() - last_save  # rank 0 decides
                log_step = (state.step + 1) % config.log_every == 0 or state.step + 1 == state.total_steps
                last_loss, stats, decision = train_step(state, config, runtime, loader, guard, stop_signals,
                                                        rollback, save_due, check_inputs=first_step or log_step)
                first_step = False
                state.step += 1
                window.add(last_loss, stats)
                bar.update(1)
                save = decision.save or bool(config.checkpoint.every and state.step % config.checkpoint.every == 0)
                if log_step or save or decision.stop:  # the host learns of the skipped steps
                    review = guard.review(state.step)
                    state.skipped_steps = skipped_before + guard.skipped_total
                    decision = review if review.stop else decision  # giving up outranks a signal
                if log_step:
                    record = window.record(state, lr_used)
                    idle_triplet.check(record, write=tqdm.write)   # once: a triplet term with no pairs
                    record["skipped_samples"] = samples_skipped.total_over_ranks()  # collective, at log steps
                    logger.log_train(record, write=tqdm.write)
                if decision.stop:  # before a verification: the stop must fit in the scheduler's grace period
                    stopped = decision.reason
                    break
                if config.eval.every and state.step % config.eval.every == 0 and state.step < state.total_steps:
                    summaries = run_verification(state, val_sets, config, runtime, image_size)
                    logger.log_eval(summaries, write=tqdm.write)
                    history.extend(summaries)
                if save:
                    save_train_checkpoint(state, config)
                    last_save = time.monotonic()
            bar.close()
            if state.batch_in_epoch >= batches_per_epoch:  # the epoch ran to its end
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        stop_signals.restore()
        rollback.close()
    return (float("nan") if last_loss is None else float(last_loss)), stopped, guard, history


def _finish(state: TrainState, config: TrainConfig, runtime: Runtime, logger: TrainLogger, val_sets,
            image_size: int, history: list[dict]) -> list[dict]:
    """backbone.pt (first: a failure in the verification cannot lose the model; refused on every
    rank when the state is not finite), then the final verification (with the ROC plot) and
    eval_results.json."""
    output = config.output
    check_state_finite(state, "the final save of backbone.pt")
    if runtime.is_main:
        save_backbone(state.runner.model, os.path.join(output, "backbone.pt"), network=config.backbone.network,
                      embedding_size=config.backbone.embedding_size, image_size=image_size)
    summaries = run_verification(state, val_sets, config, runtime, image_size, os.path.join(output, "roc.png"))
    logger.log_eval(summaries)
    if runtime.is_main:
        write_json(os.path.join(output, "eval_results.json"), {"final": summaries, "history": history + summaries})
    return summaries


def _next_batches(state: TrainState, config: TrainConfig, loader, guard: StepGuard, stop_signals: StopSignals,
                  save_due: bool):
    """The step's ``grad_accumulation`` micro-batches as the loader hands them over, and the step's
    control decision: one all-reduce of the host's flags (:meth:`StepGuard.control`), in which a
    loading failure on any rank (a label outside [0, num_classes) found by the loader, a corrupt
    shard, a loader that ends early) is raised on every rank alike. All of the step's batches are
    taken first, so that no rank starts a collective of the step that another cannot join."""
    batches, error = [], None
    first, count = state.batch_in_epoch, config.optim.grad_accumulation
    try:
        while len(batches) < count:
            batches.append(next(loader))
    except StopIteration:
        error = RuntimeError(f"the loader of epoch {state.epoch} ended after {first + len(batches)} "
                             f"batches, before the {state.steps_per_epoch} steps it announced")
    except Exception as exc:  # a data error (e.g. a label outside [0, num_classes))
        error = exc
    batch_names = f"batch {first}" if count == 1 else f"batches {first}–{first + count - 1}"
    decision = guard.control(stop_signals.requested, save_due, error, f"loading {batch_names} of epoch {state.epoch}")
    return batches, decision


def train_step(state: TrainState, config: TrainConfig, runtime: Runtime, loader, guard: StepGuard,
               stop_signals: StopSignals, rollback: StepRollback, save_due: bool = False,
               check_inputs: bool = True) -> tuple[torch.Tensor, dict, StepDecision]:
    """One optimizer step over ``grad_accumulation`` micro-batches from ``loader``; returns
    (loss, head stats, the step's control decision), the loss and the stats as 0-d device tensors
    (the mean over micro-batches), unread.

    Before any collective of the step, the host's flags are agreed (:func:`_next_batches`): a
    loading error on any rank is raised on every rank; a stop signal on any rank stops every rank
    after this step; ``save_due`` on any rank (rank 0's clock) saves after it. Before the update,
    ``guard`` makes the skip mask on the device: a non-finite loss, backbone gradient or BatchNorm
    statistic on any rank skips the update of both optimizers, and ``rollback`` puts back what the
    step changed before the mask was known (BatchNorm statistics, centers updated in the head's
    backward), so a skipped step (or one the engine skipped itself: an fp16 overflow) leaves the
    whole model state as it was; the LR schedules still advance (the step index moves on). The
    host learns of skips at the next :meth:`StepGuard.review`. ``check_inputs``: the head
    validates its inputs collectively (host syncs; the run's first step and log steps). The
    first ``backbone.freeze_steps`` steps train the head only (:meth:`set_frozen` of the runner).
    """
    state.head.set_iteration(state.step)
    state.runner.set_frozen(state.step < config.backbone.freeze_steps)  # the host's counter: no sync
    batches, decision = _next_batches(state, config, loader, guard, stop_signals, save_due)
    state.head.check_inputs = check_inputs
    rollback.begin()
    step_loss, stats = None, {}
    for micro, (images, labels) in enumerate(batches):
        images = images.to(runtime.device, non_blocking=True)  # no-op when the loader put them there
        labels = labels.to(runtime.device, non_blocking=True)
        loss = state.runner.forward_backward(images, labels, state.head, micro == len(batches) - 1)
        step_loss = loss if step_loss is None else step_loss + loss
        state.batch_in_epoch += 1
        for key, value in state.head.step_stats.items():  # 0-d device tensors, unread
            share = value / len(batches)
            stats[key] = stats[key] + share if key in stats else share
    found_inf = guard.found_inf(step_loss, state.runner.gradients_finite(), rollback.buffers_finite())
    applied = state.runner.step(state.head_optimizer, found_inf)
    rollback.restore(~applied if isinstance(applied, torch.Tensor) else not applied)
    with warnings.catch_warnings():
        # a frozen backbone's optimizer is not stepped, yet its schedule counts the step (its warmup
        # starts after the frozen steps): torch's "lr_scheduler.step() before optimizer.step()"
        # warning does not apply (the rates are those of the schedule, none skipped)
        if state.runner.frozen:
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for scheduler in state.schedulers.values():
            scheduler.step()
    return step_loss, stats, decision
