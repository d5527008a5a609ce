"""The trainer's IJB verification (pfc.train.validation with eval.ijb): the config's fields, the
protocol read before training (a missing loose crop named on every rank), and the logged 1:1 TAR
equal to the protocol's own evaluation of the same features."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pfc.datasets.synthetic_ijb import write_synthetic_ijb
from pfc.errors import ConfigError, DataError
from pfc.evaluation.embedding import extract_features
from pfc.evaluation.embedding_model import module_embedding_model
from pfc.evaluation.ijb import evaluate_ijb
from pfc.train.config import TrainConfig, load_config
from pfc.train.runtime import Runtime
from pfc.train.validation import EvalSets, load_val_sets, run_verification

SIZE = 32


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    write_synthetic_ijb(str(root), "IJBC", subjects=3, seed=1, identification=False)
    return root


def ijb_config(root, far=0.1) -> TrainConfig:
    config = TrainConfig()
    config.eval.ijb, config.eval.ijb_far, config.data.num_workers, config.backbone.embedding_size = str(root), far, 0, 8
    return config


def test_the_ijb_fields_are_checked_with_the_config():
    assert load_config(None, ["--eval.ijb", "/x", "--eval.ijb_target", "IJBB"]).eval.ijb_target == "IJBB"
    with pytest.raises(ConfigError, match="'eval.ijb_target': 'IJBA' is not one of IJBB, IJBC"):
        load_config(None, ["--eval.ijb_target", "IJBA"])
    with pytest.raises(ConfigError, match=r"'eval.ijb_far' must be in \(0, 1\)"):
        load_config(None, ["--eval.ijb_far", "0"])


def test_the_logged_tar_is_the_protocols_on_the_backbones_features(ijb_root):
    from pfc.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("tiny", 8, 0.0, SIZE)
    model.train()
    config = ijb_config(ijb_root)
    runtime = Runtime(0, 1, 0, torch.device("cpu"))
    sets = load_val_sets(config, runtime, SIZE)
    assert isinstance(sets, EvalSets) and sets.pairs == [] and len(sets.ijb.items) == len(sets.ijb.meta.faces)
    state = SimpleNamespace(runner=SimpleNamespace(model=model), step=7)
    (summary,) = run_verification(state, sets, config, runtime, SIZE)
    assert model.training   # evaluated in eval mode, then given back as it was
    features = extract_features(module_embedding_model(model, 8, SIZE), sets.ijb.items, num_workers=0, progress=False)
    expected = evaluate_ijb(sets.ijb.meta, features, fars=(0.1,)).result
    assert summary == {"set": "IJBC", "protocol": "ijb 1:1", "step": 7, "far": 0.1,
                       "tar@far=1e-1": expected["tar_at_far"]["1e-01"],
                       "tar@far=1e-1 interpolated": expected["tar_at_far_interpolated"]["1e-01"],
                       "templates": expected["templates"], "pairs": expected["pairs"]}


def test_a_missing_ijb_image_or_root_stops_before_training(ijb_root, tmp_path):
    runtime = Runtime(0, 1, 0, torch.device("cpu"))
    with pytest.raises(DataError, match="eval.ijb .* is not a folder"):
        load_val_sets(ijb_config(tmp_path / "nowhere"), runtime, SIZE)
    os.symlink(ijb_root / "meta", tmp_path / "meta")
    os.mkdir(tmp_path / "loose_crop")
    names = sorted(os.listdir(ijb_root / "loose_crop"))
    for name in names[1:]:
        os.symlink(ijb_root / "loose_crop" / name, tmp_path / "loose_crop" / name)
    missing = f"ijbc_name_5pts_score.txt:\\d+: image {tmp_path}/loose_crop/{names[0]} does not exist"
    with pytest.raises(DataError, match=missing):
        load_val_sets(ijb_config(tmp_path), runtime, SIZE)
    assert np.all([os.path.exists(tmp_path / "loose_crop" / name) for name in names[1:]])


def test_an_ijb_row_is_logged_with_its_tar_and_left_out_of_the_pair_comparison(tmp_path):
    import json

    from pfc.evaluation.report import read_results
    from pfc.train.metrics import TrainLogger

    pair_row = {"set": "pairs", "num_pairs": 40, "accuracy": 0.9, "accuracy_std": 0.01, "threshold": 1.2, "auc": 0.95,
                "tar@far=1e-3": 0.5, "tar@far=1e-4": None, "step": 5}
    ijb_row = {"set": "IJBC", "protocol": "ijb 1:1", "step": 5, "far": 1e-4, "tar@far=1e-4": 0.25,
               "tar@far=1e-4 interpolated": 0.26, "templates": 9, "pairs": 18}
    lines = []
    with TrainLogger(str(tmp_path), True) as logger:
        logger.log_eval([pair_row, ijb_row], write=lines.append)
    assert lines[1] == "eval IJBC step 5: ijb 1:1 tar@far=1e-4 0.2500 (18 pairs)"
    logged = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert logged == [pair_row, ijb_row]
    (tmp_path / "eval_results.json").write_text(json.dumps({"final": [pair_row, ijb_row], "history": []}))
    assert read_results([str(tmp_path / "eval_results.json")]) == [("eval_results", pair_row)]
