"""Checkpoints of narrow centers: bf16 centers and momentum stored as bf16, resharded 2 → 3 ranks
(C % N ≠ 0), and resumed across storage types (fp32 ↔ bf16) with a note on rank 0."""
from __future__ import annotations

import logging

import pytest
import torch

from pfc.head.margins import ArcFace
from pfc.head.partial_fc import PartialFC
from pfc.train.checkpoint import checkpoint_path, load_checkpoint, read_checkpoint_tensors, save_checkpoint
from pfc.train.runners.ddp import DDPRunner
from pfc.train.state import TrainState
from tests.distributed import run_ranks

NUM_CLASSES, EMBEDDING = 11, 4      # 11 % 2 != 0 and 11 % 3 != 0


def matrices(exact_in_bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct center and momentum rows: multiples of 1/16 (exact in bf16), or values that bf16 rounds."""
    base = torch.arange(NUM_CLASSES * EMBEDDING, dtype=torch.float32).reshape(NUM_CLASSES, EMBEDDING) - 20
    if exact_in_bf16:
        return base / 16, -base / 32
    return base / 3 + 1e-3, -base / 7 - 1e-3


def build_state(dtype: torch.dtype) -> TrainState:
    head = PartialFC(NUM_CLASSES, EMBEDDING, margin=ArcFace(s=8.0, m=0.3), dtype=dtype)
    head_optimizer = head.optimizer(lr=0.1)           # momentum stored like the centers
    backbone = torch.nn.Linear(3, EMBEDDING)
    runner = DDPRunner(backbone, torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9), wrap=False)
    return TrainState(runner=runner, head=head, head_optimizer=head_optimizer, schedulers={})


def _rows(state: TrainState) -> slice:
    return slice(state.head.class_start, state.head.class_start + state.head.num_local)


def save_on_ranks(rank: int, world_size: int, directories: dict) -> dict:
    """Save a bf16 state (values exact in bf16) and an fp32 state (values bf16 rounds)."""
    for dtype, exact in ((torch.bfloat16, True), (torch.float32, False)):
        state = build_state(dtype)
        weight, momentum = matrices(exact)
        with torch.no_grad():
            state.head.weight.copy_(weight[_rows(state)])
        state.head_optimizer.state[state.head.weight]["momentum_buffer"].copy_(momentum[_rows(state)])
        state.head_optimizer.updates = 17
        state.runner.model(torch.ones(2, 3)).sum().backward()   # the backbone's optimizer gets a state to save
        state.runner.optimizer.step()
        state.step = 5
        save_checkpoint(directories[str(dtype)], state)
    return {}


def _load(directory: str, dtype: torch.dtype) -> dict:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("pfc.train.checkpoint.save_load")
    logger.addHandler(handler)
    try:
        state = build_state(dtype)
        load_checkpoint(checkpoint_path(directory, 5), state)
    finally:
        logger.removeHandler(handler)
    return {"class_start": state.head.class_start, "weight": state.head.weight.detach().clone(),
            "momentum": state.head_optimizer.state[state.head.weight]["momentum_buffer"].clone(),
            "updates": state.head_optimizer.updates, "notes": records}


def load_on_ranks(rank: int, world_size: int, directories: dict) -> dict:
    """The bf16 checkpoint into bf16 and into fp32 centers, the fp32 one into bf16 centers."""
    bf16, fp32 = directories[str(torch.bfloat16)], directories[str(torch.float32)]
    return {"bf16→bf16": _load(bf16, torch.bfloat16), "bf16→fp32": _load(bf16, torch.float32),
            "fp32→bf16": _load(fp32, torch.bfloat16)}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """Checkpoints saved by 2 ranks, loaded by 3 (one process group each: spawning is the slow part)."""
    root = tmp_path_factory.mktemp("center_dtype")
    directories = {str(dtype): str(root / str(dtype)) for dtype in (torch.bfloat16, torch.float32)}
    run_ranks(save_on_ranks, 2, directories)
    return directories, run_ranks(load_on_ranks, 3, directories)


def _assemble(results: list[dict], case: str, key: str) -> torch.Tensor:
    return torch.cat([r[case][key] for r in sorted(results, key=lambda r: r[case]["class_start"])])


def test_bf16_centers_and_momentum_are_stored_as_bf16_and_reshard_two_to_three_ranks(resharded):
    directories, loaded = resharded
    weight, momentum = matrices(exact_in_bf16=True)
    tensors = read_checkpoint_tensors(checkpoint_path(directories[str(torch.bfloat16)], 5))
    assert tensors["head.weight"].dtype == tensors["head_optimizer.state.0.momentum_buffer"].dtype == torch.bfloat16
    assert torch.equal(tensors["head.weight"].float(), weight)

    case = "bf16→bf16"
    assert [r[case]["weight"].shape[0] for r in sorted(loaded, key=lambda r: r[case]["class_start"])] == [4, 4, 3]
    assert _assemble(loaded, case, "weight").dtype == _assemble(loaded, case, "momentum").dtype == torch.bfloat16
    assert torch.equal(_assemble(loaded, case, "weight").float(), weight)
    assert torch.equal(_assemble(loaded, case, "momentum").float(), momentum)
    assert all(r[case]["updates"] == 17 and r[case]["notes"] == [] for r in loaded)   # the rounding stream continues


def test_bf16_checkpoint_resumes_into_fp32_centers_exactly(resharded):
    _, loaded = resharded
    weight, momentum = matrices(exact_in_bf16=True)
    case = "bf16→fp32"
    assert _assemble(loaded, case, "weight").dtype == _assemble(loaded, case, "momentum").dtype == torch.float32
    assert torch.equal(_assemble(loaded, case, "weight"), weight)
    assert torch.equal(_assemble(loaded, case, "momentum"), momentum)


def test_fp32_checkpoint_resumes_into_bf16_centers_rounded_to_nearest_with_a_note_on_rank_zero(resharded):
    _, loaded = resharded
    weight, momentum = matrices(exact_in_bf16=False)
    case = "fp32→bf16"
    assert torch.equal(_assemble(loaded, case, "weight"), weight.to(torch.bfloat16))
    assert torch.equal(_assemble(loaded, case, "momentum"), momentum.to(torch.bfloat16))
    notes = {r[case]["class_start"]: r[case]["notes"] for r in loaded}
    assert notes[4] == notes[8] == []
    assert len(notes[0]) == 1 and "centers float32 → bfloat16; momentum float32 → bfloat16" in notes[0][0]
