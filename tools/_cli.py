"""The tools' one-line user errors; the decorator lives in :mod:`pfc.cli.errors` (installed with pfc)."""
from pfc.cli.errors import one_line_errors

__all__ = ["one_line_errors"]
