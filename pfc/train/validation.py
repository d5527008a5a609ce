"""Verification during and after training: the sets named by the config, evaluated on rank 0."""
from __future__ import annotations

import os


from pfc.distributed.agree import run_on_every_rank
from pfc.errors import DataError
from pfc.evaluation import VerificationSet, evaluate, read_bin, read_pairs
from pfc.evaluation.verification import check_decodes
from pfc.evaluation.roc import save_roc_plot
from pfc.train.config import TrainConfig
from pfc.train.runtime import Runtime
from pfc.train.state import TrainState


def load_val_sets(config: TrainConfig, runtime: Runtime, image_size: int) -> list[VerificationSet]:
    """The verification sets named by the config, read and every image decoded before training
    (a damaged one would otherwise end the run in the final verification). Rank 0 (the rank
    that evaluates) reads and decodes them; a DataError naming the file, the pair and the image
    is raised on every rank."""
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

    return run_on_every_rank(read_and_decode, "loading the verification sets")


def run_verification(state: TrainState, val_sets: list[VerificationSet], config: TrainConfig,
                     runtime: Runtime, image_size: int, roc_plot: str | None = None) -> list[dict]:
    """Rank 0 evaluates the bare backbone on every set while the others wait; a failure there is
    raised on every rank (never a rank left waiting). The ROC curves go to ``roc_plot`` when
    given. Returns the summaries, tagged with the step (empty on the other ranks)."""

    def evaluate_sets() -> list[dict]:
        if not (runtime.is_main and val_sets):
            return []
        results = [evaluate(state.runner.model, pairs, image_size, config.eval.batch_size, runtime.device)
                   for pairs in val_sets]
        if roc_plot:
            save_roc_plot(results, roc_plot)
        return [dict(result.summary(), step=state.step) for result in results]

    return run_on_every_rank(evaluate_sets, f"verification at step {state.step}")
