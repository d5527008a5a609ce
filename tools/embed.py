"""``python tools/embed.py …``: the tool of :mod:`pfc.cli.embed` (installed as ``pfc-embed``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.embed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
