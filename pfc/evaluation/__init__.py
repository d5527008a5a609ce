"""Evaluation of a trained backbone: verification sets, the protocol's metrics, export.

    verification.py  pair sets (pairs lists, insightface .bin), flip-averaged embeddings, evaluate
    roc.py           10-fold accuracy, exact ROC, TAR at FAR, the ROC plots
    export.py        backbone.pt (save_backbone / load_backbone) and ONNX export
    alignment.py     five-point alignment resampled as OpenCV's warpAffine (insightface's pipeline)
    embedding.py     features of any list of faces (FaceItem), every rank a share, cached
    embedding_model.py  a backbone.pt or an ONNX graph behind one call (load_embedding_model)
    import_weights.py  insightface arcface_torch weights → a pfc network for backbone.pt
    report.py        results side by side
    ijb/             IJB-B / IJB-C: meta files, template pooling, 1:1 TAR at FAR, 1:N, outputs

Imports :mod:`pfc.backbones` (to rebuild a saved network), never the trainer.
"""
from pfc.evaluation.export import load_backbone, save_backbone
from pfc.evaluation.verification import VerificationSet, evaluate, read_bin, read_pairs

__all__ = ["VerificationSet", "read_pairs", "read_bin", "evaluate", "save_backbone", "load_backbone"]
