"""IJB 1:N identification (open set, NIST's definitions), one gallery at a time.

    result = identification(templates, gallery, probes)   # {"top1", "top5", "tpir_at_fpir", …}

For gallery G and probe template q with unit features, s(q, g) = q̂ · ĝ for every g in G.
* q is *mated* when its subject has a template in G (its mates), else *non-mated* (IJB-C: the
  probes of the other gallery's subjects).
* rank of a mated q = 1 + #{non-mate g : s(q, g) > mate score}, mate score = max over its mates
  (ties count in the probe's favour). top-k = fraction of mated probes with rank ≤ k.
* FPIR(τ) = fraction of non-mated probes whose top score max_g s(q, g) ≥ τ.
  TPIR(τ) = fraction of mated probes with rank 1 and mate score ≥ τ.
  TPIR at FPIR f uses the smallest τ with FPIR(τ) ≤ f: with the M non-mated top scores in
  descending order n₁ ≥ n₂ ≥ …, k = ⌊f·M⌋, a mated probe counts when its mate score > n_(k+1)
  (all of them when k ≥ M). No interpolation: when scores tie at n_(k+1), all of them are
  rejected together, so the achieved FPIR can be below f.
A rate over an empty set (no mated, or no non-mated probes) is None.
"""
from __future__ import annotations

import math

import numpy as np

from pfc.evaluation.ijb.meta import SearchSet
from pfc.evaluation.ijb.templates import TemplateFeatures

FPIRS = (0.01, 0.1)
TOP_K = (1, 5)


def fpir_key(fpir: float) -> str:
    """The JSON key of an FPIR target: ``0.01``, ``0.1``."""
    return f"{fpir:g}"


def identification(templates: TemplateFeatures, gallery: SearchSet, probes: SearchSet,
                   fpirs=FPIRS) -> dict:
    """top1, top5, ``tpir_at_fpir`` {key: rate} and the probe counts of one gallery (module docstring)."""
    gallery_features = templates.features[templates.rows(gallery.templates)]
    probe_features = templates.features[templates.rows(probes.templates)]
    similarity = probe_features @ gallery_features.T
    is_mate = probes.subjects[:, None] == gallery.subjects[None, :]
    mated = is_mate.any(axis=1)
    mate_score = np.where(is_mate, similarity, -np.inf).max(axis=1)[mated]
    rank = 1 + ((similarity[mated] > mate_score[:, None]) & ~is_mate[mated]).sum(axis=1)
    nonmated_top = np.sort(similarity[~mated].max(axis=1))[::-1]
    result = {f"top{k}": _rate(rank <= k) for k in TOP_K}
    tpir = {}
    for fpir in fpirs:
        if len(nonmated_top) == 0 or len(mate_score) == 0:
            tpir[fpir_key(fpir)] = None
            continue
        allowed = math.floor(fpir * len(nonmated_top) + 1e-9)
        threshold = nonmated_top[allowed] if allowed < len(nonmated_top) else -np.inf
        tpir[fpir_key(fpir)] = _rate((rank == 1) & (mate_score > threshold))
    result["tpir_at_fpir"] = tpir
    result["mated_probes"] = int(mated.sum())
    result["nonmated_probes"] = int((~mated).sum())
    return result


def mean_identification(per_gallery: dict[str, dict]) -> dict:
    """The mean of each rate over the galleries (None if any gallery's is None)."""
    results = list(per_gallery.values())

    def mean(values):
        return None if any(v is None for v in values) else float(np.mean(values))

    out = {f"top{k}": mean([r[f"top{k}"] for r in results]) for k in TOP_K}
    out["tpir_at_fpir"] = {key: mean([r["tpir_at_fpir"][key] for r in results])
                           for key in results[0]["tpir_at_fpir"]}
    return out


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if hits.size else None
