"""``python tools/pack_shards.py …``: the tool of :mod:`pfc.cli.pack_shards` (installed as ``pfc-pack``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.pack_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
