"""Template features of the IJB protocol, from the features of their faces (insightface's pooling).

For face i with extracted feature x_i (flip-summed, not normalised) and detector score s_i:

    face feature        f_i = s_i · x_i                        (without detector scores: f_i = x_i)
    media feature       m_(t,k) = mean of f_i over the faces of media k in template t
    template feature    u_t = Σ_k m_(t,k);   t̂ = u_t / ‖u_t‖   (a zero u_t stays zero)

A media is the pair (template, media id): the same media id in two templates pools separately.
Computed in one pass as u_t = Σ_(i in t) (s_i / n_i) · x_i, n_i = the number of faces of i's
media; sums in float64, in blocks of rows (IJB-C's 469,375 × 512 features never copied whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROW_BLOCK = 32768


@dataclass
class TemplateFeatures:
    """``ids`` int64 [T] sorted unique template ids; ``features`` float64 [T, D], unit rows."""

    ids: np.ndarray
    features: np.ndarray

    def rows(self, template_ids: np.ndarray) -> np.ndarray:
        """Row of each template id; ValueError naming the first id that has no row."""
        template_ids = np.asarray(template_ids, dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.ids, template_ids), len(self.ids) - 1)
        unknown = np.flatnonzero(self.ids[rows] != template_ids)
        if unknown.size:
            raise ValueError(f"template {template_ids[unknown[0]]} has no features "
                             f"({unknown.size} of {template_ids.size} ids are unknown)")
        return rows


def template_features(face_features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      detector_scores: np.ndarray | None = None) -> TemplateFeatures:
    """Pool ``face_features`` [N, D] (any float dtype) into L2-normalised template features
    (module docstring). ``templates``, ``medias`` int [N]; ``detector_scores`` float [N] or None."""
    face_features = np.asarray(face_features)
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    count, dim = face_features.shape
    if templates.shape != (count,) or medias.shape != (count,):
        raise ValueError(f"{count} face features but {templates.shape[0]} template and {medias.shape[0]} media ids")
    weights = np.ones(count) if detector_scores is None else np.asarray(detector_scores, dtype=np.float64)
    ids, template_index = np.unique(templates, return_inverse=True)
    _, media_index = np.unique(medias, return_inverse=True)
    media_key = template_index.astype(np.int64) * (int(media_index.max()) + 1) + media_index
    _, media_of_face, faces_per_media = np.unique(media_key, return_inverse=True, return_counts=True)
    coefficients = weights / faces_per_media[media_of_face]
    pooled = np.zeros((len(ids), dim), dtype=np.float64)
    for start in range(0, count, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        np.add.at(pooled, template_index[rows], face_features[rows].astype(np.float64) * coefficients[rows, None])
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    np.divide(pooled, norms, out=pooled, where=norms > 0)
    return TemplateFeatures(ids=ids, features=pooled)
