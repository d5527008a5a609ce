"""End to end: synthetic identities → shards → 2-rank gloo training via real torchrun → outputs.

One training run checks several things (loss goes down, metrics/eval files with an IJB root's
1:1 TAR beside the pairs, ROC, backbone.pt, tools/evaluate.py, tools/export_onnx.py); a second run checks that a num_classes mismatch stops
every rank with a clear message.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def run(args, timeout=240, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def torchrun(*args, check=True):
    return run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "launch/train.py", "configs/synthetic_cpu.py", *args], check=check)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    run(["tools/make_synthetic.py", str(root / "train"), "--ids", "16", "--per", "8", "--seed", "1"])
    run(["tools/make_synthetic.py", str(root / "heldout"), "--ids", "8", "--per", "4", "--seed", "2",
         "--pairs", "40"])
    run(["tools/pack_shards.py", "folder", str(root / "train"), str(root / "shards"), "--shard-size", "50"])
    from pfc.datasets.synthetic_ijb import write_synthetic_ijb
    write_synthetic_ijb(str(root / "ijb"), "IJBB", subjects=3, seed=4, identification=False)
    return root


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_two_rank_training_run(dataset, tmp_path):
    output = tmp_path / "run"
    result = torchrun("--data", str(dataset / "shards"), "--output", str(output),
                      "--val_pairs", str(dataset / "heldout" / "pairs.txt"), "--max_steps", "30",
                      "--batch_size", "16", "--warmup_steps", "3", "--log_every", "5", "--eval_every", "15",
                      "--num_workers", "1", "--eval.ijb", str(dataset / "ijb"), "--eval.ijb_target", "IJBB",
                      "--eval.ijb_far", "0.1")
    assert "trained 30 steps" in result.stdout

    config = json.loads((output / "config.json").read_text())
    assert (config["data"]["num_classes"], config["data"]["num_samples"], config["schedule"]["max_steps"]) == (16, 128, 30)

    records = read_jsonl(output / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert {"loss", "ce", "accuracy", "lr", "samples_per_s", "eta_s", "epoch"} <= set(records[0])
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], [r["loss"] for r in records]
    assert records[0]["lr"] == pytest.approx(0.1 * (1 - 1 / 27) ** 2)  # warmup done; poly decay at step 4

    evals = read_jsonl(output / "eval.jsonl")
    assert [(e["step"], e["set"]) for e in evals] == [(15, "pairs"), (15, "IJBB"), (30, "pairs"), (30, "IJBB")]
    assert all(0.0 <= e["accuracy"] <= 1.0 and "tar@far=1e-3" in e for e in evals[::2])
    assert all(0.0 <= e["tar@far=1e-1"] <= 1.0 and e["protocol"] == "ijb 1:1" and e["pairs"] > 0 for e in evals[1::2])
    assert "eval IJBB step 30: ijb 1:1 tar@far=1e-1" in result.stdout
    final, ijb_final = json.loads((output / "eval_results.json").read_text())["final"]
    assert final["num_pairs"] == 40 and ijb_final == evals[-1]
    assert (output / "roc.png").stat().st_size > 0 and (output / "backbone.pt").exists()

    evaluated = json.loads(run(["tools/evaluate.py", str(output), "--pairs",
                                str(dataset / "heldout" / "pairs.txt")]).stdout)
    assert evaluated["accuracy"] == pytest.approx(final["accuracy"]) and "tar@far=1e-3" in evaluated

    exported = run(["tools/export_onnx.py", str(output), "-o", str(tmp_path / "model.onnx")])
    assert (tmp_path / "model.onnx").exists()
    assert "onnxruntime check" in exported.stdout or "not installed" in exported.stdout


def test_num_classes_mismatch_stops_every_rank(dataset, tmp_path):
    result = torchrun("--data", str(dataset / "shards"), "--output", str(tmp_path / "bad"),
                      "--num_classes", "99", "--val_pairs", "", "--max_steps", "2", "--warmup_steps", "0",
                      check=False)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): config num_classes=99 disagrees with" in result.stderr
    assert not (tmp_path / "bad" / "backbone.pt").exists()


def test_data_error_on_one_rank_stops_every_rank(dataset, tmp_path):
    """A label outside [0, num_classes) raises in the loader of the rank that reads it; the
    trainer turns that into the same error on every rank instead of leaving the others waiting."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(dataset / "shards", shards)
    manifest = json.loads((shards / "dataset.json").read_text())
    manifest["num_classes"] = 12   # labels 12..15 are now out of range
    (shards / "dataset.json").write_text(json.dumps(manifest))
    classes = (shards / "classes.txt").read_text().splitlines()[:12]
    (shards / "classes.txt").write_text("\n".join(classes) + "\n")
    result = torchrun("--data", str(shards), "--output", str(tmp_path / "bad"), "--val_pairs", "",
                      "--max_steps", "4", "--warmup_steps", "0", "--batch_size", "16", check=False)
    assert result.returncode != 0
    assert "outside [0, 12)" in result.stderr
    for rank in (0, 1):
        assert f"error (rank {rank}): loading batch 0 of epoch 0 failed on rank" in result.stderr, result.stderr[-3000:]
