"""Train a face model: ``torchrun --nproc_per_node=N -m pfc.train [configs/NAME.py] [--FIELD VALUE …]``
(installed; in a clone also ``torchrun … launch/train.py …``; ``pfc-train …`` in one process).

Every config field can be overridden: ``--head.margin.m2 0.4``, ``--optim.lr=0.05``,
``data.root=DIR``; the earlier flat names still work (``--lr``, ``--data DIR``, ``--margin.m2``).
``--help`` (after a recipe: with the recipe's values) lists every field. Without torchrun it
trains in a single process. A problem with the config, the data or a checkpoint is printed as
one line ``error (rank R): …`` (exit 2); any other error keeps its traceback.
"""
from __future__ import annotations

import os
import sys

from pfc.errors import PfcError
from pfc.train.config import help_text, load_config


def main(argv: list[str] | None = None) -> int:
    """Train with the recipe and overrides in ``argv`` (default ``sys.argv[1:]``); the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides = (argv[0], argv[1:]) if argv and argv[0].endswith(".py") else (None, argv)
    rank = os.environ.get("RANK", "0")
    try:
        if not argv or "-h" in argv or "--help" in argv:
            print(__doc__)
            print(f"Fields ({'values of ' + config_path if config_path else 'defaults'}):\n")
            print(help_text(load_config(config_path, [])))
            return 0 if argv else 2
        config = load_config(config_path, overrides)
        from pfc.train.loop import train

        train(config)
    except PfcError as exc:  # a user error: the same clear message on every rank, no traceback
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
    sys.exit(main())
