"""IJB-B / IJB-C evaluation with insightface's protocol (its ``recognition/_evaluation_/ijb``).

    meta.py            the protocol files (insightface's layout), read and cross-checked
    templates.py       face features → media → template features (detector-score weighted)
    verification.py    1:1 pair scores (blocked GEMM), the ROC, TAR at FAR (nearest, interpolated)
    identification.py  1:N per gallery: top-k, TPIR at FPIR (open set)
    protocol.py        all of it from face features: evaluate_ijb
    report.py          ijb_result.json, scores.npy, roc.png, the papers' table

Images and models are elsewhere (alignment and extraction: pfc.evaluation.alignment,
pfc.evaluation.embedding; the command: pfc.cli.eval_ijb). Its modules need numpy only.
"""
from pfc.evaluation.ijb.identification import FPIRS, identification
from pfc.evaluation.ijb.meta import GALLERIES, TARGETS, IjbLayout, IjbMeta, Target, read_ijb_meta
from pfc.evaluation.ijb.protocol import IjbEvaluation, evaluate_ijb
from pfc.evaluation.ijb.templates import TemplateFeatures, template_features
from pfc.evaluation.ijb.verification import FARS, Roc, pair_scores, tar_at_far, verification_scores

__all__ = ["FARS", "FPIRS", "GALLERIES", "TARGETS", "IjbEvaluation", "IjbLayout", "IjbMeta", "Roc", "Target",
           "TemplateFeatures", "evaluate_ijb", "identification", "pair_scores", "read_ijb_meta", "tar_at_far",
           "template_features", "verification_scores"]
