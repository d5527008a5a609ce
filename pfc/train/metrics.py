"""Rank-0 bookkeeping: averaged metrics per log window, console lines, JSONL files, TensorBoard."""
from __future__ import annotations

import json
import os
import time

from pfc.train.state import TrainState


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
            self.writer = None

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: str, payload) -> None:
    """Write JSON to a temporary name, then rename: never a half-written file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(temporary, path)
