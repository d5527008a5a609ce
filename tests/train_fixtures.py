"""Training-test fixtures: a tiny shard set (small images, many steps per second) and a trainer config."""
from __future__ import annotations

import contextlib
import os
import signal

import numpy as np

from tests.data_fixtures import jpeg, write_shard_set


def write_shards(root: str, num_classes: int = 12, per_class: int = 8, image_size: int = 16,
                 samples_per_shard: int = 20, seed: int = 0) -> str:
    """``num_classes × per_class`` JPEGs of ``image_size``² (a grey level per class plus noise) in
    shards of ``samples_per_shard``; returns ``root``."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    samples = []
    for index, label in enumerate(labels):
        pixels = np.full((image_size, image_size, 3), 20 * (label % 12), dtype=np.uint8)
        pixels += rng.integers(0, 40, size=pixels.shape, dtype=np.uint8)
        samples.append((f"{index:08d}", {"jpg": jpeg(pixels), "cls": str(int(label)).encode()}))
    shards = [samples[start:start + samples_per_shard] for start in range(0, len(samples), samples_per_shard)]
    write_shard_set(root, shards, num_classes, size=(image_size, image_size))
    return root


def make_config(data: str, output: str, **overrides):
    """A TrainConfig for the tiny network on :func:`write_shards` data (2 ranks: 6 steps per epoch);
    fields and ``overrides`` by their flat (legacy) names or dotted paths, as on the command line."""
    from pfc.train.config import ALIASES, MarginConfig, TrainConfig, validate

    fields = dict(data=data, output=output, num_workers=0, network="tiny", embedding_size=16,
                  margin=MarginConfig(s=16.0, m2=0.3), sample_rate=0.5, batch_size=4, grad_accumulation=2,
                  lr=0.1, max_steps=10, warmup_steps=2, log_every=1, save_every=100, seed=3)
    fields.update(overrides)
    config = TrainConfig()
    for name, value in fields.items():
        *groups, leaf = ALIASES.get(name, name).split(".")
        target = config
        for group in groups:
            target = getattr(target, group)
        setattr(target, leaf, value)
    validate(config)
    return config


@contextlib.contextmanager
def sigterm_on_rank_zero_at_step(rank: int, step: int):
    """While active, rank 0 sends itself SIGTERM as the head starts training step ``step`` (a
    handled stop: the run checkpoints after that step and returns), as a scheduler would."""
    from pfc.head.partial_fc import PartialFC

    original = PartialFC.set_iteration

    def set_iteration(self, iteration):
        if iteration == step and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, iteration)

    PartialFC.set_iteration = set_iteration
    try:
        yield
    finally:
        PartialFC.set_iteration = original
