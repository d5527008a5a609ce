"""``python tools/make_synthetic.py …``: the tool of :mod:`pfc.cli.make_synthetic` (installed as ``pfc-make-synthetic``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.make_synthetic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
