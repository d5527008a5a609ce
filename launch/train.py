"""``torchrun --nproc_per_node=N launch/train.py [configs/NAME.py] [--FIELD VALUE …]``: the trainer of
:mod:`pfc.cli.train` (installed: ``torchrun … -m pfc.train …``, or ``pfc-train`` in one process)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
