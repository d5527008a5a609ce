"""Raw tar samples into batch rows: the label check, the JPEG decode into a batch slot, filling a
batch with replacements for corrupt samples, and the count of what was skipped (shared by the
shuffled and the P×K samplers)."""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
import simplejpeg

from pfc.errors import DataError

logger = logging.getLogger("pfc.data.loader")   # the loader's log: its warnings keep their name


class SkipCounter:
    """Counts skipped samples; ``take()`` returns and resets the count since the last call."""

    def __init__(self):
        self.pending = 0
        self.damaged: set[str] = set()

    def skip(self, url: str, key: str, reason: str) -> None:
        """Log and count one skipped sample."""
        logger.warning("skipping sample %s of shard %s: %s", key, url, reason)
        self.pending += 1

    def lost(self) -> None:
        """Count one position that could not be read (its shard's damage was reported)."""
        self.pending += 1

    def shard_damage(self, url: str, reason: str) -> None:
        """Log (once per shard) that the rest of ``url`` cannot be read."""
        if url not in self.damaged:
            self.damaged.add(url)
            logger.warning("skipping the rest of shard %s: %s", url, reason)

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def _label(sample: dict, num_classes: int, counter: SkipCounter) -> int | None:
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    if "jpg" not in sample or "cls" not in sample:
        counter.skip(url, key, f"members {sorted(k for k in sample if not k.startswith('__'))}, expected jpg and cls")
        return None
    text = bytes(sample["cls"])
    try:
        label = int(text)   # ASCII digits, surrounding whitespace allowed
    except ValueError:
        counter.skip(url, key, f"label {text[:20]!r} is not an integer")
        return None
    if not 0 <= label < num_classes:
        raise DataError(f"sample {key} of shard {url} has label {label} outside [0, {num_classes}); "
                         f"the shards do not match the manifest's num_classes")
    return label


def decode_into(sample: dict, out: np.ndarray, counter: SkipCounter) -> bool:
    """Decode the sample's JPEG (simplejpeg, RGB) straight into ``out`` [H, W, 3] uint8; False
    (and counted) when it does not decode or has another size."""
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    try:
        decoded = simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB", buffer=out)
    except ValueError as exc:   # also: an image larger than ``out``
        counter.skip(url, key, f"JPEG does not decode at {out.shape[1]}x{out.shape[0]} ({exc})")
        return False
    if decoded.shape != out.shape:
        counter.skip(url, key, f"image is {decoded.shape[1]}x{decoded.shape[0]}, expected {out.shape[1]}x{out.shape[0]}")
        return False
    return True


def fill_batch(samples: list, pixels: np.ndarray, labels: np.ndarray, num_classes: int, counter: SkipCounter,
               top_ups: Callable[[], Iterator], give_up_after: int) -> None:
    """Decode ``samples`` (raw samples, None for a lost one) in order into the slots of ``pixels``
    [b, H, W, 3] and ``labels`` [b], skipping the corrupt ones; the slots left are filled from
    ``top_ups()`` (an endless iterator of raw samples or None, started only when needed).
    DataError after ``give_up_after`` bad replacements in a row (nothing decodes)."""
    filled = 0

    def put(sample) -> bool:
        if sample is None:
            counter.lost()
            return False
        label = _label(sample, num_classes, counter)
        if label is None or not decode_into(sample, pixels[filled], counter):
            return False
        labels[filled] = label
        return True

    for sample in samples:
        filled += put(sample)
    replacements, bad_in_a_row = None, 0
    while filled < len(labels):
        replacements = replacements or top_ups()
        sample = next(replacements)
        if put(sample):
            filled, bad_in_a_row = filled + 1, 0
            continue
        bad_in_a_row += 1
        if bad_in_a_row > give_up_after:
            last = f"{sample.get('__key__')} of {sample.get('__url__')}" if sample else "an unreadable shard"
            raise DataError(f"no readable sample in the whole dataset ({bad_in_a_row} bad in a row, last: {last})")
