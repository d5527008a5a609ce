"""Verification results side by side, from the JSON objects ``tools/evaluate.py`` prints.

    results = read_results(["untrained.json", "trained.json"])   # [(name = file stem, summary)]
    print(comparison_table(results))
"""
from __future__ import annotations

import json
import os

from pfc.errors import DataError
from pfc.evaluation.roc import format_rate

COLUMNS = ("accuracy", "accuracy_std", "tar@far=1e-3", "auc")


def read_results(paths: list[str]) -> list[tuple[str, dict]]:
    """(file stem, result) of each JSON file; DataError for a missing or malformed one."""
    results = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                result = json.load(handle)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable evaluation result ({exc})") from exc
        missing = [key for key in COLUMNS if not isinstance(result, dict) or key not in result]
        if missing:
            raise DataError(f"{path}: not an evaluation result of tools/evaluate.py (no {', '.join(missing)})")
        results.append((os.path.splitext(os.path.basename(path))[0], result))
    return results


def comparison_table(results: list[tuple[str, dict]]) -> str:
    """One row per result: accuracy ± std (10-fold), TAR at FAR 1e-3 (n/a when the set cannot
    measure it), AUC; the set of the first."""
    first = results[0][1]
    lines = ["",
             f"held-out verification ({first.get('set', '?')}, {first.get('num_pairs', '?')} pairs, 10-fold):",
             f"{'model':<12}{'accuracy':>18}{'TAR@FAR=1e-3':>15}{'AUC':>8}"]
    for name, result in results:
        accuracy = f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}"
        lines.append(f"{name:<12}{accuracy:>18}{format_rate(result['tar@far=1e-3']):>15}{result['auc']:>8.4f}")
    return "\n".join(lines)
