"""Print verification results side by side: ``pfc-compare-eval untrained.json trained.json``
(or ``python tools/compare_eval.py …``).

Each file holds the JSON object printed by ``pfc-evaluate``, or is a training run's
``eval_results.json`` (its final verification; one column per verification set when there are
several); the column name is the file's stem (with the set's name for a run of several sets).
"""
from __future__ import annotations

import argparse
import sys

from pfc.cli.errors import one_line_errors
from pfc.evaluation.report import comparison_table, read_results


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+",
                        help="JSON files: pfc-evaluate's output, or a run's eval_results.json")
    args = parser.parse_args(argv)
    print(comparison_table(read_results(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
