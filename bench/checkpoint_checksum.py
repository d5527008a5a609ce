"""Cost of the per-file CRC-32 of checkpoints: save and load of a ~200 MB checkpoint (one process).

    python bench/checkpoint_checksum.py [--classes 100000] [--dim 256] [--repeat 3]

The head's centers and their momentum (classes × dim × 4 bytes each) dominate the checkpoint.
Side by side in one run, alternating: save with checksums vs. save with the checksum step
skipped; the content check (every file's CRC-32) vs. the size-only check. The
files are in the page cache (just written), so the check costs the CRC, not the disk.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pfc.head.margins import ArcFace  # noqa: E402
from pfc.head.partial_fc import PartialFC  # noqa: E402
from pfc.train.checkpoint import save_checkpoint, store, validate_checkpoint  # noqa: E402
from pfc.train.checkpoint import save_load  # noqa: E402
from pfc.train.runners.ddp import DDPRunner  # noqa: E402
from pfc.train.state import TrainState  # noqa: E402


def build(classes: int, dim: int) -> TrainState:
    head = PartialFC(classes, dim, margin=ArcFace(), seed=0)
    optimizer = head.optimizer(lr=0.1)
    optimizer.state[head.weight]["momentum_buffer"] = torch.randn(classes, dim)
    backbone = torch.nn.Linear(8, dim)
    runner = DDPRunner(backbone, torch.optim.SGD(backbone.parameters(), lr=0.1), wrap=False)
    return TrainState(runner=runner, head=head, head_optimizer=optimizer, schedulers={})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    state = build(args.classes, args.dim)
    original = save_load._checksum_written_files
    times: dict[str, list[float]] = {name: [] for name in
                                     ("save, no checksum", "save, CRC-32", "check sizes", "check CRC-32")}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeat):
            state.step = 2 * repeat + 1
            save_load._checksum_written_files = lambda *a, **k: {}
            try:   # without the ranks' checksums publish() would compute them: skip that too
                store_checksums, store.checksum_files = store.checksum_files, lambda root, names: {}
                times["save, no checksum"].append(timed(lambda: save_checkpoint(root, state, keep_last=2)))
            finally:
                save_load._checksum_written_files, store.checksum_files = original, store_checksums
            state.step += 1
            times["save, CRC-32"].append(timed(lambda: save_checkpoint(root, state, keep_last=2)))
            path = store.checkpoint_path(root, state.step)
            times["check sizes"].append(timed(lambda: validate_checkpoint(path, check_content=False)))
            times["check CRC-32"].append(timed(lambda: validate_checkpoint(path)))
        size = sum(store.file_sizes(path).values())
    print(f"checkpoint: {size / 1e6:.0f} MB ({args.classes} classes × {args.dim}, weights + momentum), "
          f"median of {args.repeat}, one process")
    print(f"{'step':22s} {'seconds':>8s}")
    for name, values in times.items():
        print(f"{name:22s} {statistics.median(values):8.3f}")


if __name__ == "__main__":
    main()
