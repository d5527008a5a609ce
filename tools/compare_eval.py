"""Print verification results side by side: ``python tools/compare_eval.py untrained.json trained.json``.

Each file holds the JSON object printed by tools/evaluate.py; the column name is the file's stem.
"""
from __future__ import annotations

import json
import os
import sys


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            results.append((os.path.splitext(os.path.basename(path))[0], json.load(handle)))
    first = results[0][1]
    print(f"\nheld-out verification ({first.get('set', '?')}, {first.get('num_pairs', '?')} pairs, 10-fold):")
    print(f"{'model':<12}{'accuracy':>18}{'TAR@FAR=1e-3':>15}{'AUC':>8}")
    for name, result in results:
        accuracy = f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}"
        print(f"{name:<12}{accuracy:>18}{result['tar@far=1e-3']:>15.4f}{result['auc']:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
