"""Train a face model: ``torchrun --nproc_per_node=N launch/train.py configs/NAME.py [--FIELD VALUE …]``.

Every config field can be overridden (``--lr 0.05``, ``--margin.m2 0.4``, ``--data DIR``); run
with ``--help`` for the list. Without torchrun it trains in a single process.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.train.config import TrainConfig, load_config  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("fields:", ", ".join(TrainConfig.__dataclass_fields__), "(margin.kind, margin.s, margin.m1, …)")
        return 0 if argv else 2
    config_path, overrides = (argv[0], argv[1:]) if argv[0].endswith(".py") else (None, argv)
    rank = os.environ.get("RANK", "0")
    try:
        from pfc.train.loop import train

        train(load_config(config_path, overrides))
    except ValueError as exc:  # a user error: the same clear message on every rank, no traceback
        print(f"error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from pfc.train.loop import NonFiniteLossError

        if not isinstance(exc, NonFiniteLossError):
            raise
        print(f"error (rank {rank}): {exc}", file=sys.stderr)  # a checkpoint was written
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
