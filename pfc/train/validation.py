"""Verification during and after training: the sets named by the config.

Pair sets (``eval.pairs``, ``eval.bins``) are evaluated on rank 0 while the others wait. An IJB
root (``eval.ijb``) is embedded by every rank (a share each, :func:`pfc.evaluation.embedding.extract_features`)
and scored on rank 0: the 1:1 TAR at ``eval.ijb_far`` with insightface's protocol
(:mod:`pfc.evaluation.ijb`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from pfc.distributed.agree import run_on_every_rank
from pfc.errors import DataError
from pfc.evaluation import VerificationSet, evaluate, read_bin, read_pairs
from pfc.evaluation.embedding import FaceItem, extract_features
from pfc.evaluation.embedding_model import module_embedding_model
from pfc.evaluation.ijb import IjbMeta, Roc, read_ijb_meta, template_features, verification_scores
from pfc.evaluation.verification import check_decodes
from pfc.evaluation.roc import save_roc_plot
from pfc.train.config import TrainConfig
from pfc.train.runtime import Runtime
from pfc.train.state import TrainState

IJB_PROTOCOL = "ijb 1:1"     # the "protocol" of an IJB row in eval.jsonl (pair-set rows have none)


@dataclass
class IjbSet:
    """An IJB protocol read for evaluation: its meta files and one face item per face (its loose
    crop and landmarks)."""

    meta: IjbMeta
    items: list[FaceItem] = field(repr=False)


@dataclass
class EvalSets:
    """What :func:`load_val_sets` read: the pair sets (every rank holds them on rank 0 only) and the
    IJB protocol (on every rank), None without ``eval.ijb``."""

    pairs: list[VerificationSet]
    ijb: IjbSet | None = None

    def __bool__(self) -> bool:
        return bool(self.pairs) or self.ijb is not None


def load_val_sets(config: TrainConfig, runtime: Runtime, image_size: int) -> EvalSets:
    """The verification sets named by the config, read before training: the pair sets with every
    image decoded on rank 0 (a damaged one would otherwise end the run in the final
    verification), the IJB protocol files on every rank and its loose crops' existence checked
    (their decoding is checked when they are first embedded). An error naming the file, the
    pair (and its line) or the image is raised on every rank."""
    def read_and_decode() -> list[VerificationSet]:
        if not runtime.is_main:
            return []
        for path in ([config.eval.pairs] if config.eval.pairs else []) + list(config.eval.bins):
            if not os.path.isfile(path):
                raise DataError(f"verification file {path} does not exist")
        if config.eval.root and not os.path.isdir(config.eval.root):
            raise DataError(f"eval.root {config.eval.root} is not a folder")
        sets = []
        if config.eval.pairs:
            sets.append(read_pairs(config.eval.pairs, config.eval.root or None))
        sets.extend(read_bin(path) for path in config.eval.bins)
        for pairs in sets:
            check_decodes(pairs, image_size)
        return sets

    pairs = run_on_every_rank(read_and_decode, "loading the verification sets")
    ijb = run_on_every_rank(lambda: read_ijb_set(config, runtime.is_main), f"loading the IJB root {config.eval.ijb}") \
        if config.eval.ijb else None
    return EvalSets(pairs, ijb)


def read_ijb_set(config: TrainConfig, check_images: bool) -> IjbSet:
    """``eval.ijb``'s protocol of ``eval.ijb_target``; with ``check_images`` DataError naming the
    first face whose loose crop does not exist."""
    if not os.path.isdir(config.eval.ijb):
        raise DataError(f"eval.ijb {config.eval.ijb} is not a folder")
    meta = read_ijb_meta(config.eval.ijb, config.eval.ijb_target)
    items = [FaceItem(meta.layout.image(name), landmarks, line=line)     # line: of the 5-point file
             for line, (name, landmarks) in enumerate(zip(meta.faces.names.tolist(), meta.faces.landmarks), start=1)]
    if check_images:
        for item in items:
            if not os.path.isfile(item.path):
                raise DataError(f"{meta.layout.faces_file}:{item.line}: image {item.path} does not exist")
    return IjbSet(meta, items)


def run_verification(state: TrainState, val_sets: EvalSets | list[VerificationSet], config: TrainConfig,
                     runtime: Runtime, image_size: int, roc_plot: str | None = None) -> list[dict]:
    """Rank 0 evaluates the bare backbone on every pair set while the others wait, then every rank
    embeds its share of the IJB faces and rank 0 scores them; a failure anywhere is raised on
    every rank (never a rank left waiting). The pair sets' ROC curves go to ``roc_plot`` when
    given. Returns the summaries, tagged with the step (empty on the other ranks). ``val_sets``:
    what :func:`load_val_sets` returned (a plain list of pair sets is accepted too)."""
    sets = val_sets if isinstance(val_sets, EvalSets) else EvalSets(list(val_sets))

    def evaluate_sets() -> list[dict]:
        if not (runtime.is_main and sets.pairs):
            return []
        results = [evaluate(state.runner.model, pairs, image_size, config.eval.batch_size, runtime.device)
                   for pairs in sets.pairs]
        if roc_plot:
            save_roc_plot(results, roc_plot)
        return [dict(result.summary(), step=state.step) for result in results]

    summaries = run_on_every_rank(evaluate_sets, f"verification at step {state.step}")
    if sets.ijb is not None:
        summaries += run_ijb(state, sets.ijb, config, runtime, image_size)
    return summaries


def run_ijb(state: TrainState, ijb: IjbSet, config: TrainConfig, runtime: Runtime, image_size: int) -> list[dict]:
    """Collective: the IJB 1:1 summary of the current backbone (on rank 0; [] elsewhere):
    ``{"set", "protocol", "step", "tar@far=F", "tar@far=F interpolated", "templates", "pairs"}``."""
    model = module_embedding_model(state.runner.model, config.backbone.embedding_size, image_size, runtime.device)
    features = extract_features(model, ijb.items, batch_size=config.eval.batch_size,
                                num_workers=config.data.num_workers, progress=False)

    def score() -> list[dict]:
        if not runtime.is_main:
            return []
        faces, far = ijb.meta.faces, config.eval.ijb_far
        templates = template_features(features, faces.templates, faces.medias, faces.detector_scores)
        scores = verification_scores(templates, ijb.meta.pairs)
        roc = Roc.of(scores, ijb.meta.pairs.labels)
        key = f"tar@far={far:.0e}".replace("e-0", "e-")
        return [{"set": ijb.meta.layout.target, "protocol": IJB_PROTOCOL, "step": state.step, "far": far,
                 key: roc.tar_at_far(far), f"{key} interpolated": roc.tar_at_far_interpolated(far),
                 "templates": int(len(templates.ids)), "pairs": int(len(scores))}]

    return run_on_every_rank(score, f"IJB scoring at step {state.step}")
