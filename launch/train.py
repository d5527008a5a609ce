"""Train a face model: ``torchrun --nproc_per_node=N launch/train.py [configs/NAME.py] [--FIELD VALUE …]``.

Every config field can be overridden: ``--head.margin.m2 0.4``, ``--optim.lr=0.05``,
``data.root=DIR``; the earlier flat names still work (``--lr``, ``--data DIR``, ``--margin.m2``).
``--help`` (after a recipe: with the recipe's values) lists every field. Without torchrun it
trains in a single process. A problem with the config, the data or a checkpoint is printed as
one line ``error (rank R): …`` (exit 2); any other error keeps its traceback.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.errors import PfcError  # noqa: E402
from pfc.train.config import help_text, load_config  # noqa: E402


def main(argv: list[str]) -> int:
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
    sys.exit(main(sys.argv[1:]))
