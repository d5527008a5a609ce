"""The IJB protocol from face features to the numbers (no images, no model: see pfc/cli/eval_ijb.py).

    meta = read_ijb_meta(root, "IJBC")
    evaluation = evaluate_ijb(meta, face_features)     # face_features: [faces, D], meta's face order
    evaluation.result   → {"tar_at_far": {"1e-06": …}, "tar_at_far_interpolated": …, "identification": …}

face_features are the extracted f(x) + f(flip x) (or f(x)), not normalised; the detector scores
of the 5-point file weight them (:mod:`pfc.evaluation.ijb.templates`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pfc.evaluation.ijb.identification import FPIRS, identification, mean_identification
from pfc.evaluation.ijb.meta import IjbMeta
from pfc.evaluation.ijb.templates import TemplateFeatures, template_features
from pfc.evaluation.ijb.verification import FARS, Roc, far_key, verification_scores


@dataclass
class IjbEvaluation:
    """``result`` (JSON-ready), ``scores`` float64 [pairs] in pair file order, the ``roc``."""

    result: dict
    scores: np.ndarray
    roc: Roc
    templates: TemplateFeatures


def evaluate_ijb(meta: IjbMeta, face_features: np.ndarray, fars=FARS, fpirs=FPIRS,
                 use_detector_score: bool = True) -> IjbEvaluation:
    """1:1 TAR at each FAR (nearest ROC point and interpolated) and, when ``meta`` has 1:N files,
    top-1 / top-5 / TPIR at each FPIR per gallery and their mean."""
    faces = meta.faces
    if len(face_features) != len(faces):
        raise ValueError(f"{len(face_features)} face features for the {len(faces)} faces of {meta.layout.faces_file}")
    templates = template_features(face_features, faces.templates, faces.medias,
                                  faces.detector_scores if use_detector_score else None)
    scores = verification_scores(templates, meta.pairs)
    roc = Roc.of(scores, meta.pairs.labels)
    result = {
        "target": meta.layout.target,
        "tar_at_far": {far_key(far): roc.tar_at_far(far) for far in fars},
        "tar_at_far_interpolated": {far_key(far): roc.tar_at_far_interpolated(far) for far in fars},
        "identification": None,
        "templates": int(len(templates.ids)),
        "pairs": int(len(scores)),
        "mated_pairs": int(meta.pairs.labels.sum()),
        "faces": int(len(faces)),
    }
    if meta.galleries is not None:
        per_gallery = {name: identification(templates, gallery, meta.probes, fpirs)
                       for name, gallery in meta.galleries.items()}
        result["identification"] = dict(per_gallery, mean=mean_identification(per_gallery))
    return IjbEvaluation(result=result, scores=scores, roc=roc, templates=templates)
