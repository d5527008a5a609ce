"""Print verification results side by side: ``python tools/compare_eval.py untrained.json trained.json``.

Each file holds the JSON object printed by tools/evaluate.py; the column name is the file's stem.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.evaluation.report import comparison_table, read_results  # noqa: E402
from tools._cli import one_line_errors  # noqa: E402


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written from tools/evaluate.py's output")
    args = parser.parse_args(argv)
    print(comparison_table(read_results(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
