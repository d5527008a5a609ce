"""``python tools/export_onnx.py …``: the tool of :mod:`pfc.cli.export_onnx` (installed as ``pfc-export-onnx``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.cli.export_onnx import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
