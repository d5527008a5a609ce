"""``python tools/import_weights.py …``: the tool of :mod:`pfc.cli.import_weights` (installed as ``pfc-import-weights``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.import_weights import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
