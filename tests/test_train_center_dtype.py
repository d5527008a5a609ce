"""Training with bf16 centers (--center_dtype bf16) on 2 gloo ranks: the checkpoint holds bf16
centers and momentum, and a run stopped and resumed equals the straight run bit for bit (the
stochastic rounding continues from the optimizer's saved update counter)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pfc.train.checkpoint import checkpoint_path, read_checkpoint_tensors
from tests.distributed import run_ranks
from tests.train_fixtures import make_config, sigterm_on_rank_zero_at_step, write_shards

TOTAL_STEPS, STOP_AT = 6, 2
BF16 = {"head.center_dtype": "bf16", "grad_accumulation": 1}   # one micro-batch: the update runs in the backward


def straight_stopped_resumed(rank: int, world_size: int, data: str, straight: str, stopped: str) -> dict:
    from pfc.train import loop as engine

    summaries = [engine.train(make_config(data, straight, max_steps=TOTAL_STEPS, **BF16))]
    with sigterm_on_rank_zero_at_step(rank, STOP_AT):   # the run stops after this step
        summaries.append(engine.train(make_config(data, stopped, max_steps=TOTAL_STEPS, **BF16)))
    summaries.append(engine.train(make_config(data, stopped, max_steps=TOTAL_STEPS, resume="auto", **BF16)))
    return [dataclasses.asdict(summary) for summary in summaries]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_classes=12, per_class=8, image_size=16)


def test_bf16_centers_train_and_resume_bit_for_bit_on_two_ranks(shard_set, tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    results = run_ranks(straight_stopped_resumed, 2, shard_set, straight, stopped, timeout=300)
    for first, interrupted, resumed in results:
        assert first["steps"] == TOTAL_STEPS and resumed["steps"] == TOTAL_STEPS
        assert interrupted["steps"] == STOP_AT + 1
    expected = read_checkpoint_tensors(checkpoint_path(straight, TOTAL_STEPS))
    actual = read_checkpoint_tensors(checkpoint_path(stopped, TOTAL_STEPS))
    assert expected["head.weight"].dtype == torch.bfloat16
    assert expected["head_optimizer.state.0.momentum_buffer"].dtype == torch.bfloat16
    start = read_checkpoint_tensors(checkpoint_path(stopped, STOP_AT + 1))
    assert not torch.equal(start["head.weight"], expected["head.weight"])   # the centers trained on
    for key in (key for key in expected if not key.startswith("rng.")):
        assert torch.equal(expected[key], actual[key]), key
