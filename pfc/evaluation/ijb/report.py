"""The outputs of an IJB evaluation: ``ijb_result.json``, ``scores.npy``, ``roc.png`` and the table.

    write_ijb_outputs(directory, evaluation, label="r50")   → {"result": …, "scores": …, "roc": …}
    print(format_ijb_table({"r50": evaluation.result}))

The table is the papers' 1:1 table (rows: method; columns: TAR in % at FAR 1e-6 … 1e-1, two
decimals, insightface's nearest-point values) followed by the 1:N rows when there are any.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from pfc.evaluation.ijb.protocol import IjbEvaluation
from pfc.evaluation.roc import save_curves_plot
from pfc.files import write_atomic

RESULT_FILE = "ijb_result.json"
SCORES_FILE = "scores.npy"
ROC_FILE = "roc.png"
PLOT_POINTS = 2000


def write_ijb_outputs(directory: str, evaluation: IjbEvaluation, label: str = "model") -> dict[str, str]:
    """Write the result JSON, the scores (float64, pair file order) and the ROC plot into
    ``directory`` (each file whole or not at all); returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {"result": os.path.join(directory, RESULT_FILE), "scores": os.path.join(directory, SCORES_FILE),
             "roc": os.path.join(directory, ROC_FILE)}
    buffer = io.BytesIO()
    np.save(buffer, evaluation.scores.astype(np.float64))
    write_atomic(paths["scores"], buffer.getvalue())
    far, tar = thin_roc(evaluation.roc.fpr, evaluation.roc.tpr)
    save_curves_plot([(f"{label} {evaluation.result['target']}", far, tar)], paths["roc"], far_floor=1e-6)
    write_atomic(paths["result"], json.dumps(evaluation.result, indent=2) + "\n")
    return paths


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = PLOT_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2·``points`` ROC points spread evenly in log FAR (for drawing; the curve's corners
    at those FARs are kept)."""
    if len(fpr) <= 2 * points:
        return fpr, tpr
    marks = np.searchsorted(fpr, np.logspace(-7, 0, points), side="right") - 1
    keep = np.unique(np.clip(np.r_[0, marks, marks + 1, len(fpr) - 1], 0, len(fpr) - 1))
    return fpr[keep], tpr[keep]


def format_ijb_table(results: dict[str, dict]) -> str:
    """The papers' table of ``{method: result}`` (module docstring), as plain text."""
    first = next(iter(results.values()))
    fars = list(first["tar_at_far"])
    width = max(10, *(len(name) for name in results))
    lines = [f"{first['target']} 1:1 TAR (%) at FAR (nearest ROC point, as insightface)",
             " | ".join([f"{'Method':<{width}}"] + [f"{far:>6}" for far in fars])]
    lines.append("-" * len(lines[-1]))
    for name, result in results.items():
        lines.append(" | ".join([f"{name:<{width}}"] + [_percent(result["tar_at_far"][far]) for far in fars]))
    if first.get("identification"):
        galleries = list(first["identification"])
        lines += ["", f"{first['target']} 1:N (%): top-1, top-5, TPIR at FPIR",
                  " | ".join([f"{'Method':<{width}}", "gallery"] + [f"{k:>6}" for k in _identification_columns(first)])]
        lines.append("-" * len(lines[-1]))
        for name, result in results.items():
            for gallery in galleries:
                row = result["identification"][gallery]
                values = [row["top1"], row["top5"], *row["tpir_at_fpir"].values()]
                lines.append(" | ".join([f"{name:<{width}}", f"{gallery:<7}"] + [_percent(v) for v in values]))
    return "\n".join(lines)


def _identification_columns(result: dict) -> list[str]:
    fpirs = next(iter(result["identification"].values()))["tpir_at_fpir"]
    return ["top1", "top5"] + [f"@{key}" for key in fpirs]


def _percent(value: float | None) -> str:
    return f"{'n/a':>6}" if value is None else f"{100 * value:6.2f}"
