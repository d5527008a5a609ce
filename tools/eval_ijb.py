"""``python tools/eval_ijb.py …``: the tool of :mod:`pfc.cli.eval_ijb` (installed as ``pfc-eval-ijb``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.eval_ijb import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
