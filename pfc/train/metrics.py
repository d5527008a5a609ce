"""Rank-0 bookkeeping: averaged metrics per log window, console lines, JSONL files, TensorBoard;
the count of corrupt samples the loaders skipped, summed over the ranks at log steps.

A resumed run (``--resume``, or a torchrun restart) continues the logs of the run it resumes
from the checkpoint's step: :func:`trim_logs` drops the rows the earlier attempt wrote past that
step (the steps are trained again), and :class:`TrainLogger` purges its TensorBoard events past
it, so that every step is logged once.
"""
from __future__ import annotations

import json
import os
import time

import torch

from pfc.distributed.collectives import all_reduce_
from pfc.evaluation.roc import format_rate
from pfc.files import write_atomic
from pfc.host_syncs import read_host
from pfc.train.state import TrainState


class MetricsWindow:
    """Averages of the loss and the head's stats over the steps since the last log line.

    :meth:`add` takes the step's values as they come (0-d device tensors: the loss and
    ``head.step_stats``; floats work too) and sums them where they are, without reading them;
    :meth:`record` reads the sums at a log step, all in one host synchronisation.
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor | float, stats: dict) -> None:
        self.count += 1
        for key, value in {**stats, "loss": loss}.items():  # the step's loss, whatever the head calls its own
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float32)
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def record(self, state: TrainState, lr: float) -> dict:
        """The log record (step, epoch, loss, ce, accuracy, …, lr, samples/s, ETA); starts a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        names = [name for name, value in self.sums.items() if isinstance(value, torch.Tensor)]
        values = torch.stack([self.sums[name] for name in names]).tolist() if names else []  # the one read
        sums = {**self.sums, **dict(zip(names, values))}
        record = {"step": state.step, "epoch": state.epoch, "loss": sums.pop("loss", float("nan")) / self.count}
        record.update({key: value / self.count for key, value in sums.items()})
        record["lr"] = lr
        record["samples_per_s"] = self.samples_per_step * self.count / elapsed
        record["eta_s"] = (state.total_steps - state.step) * elapsed / self.count
        self._reset()
        return record


class SkippedSamples:
    """The corrupt samples / tar errors the loaders of this run skipped (``loader.stats["skipped"]``),
    over the epochs: :meth:`follow` each epoch's loader, :meth:`total_over_ranks` at a log step."""

    def __init__(self, group=None):
        self.group = group   # a CPU (gloo) group: the counts live on the host
        self.done_epochs = 0
        self.loader = None

    def follow(self, loader) -> None:
        """Count ``loader`` (the new epoch's) from now on, after the earlier ones."""
        if self.loader is not None:
            self.done_epochs += int(self.loader.stats["skipped"])
        self.loader = loader

    def total_over_ranks(self) -> int:
        """Collective (one all-reduce of one number over ``group``; every rank calls it at the same
        steps): the samples skipped so far in this run, summed over the ranks; no device involved."""
        mine = self.done_epochs + (int(self.loader.stats["skipped"]) if self.loader is not None else 0)
        return int(read_host(all_reduce_(torch.tensor([mine], dtype=torch.int64), group=self.group))[0])


class TripletIdleWarning:
    """A warning, once, on the first log record of a run with the triplet term on
    (``triplet_weight > 0``) when the term used no pair over that whole window: with uniformly
    shuffled batches over many identities no class appears twice in a gathered batch, so the term
    silently does nothing. Reads the window's ``triplet_pairs`` and ``triplet_rows_with_positive``
    (averages over its steps; 0 only when every step had none).

        idle_triplet = TripletIdleWarning(config.head.triplet.weight, runtime.is_main)
        ...   # at each log step, after the window's record is made:
        idle_triplet.check(record, write=tqdm.write)
    """

    def __init__(self, triplet_weight: float, enabled: bool):
        self.pending = bool(enabled) and triplet_weight > 0

    def check(self, record: dict, write=print) -> None:
        """Warn (with ``write``) if ``record``, the first log record seen, shows no triplet pair."""
        if not self.pending or "triplet_pairs" not in record:
            return
        self.pending = False
        if record["triplet_pairs"] > 0:
            return
        if record.get("triplet_rows_with_positive", 0.0) > 0:
            cause = ("rows with a positive were found but the semi-hard selection kept no pair "
                     "(--head.triplet.semihard false keeps every pair)")
        else:
            cause = ("no identity appeared twice in a gathered batch; use identity-balanced batches: "
                     "--sampler pk --pk_k 4 (K images of each of batch_size/K identities, see the README)")
        write(f"warning: the triplet term (triplet_weight > 0) used no pair in the first log window (to step "
              f"{record['step']}) and adds nothing to the loss: {cause}")


