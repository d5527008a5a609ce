"""``python tools/compare_eval.py …``: the tool of :mod:`pfc.cli.compare_eval` (installed as ``pfc-compare-eval``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.compare_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
