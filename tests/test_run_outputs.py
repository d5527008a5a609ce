"""What a run reports and keeps: a damaged verification image fails before training on every rank,
backbone.pt is written before the final verification, the corrupt samples skipped reach
metrics.jsonl and TensorBoard (2 gloo ranks, the tiny network on a small shard set)."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from tests.data_fixtures import jpeg, write_shard_set
from tests.distributed import run_ranks
from tests.test_model_state import write_pairs
from tests.train_fixtures import make_config, write_shards

GARBAGE = b"\xff\xd8 garbage"
NUM_GARBAGE = 2


def write_shards_with_garbage(root: str, image_size: int = 16) -> str:
    """96 samples (12 classes × 8) in 5 shards, of which NUM_GARBAGE JPEGs do not decode."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(12), 8))
    samples = []
    for index, label in enumerate(labels):
        pixels = np.full((image_size, image_size, 3), 20 * int(label), dtype=np.uint8)
        pixels += rng.integers(0, 40, size=pixels.shape, dtype=np.uint8)
        data = GARBAGE if index in (5, 50) else jpeg(pixels)
        samples.append((f"{index:08d}", {"jpg": data, "cls": str(int(label)).encode()}))
    write_shard_set(root, [samples[start:start + 20] for start in range(0, 96, 20)], 12, size=(image_size,) * 2)
    return root


def two_runs(rank: int, world_size: int, clean: str, garbage: str, bad_pairs: str, output: str) -> dict:
    """A run whose pairs list holds a truncated JPEG (what it raised, whether a step ran), and a
    run over shards holding corrupt samples."""
    from pfc.head.partial_fc import PartialFC
    from pfc.train import loop

    steps_started = []
    original = PartialFC.set_iteration

    def set_iteration(self, iteration):
        steps_started.append(iteration)
        original(self, iteration)

    PartialFC.set_iteration = set_iteration
    try:
        loop.train(make_config(clean, os.path.join(output, "bad_val"), val_pairs=bad_pairs))
        raised = None
    except Exception as exc:
        raised = (type(exc).__name__, str(exc))
    finally:
        PartialFC.set_iteration = original
    result = loop.train(make_config(garbage, os.path.join(output, "garbage"), val_pairs="", max_steps=6))
    return {"raised": raised, "steps_started": steps_started, "garbage_run": dataclasses.asdict(result)}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    clean = write_shards(str(root / "clean"))
    garbage = write_shards_with_garbage(str(root / "garbage"))
    pairs = write_pairs(str(root / "val"))
    truncated = root / "val" / "8_3.jpg"   # the second image of pair 3 (line 4)
    truncated.write_bytes(truncated.read_bytes()[:-60])
    results = run_ranks(two_runs, 2, clean, garbage, pairs, str(root / "runs"), timeout=300)
    return root, truncated, results


def test_a_truncated_validation_image_fails_before_training_on_every_rank(outcomes):
    """A truncated JPEG in --val_pairs: the same DataError on every rank naming the pairs list,
    the pair, its line and the image, before the first step (before: a crash in the final
    verification, after training, with no file named and no backbone.pt)."""
    root, truncated, results = outcomes
    for result in results:
        kind, message = result["raised"]
        assert kind == "DataError", message
        assert "loading the verification sets failed on rank 0" in message
        assert f"{root / 'val' / 'pairs.txt'}, pair 3, line 4: image {truncated} does not decode" in message
        assert result["steps_started"] == []
    assert not (root / "runs" / "bad_val" / "metrics.jsonl").exists()


def test_corrupt_samples_skipped_reach_metrics_and_tensorboard(outcomes):
    """The loaders' count of skipped samples, summed over the ranks, is in every metrics.jsonl
    record and in TensorBoard as train/skipped_samples."""
    root, _, results = outcomes
    output = root / "runs" / "garbage"
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    counts = [record["skipped_samples"] for record in records]
    assert counts == sorted(counts) and counts[-1] == NUM_GARBAGE, counts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert [event.value for event in events.Scalars("train/skipped_samples")] == counts


def test_backbone_is_saved_before_the_final_verification(tmp_path, monkeypatch):
    """A verification that fails after training cannot lose the trained model."""
    from pfc.train import loop

    data = write_shards(str(tmp_path / "shards"))
    pairs = write_pairs(str(tmp_path / "val"))

    def failing_verification(*args, **kwargs):
        raise RuntimeError("the verification broke")

    monkeypatch.setattr(loop, "run_verification", failing_verification)
    with pytest.raises(RuntimeError, match="the verification broke"):
        loop.train(make_config(data, str(tmp_path / "run"), val_pairs=pairs, max_steps=3))
    assert (tmp_path / "run" / "backbone.pt").stat().st_size > 0


def verification_failing_on_rank_0(rank: int, world_size: int) -> str:
    from types import SimpleNamespace

    import torch

    from pfc.evaluation import VerificationSet
    from pfc.train.config import TrainConfig
    from pfc.train.runtime import Runtime
    from pfc.train.validation import run_verification

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    state = SimpleNamespace(runner=SimpleNamespace(model=model), step=3)
    # rank 0's set holds an image that does not decode (as if the file changed after loading)
    sets = [VerificationSet("broken", [b"not a jpeg"] * 20, [True, False] * 5)] if rank == 0 else []
    runtime = Runtime(rank, world_size, 0, torch.device("cpu"))
    try:
        run_verification(state, sets, TrainConfig(), runtime, image_size=16)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return "no error"


def test_a_verification_failure_on_rank_0_is_raised_on_every_rank_instead_of_a_hang():
    for message in run_ranks(verification_failing_on_rank_0, 2, timeout=60, collective_timeout=30):
        assert message.startswith("verification at step 3 failed on rank 0:"), message


def test_a_bf16_backbone_is_evaluated_in_its_own_dtype():
    import torch

    from pfc.evaluation.verification import embed_images

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(8))
    model(torch.zeros(1, 3, 16, 16))
    images = [np.full((16, 16, 3), value, dtype=np.uint8) for value in (0, 90, 180)]
    full = embed_images(model, images, image_size=16)
    half = embed_images(model.to(torch.bfloat16), images, image_size=16)   # a DeepSpeed bf16 engine's module
    assert half.dtype == np.float32 and np.allclose(half, full, atol=3e-2)
