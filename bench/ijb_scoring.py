"""IJB-C-sized scoring, side by side: the protocol's time after extraction (random features).

    python bench/ijb_scoring.py [--templates 23124] [--gallery 3531] [--pairs 15658489] [--dim 512]
                                [--faces 469375] [--baseline-pairs 1000000] [--parse]

Rows (one run each, wall time):
* pooling: ``template_features`` of ``--faces`` random float32 face features into the templates;
* scores, blocked GEMM: ``pair_scores`` (pfc) on ``--pairs`` distinct pairs, first template from
  the ``--gallery`` first templates, second from the rest (the shape of IJB-C's 1:1 protocol:
  gallery templates against probe templates), and on the same number of pairs drawn uniformly
  over all templates (the worst case for the blocked GEMM: every block multiplies all templates);
* scores, gathered rows: insightface's loop (blocks of 100,000 pairs: gather both feature rows,
  multiply, sum), on ``--baseline-pairs`` pairs and scaled linearly to ``--pairs``;
* ROC + TAR: ``Roc.of`` (sort, counts, sklearn's point dropping) and the six TAR@FAR readings;
* with ``--parse``: writing a pair file of ``--pairs`` lines and ``read_pairs`` of it.
Each row: wall seconds and the process's CPU seconds (``time.process_time``, all threads).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.evaluation.ijb.meta import read_pairs  # noqa: E402
from pfc.evaluation.ijb.templates import template_features  # noqa: E402
from pfc.evaluation.ijb.verification import FARS, Roc, pair_scores  # noqa: E402


def insightface_scores(features: np.ndarray, first: np.ndarray, second: np.ndarray, block: int = 100_000) -> np.ndarray:
    """The baseline: gathered rows, elementwise product, sum, in blocks of pairs."""
    scores = np.empty(len(first))
    for start in range(0, len(first), block):
        part = slice(start, start + block)
        scores[part] = np.sum(features[first[part]] * features[second[part]], -1)
    return scores


def timed(fn):
    """(fn(), (wall seconds, CPU seconds of this process: what a busy shared machine inflates least))."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, (time.perf_counter() - wall, time.process_time() - cpu)


def pooled_templates(args, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float]]:
    """Template features of random faces (every template has one), and the pooling's time."""
    templates = np.sort(rng.integers(0, args.templates, args.faces))
    templates[: args.templates] = np.arange(args.templates)
    medias = rng.integers(0, args.faces // 3, args.faces)
    scores = rng.uniform(0.1, 1, args.faces)
    faces = rng.standard_normal((args.faces, args.dim), dtype=np.float32)
    pooled, seconds = timed(lambda: template_features(faces, templates, medias, scores))
    return pooled.features, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=int, default=23124)
    parser.add_argument("--gallery", type=int, default=3531)
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--faces", type=int, default=469_375)
    parser.add_argument("--baseline-pairs", type=int, default=1_000_000)
    parser.add_argument("--parse", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []

    features, seconds = pooled_templates(args, rng)
    rows.append((f"pooling {args.faces} faces → {args.templates} templates", seconds))

    probes = args.templates - args.gallery
    codes = rng.choice(args.gallery * probes, args.pairs, replace=False)
    first, second = codes // probes, args.gallery + codes % probes
    scores, seconds = timed(lambda: pair_scores(features, first, second))
    rows.append((f"scores, blocked GEMM: {args.pairs} gallery × probe pairs", seconds))
    uniform_first, uniform_second = rng.integers(0, args.templates, (2, args.pairs))
    _, seconds = timed(lambda: pair_scores(features, uniform_first, uniform_second))
    rows.append((f"scores, blocked GEMM: {args.pairs} uniform pairs", seconds))
    subset = slice(0, args.baseline_pairs)
    baseline, seconds = timed(lambda: insightface_scores(features, first[subset], second[subset]))
    np.testing.assert_allclose(baseline, scores[subset], atol=1e-12)
    rows.append((f"scores, gathered rows (insightface), {args.baseline_pairs} pairs scaled to {args.pairs}",
                 tuple(value * args.pairs / args.baseline_pairs for value in seconds)))

    labels = rng.random(args.pairs) < 19_557 / 15_658_489
    _, seconds = timed(lambda: [roc.tar_at_far(far) for roc in [Roc.of(scores, labels)] for far in FARS])
    rows.append((f"ROC + TAR at {len(FARS)} FARs, {args.pairs} scores", seconds))

    if args.parse:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "pairs.txt")
            ids = np.arange(args.templates, dtype=np.int64) * 7 + 1
            table = np.stack([ids[first], ids[second], labels.astype(np.int64)], axis=1)
            _, seconds = timed(lambda: np.savetxt(path, table, fmt="%d"))
            rows.append((f"writing a {args.pairs}-line pair file (np.savetxt, setup)", seconds))
            _, seconds = timed(lambda: read_pairs(path, np.sort(ids)))
            rows.append((f"read_pairs of {args.pairs} lines ({os.path.getsize(path) / 1e6:.0f} MB)", seconds))

    threads = os.environ.get("OMP_NUM_THREADS", "all")
    print(f"| step (D = {args.dim}, {args.templates} templates, OMP_NUM_THREADS={threads}) | wall s | CPU s |")
    print("|---|---:|---:|")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
