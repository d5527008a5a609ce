"""Who owns an output folder: a fresh run never mixes with another run's files.

    claim_output(config, runtime)      # collective, at the start of a run, before anything is written

A run's folder holds its config.json, logs, checkpoints and model. A *fresh* run (no
``--resume``) into a folder that already holds such files would append to the other run's logs,
keep its checkpoints (a later ``--resume auto`` or torchrun restart would continue from the other
run's weights) and overwrite its ``backbone.pt``. So a fresh run stops, on every rank, naming the
folder and the three ways on: ``--resume auto`` (continue that run), ``--overwrite`` (remove that
run's files first) or another ``--output``. A resume (``--resume auto|PATH``, or a torchrun restart,
see :func:`pfc.train.resume.resume_request`) continues in the folder as it is.

``--overwrite`` removes only what the trainer writes (:func:`run_files`); any other file in the
folder is left alone.
"""
from __future__ import annotations

import os
import re
import shutil

from pfc.distributed.agree import run_on_every_rank
from pfc.errors import ConfigError
from pfc.evaluation.export import BACKBONE_NAME
from pfc.train.config import TrainConfig
from pfc.train.resume import resume_request
from pfc.train.runtime import Runtime

# What a training run writes into its output folder (see pfc.train.loop.train), with the
# temporary names it writes them under first.
RUN_FILE_NAMES = ("config.json", "metrics.jsonl", "eval.jsonl", "eval_results.json", "roc.png", BACKBONE_NAME)
_TEMPORARY_FILE = re.compile(r"^(?P<name>.+)\.tmp\d*$")
_CHECKPOINT_DIR = re.compile(r"^(\.tmp-|\.delete-)?checkpoint-\d+$")  # final, being written, being deleted
TENSORBOARD_DIR = "tensorboard"
_TENSORBOARD_FILE = re.compile(r"^events\.out\.tfevents\.")


def run_files(output: str) -> list[str]:
    """Names of the entries of ``output`` a training run wrote (sorted; [] when it does not exist):
    its files, checkpoint directories (complete or not), and ``tensorboard/`` when it holds
    event files."""
    if not os.path.isdir(output):
        return []
    found = []
    for entry in sorted(os.scandir(output), key=lambda item: item.name):
        name = entry.name
        temporary = _TEMPORARY_FILE.match(name)
        if entry.is_file(follow_symlinks=False) and (name in RUN_FILE_NAMES or (
                temporary is not None and temporary.group("name") in RUN_FILE_NAMES)):
            found.append(name)
        elif entry.is_dir(follow_symlinks=False) and _CHECKPOINT_DIR.match(name):
            found.append(name)
        elif name == TENSORBOARD_DIR and entry.is_dir(follow_symlinks=False) and _event_files(entry.path):
            found.append(name)
    return found


def _event_files(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return [entry.path for entry in entries
                if entry.is_file(follow_symlinks=False) and _TENSORBOARD_FILE.match(entry.name)]


def _remove(path: str) -> None:
    """Remove one entry :func:`run_files` found; of ``tensorboard/`` only the event files (and the
    folder once empty)."""
    if os.path.basename(path) == TENSORBOARD_DIR:
        for event_file in _event_files(path):
            os.remove(event_file)
        if not os.listdir(path):
            os.rmdir(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _summary(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_or_clear(config: TrainConfig) -> list[str]:
    """On one process: ConfigError when a fresh run (no resume request) would write into a folder
    holding another run's files, unless ``config.overwrite``; then those files are removed and
    their names returned. A resume returns [] and changes nothing."""
    output, explicit_resume = config.output, config.checkpoint.resume
    if explicit_resume and config.overwrite:
        raise ConfigError(f"--overwrite and --resume {explicit_resume} contradict each other: --overwrite "
                          f"removes the run in {output} that --resume would continue; give one of them")
    if resume_request(config):
        return []
    found = run_files(output)
    if not found:
        return []
    if not config.overwrite:
        raise ConfigError(f"output folder {output} holds another run's files ({_summary(found)}); a fresh run "
                          f"would mix with them. Continue that run with --resume auto, replace it with "
                          f"--overwrite (removes those files, nothing else), or choose another --output")
    for name in found:
        _remove(os.path.join(output, name))
    return found


def claim_output(config: TrainConfig, runtime: Runtime) -> None:
    """Collective: :func:`check_or_clear` on rank 0 (the folder is shared by every rank); its
    error, if any, is raised on every rank."""
    removed = run_on_every_rank(lambda: check_or_clear(config) if runtime.is_main else [],
                                "checking the output folder")
    if removed:
        print(f"--overwrite: removed the previous run's {_summary(removed)} from {config.output}")
