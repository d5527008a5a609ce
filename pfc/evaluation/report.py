"""Verification results side by side, from the JSON objects ``pfc-evaluate`` prints or a training
run's ``eval_results.json`` (``{"final": [summary per set], "history": [...]}``: its final rows).

    results = read_results(["untrained.json", "run/eval_results.json"])   # [(name, summary)]
    print(comparison_table(results))
"""
from __future__ import annotations

import json
import os

from pfc.errors import DataError
from pfc.evaluation.roc import format_rate

COLUMNS = ("accuracy", "accuracy_std", "tar@far=1e-3", "auc")


def read_results(paths: list[str]) -> list[tuple[str, dict]]:
    """(name, result) of each JSON file: a ``pfc-evaluate`` result named by the file's stem, or each
    final row of a run's ``eval_results.json``, named by the stem (``stem:set`` when the run had
    several sets). DataError for a missing or malformed file."""
    results = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                content = json.load(handle)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable evaluation result ({exc})") from exc
        stem = os.path.splitext(os.path.basename(path))[0]
        if isinstance(content, dict) and "final" in content:   # a training run's eval_results.json
            rows = content["final"]
            if isinstance(rows, list):   # IJB rows (a "protocol" key) are not pair verifications
                rows = [row for row in rows if not (isinstance(row, dict) and "protocol" in row)]
            if not isinstance(rows, list) or not rows:
                raise DataError(f"{path}: a run's eval_results.json without final results (the run had no "
                                f"pair verification set)")
            named = [(stem if len(rows) == 1 else f"{stem}:{_set_name(row)}", row) for row in rows]
        else:
            named = [(stem, content)]
        for name, result in named:
            missing = [key for key in COLUMNS if not isinstance(result, dict) or key not in result]
            if missing:
                raise DataError(f"{path}: not an evaluation result of pfc-evaluate or a run's eval_results.json "
                                f"(no {', '.join(missing)})")
            results.append((name, result))
    return results


def _set_name(row) -> str:
    return str(row.get("set", "?")) if isinstance(row, dict) else "?"


def comparison_table(results: list[tuple[str, dict]]) -> str:
    """One row per result: accuracy ± std (10-fold), TAR at FAR 1e-3 (n/a when the set cannot
    measure it), AUC; the set of the first."""
    first = results[0][1]
    width = max(12, *(len(name) + 2 for name, _ in results))
    lines = ["",
             f"held-out verification ({first.get('set', '?')}, {first.get('num_pairs', '?')} pairs, 10-fold):",
             f"{'model':<{width}}{'accuracy':>18}{'TAR@FAR=1e-3':>15}{'AUC':>8}"]
    for name, result in results:
        accuracy = f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}"
        lines.append(f"{name:<{width}}{accuracy:>18}{format_rate(result['tar@far=1e-3']):>15}{result['auc']:>8.4f}")
    return "\n".join(lines)
