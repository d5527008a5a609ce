"""What the tools share: a user error (:class:`pfc.errors.PfcError`) ends the tool with one line.

    @one_line_errors
    def main(argv=None) -> int: ...

prints ``error: <message>`` on stderr and returns exit code 2 for a PfcError; any other exception
keeps its traceback (a bug, not the user's input).
"""
from __future__ import annotations

import functools
import sys

from pfc.errors import PfcError


def one_line_errors(main):
    """Wrap a tool's ``main(argv) -> int`` as described in the module docstring."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except PfcError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run