METRICS_LOG, EVAL_LOG, TENSORBOARD_DIR = "metrics.jsonl", "eval.jsonl", "tensorboard"


def _rows_up_to(path: str, last_step: int) -> tuple[list[dict], bool]:
    """``(rows of the JSONL file at path with "step" <= last_step, whether any line was left out)``;
    a line that is not a JSON object with a step (the half-written last line of a killed process)
    is left out."""
    kept, dropped = [], False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(row)
            else:
                dropped = dropped or bool(line.strip())
    return kept, dropped


def trim_logs(output: str, last_step: int) -> list[dict]:
    """Keep the rows of ``output``'s ``metrics.jsonl`` and ``eval.jsonl`` up to ``last_step`` (the
    step a run resumes from; 0 for a fresh start), drop the rest; returns the ``eval.jsonl`` rows
    kept (the verification history before the resume). A file that changes is rewritten under a
    temporary name and renamed over the old one: never half-written."""
    kept_evals: list[dict] = []
    for name in (METRICS_LOG, EVAL_LOG):
        path = os.path.join(output, name)
        if not os.path.isfile(path):
            continue
        rows, dropped = _rows_up_to(path, last_step)
        if dropped:
            write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        if name == EVAL_LOG:
            kept_evals = rows
    return kept_evals


def _has_events(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.startswith("events.out.tfevents.") for name in os.listdir(folder))


class TrainLogger:
    """Rank-0 logging: console lines, ``metrics.jsonl``, ``eval.jsonl`` and TensorBoard when installed.

    ``start_step``: the step the run starts from (a resumed run's checkpoint step). When the
    TensorBoard folder already holds events (an earlier attempt of the run), those past
    ``start_step`` are purged (``SummaryWriter(purge_step=start_step + 1)``: TensorBoard hides the
    earlier events from that step on), so the steps trained again are not shown twice.
    """

    def __init__(self, output: str, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.output = output
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                folder = os.path.join(output, TENSORBOARD_DIR)
                self.writer = SummaryWriter(folder, purge_step=start_step + 1 if _has_events(folder) else None)

    def _append(self, name: str, record: dict) -> None:
        with open(os.path.join(self.output, name), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_train(self, record: dict, write=print) -> None:
        if not self.enabled:
            return
        self._append(METRICS_LOG, record)
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
            self._append(EVAL_LOG, summary)
            if "protocol" in summary:   # an IJB row: one TAR at its FAR
                key = next(key for key in summary if key.startswith("tar@far=") and " " not in key)
                keys = (key,)
                write(f"eval {summary['set']} step {summary['step']}: {summary['protocol']} {key} "
                      f"{format_rate(summary[key])} ({summary['pairs']} pairs)")
            else:
                keys = ("accuracy", "tar@far=1e-3", "tar@far=1e-4")
                write(f"eval {summary['set']} step {summary['step']}: accuracy {summary['accuracy']:.4f} "
                      f"± {summary['accuracy_std']:.4f}, tar@far=1e-3 {format_rate(summary['tar@far=1e-3'])}")
            if self.writer is not None:
                for key in keys:
                    if summary[key] is not None:  # None: a TAR the set is too small to measure
                        self.writer.add_scalar(f"val_{summary['set']}/{key}", summary[key], summary["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: str, payload) -> None:
    """Write JSON to a temporary name, then rename: never a half-written file."""
    write_atomic(path, json.dumps(payload, indent=2))
