"""DeepSpeed backbone engine on 2 CPU gloo ranks: ZeRO-1/2 losses vs DDP, save/resume, engine
changes, and the trainer with ``engine: deepspeed`` (stopped by SIGTERM, resumed).

pfc keeps DeepSpeed from compiling its CPU inference all-reduce op (``shm_comm``, 30–100 s of
g++): the test points ``TORCH_EXTENSIONS_DIR`` at an empty folder and checks it stays empty.
"""
from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch

from tests.distributed import run_ranks
from tests.train_fixtures import write_shards

pytestmark = pytest.mark.slow

NUM_CLASSES, EMBEDDING, BATCH, STEPS = 11, 8, 4, 4


def small_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 3 * 3, EMBEDDING))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return (torch.randn(BATCH, 3, 8, 8, generator=generator),
            torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator))


def build(engine: str, stage: int = 0, bf16: bool = False):
    """``(runner, head, head_optimizer)`` with the same initial weights for every engine."""
    from pfc.head.margins import ArcFace
    from pfc.head.partial_fc import PartialFC
    from pfc.train.runners.ddp import DDPRunner

    backbone = small_backbone()
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    head = PartialFC(NUM_CLASSES, EMBEDDING, margin=ArcFace(s=16.0, m=0.3), sample_rate=0.5, seed=0)
    head_optimizer = head.optimizer(lr=0.1)
    if engine == "ddp":
        return DDPRunner(backbone, optimizer), head, head_optimizer
    from pfc.train.runners.deepspeed import build_deepspeed_runner

    config = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    return build_deepspeed_runner(backbone, config, micro_batch_size=BATCH, optimizer=optimizer), head, head_optimizer


def train_steps(rank, parts, steps) -> list[float]:
    runner, head, head_optimizer = parts
    losses = []
    for step in steps:
        head.set_iteration(step)
        images, labels = batch(rank, step)
        losses.append(runner.forward_backward(images, labels, head, last_micro=True).item())
        runner.step(head_optimizer)
    return losses


def state_of(parts, step: int = 0):
    from pfc.train.state import TrainState

    return TrainState(runner=parts[0], head=parts[1], head_optimizer=parts[2], step=step)


def deepspeed_vs_ddp(rank: int, world_size: int, output_dir: str) -> dict:
    from pfc.train.checkpoint import load_checkpoint, save_checkpoint

    os.environ["LOCAL_RANK"] = str(rank)
    results = {}
    for name, engine, stage, bf16 in (("ddp", "ddp", 0, False), ("zero1", "deepspeed", 1, False),
                                      ("zero2", "deepspeed", 2, False), ("zero2_bf16", "deepspeed", 2, True)):
        start = time.perf_counter()
        parts = build(engine, stage, bf16)
        results[name] = {"losses": train_steps(rank, parts, range(STEPS)),
                         "head": parts[1].weight.detach().clone(), "seconds": time.perf_counter() - start}

    # save after 2 steps, run 2 more; a fresh engine resumed from the checkpoint runs the same 2
    for stage in (1, 2):
        parts = build("deepspeed", stage)
        train_steps(rank, parts, range(2))
        path = save_checkpoint(os.path.join(output_dir, f"zero{stage}"), state_of(parts, step=2))
        saved_weights = {k: v.clone() for k, v in parts[0].model.state_dict().items()}
        saved_head = parts[1].weight.detach().clone()
        continued = train_steps(rank, parts, range(2, STEPS))
        fresh = build("deepspeed", stage)
        info = load_checkpoint(path, state_of(fresh))
        resumed = train_steps(rank, fresh, range(info.progress["step"], STEPS))
        results[f"saved_zero{stage}"] = {"path": str(path), "weights": saved_weights,
                                         "head": saved_head, "class_start": parts[1].class_start}
        results[f"resume_zero{stage}"] = {"continued": continued, "resumed": resumed,
                                          "head_equal": torch.equal(parts[1].weight, fresh[1].weight)}

    # engine changes carry the weights (not the optimizer state): DeepSpeed → DDP, DDP → DeepSpeed
    ddp = build("ddp")
    info = load_checkpoint(path, state_of(ddp))
    from_deepspeed = all(torch.equal(saved_weights[k], v) for k, v in ddp[0].model.state_dict().items())
    train_steps(rank, ddp, range(2))
    ddp_path = save_checkpoint(os.path.join(output_dir, "ddp"), state_of(ddp, step=100))
    zero = build("deepspeed", 2)
    info_zero = load_checkpoint(ddp_path, state_of(zero))
    from_ddp = all(torch.equal(ddp[0].model.state_dict()[k], v) for k, v in zero[0].model.state_dict().items())
    next_ddp, next_zero = train_steps(rank, ddp, [5]), train_steps(rank, zero, [5])
    results["engine_change"] = {"from_deepspeed": from_deepspeed, "from_ddp": from_ddp,
                                "optimizer_restored": (info.backbone_optimizer_restored,
                                                       info_zero.backbone_optimizer_restored),
                                "next_losses": (next_ddp, next_zero)}
    return results


def trainer_engines(rank: int, world_size: int, data: str, output_dir: str) -> dict:
    """The trainer with ``engine: deepspeed`` (ZeRO-2 file) vs ``engine: ddp``; then a stopped and
    resumed DeepSpeed run (checkpoint with DeepSpeed's engine state and pfc's head)."""
    import json
    import signal

    from pfc.train import loop as engine
    from pfc.head.partial_fc import PartialFC
    from tests.train_fixtures import make_config

    os.environ["LOCAL_RANK"] = str(rank)       # torchrun's variable, which DeepSpeed requires
    os.makedirs(output_dir, exist_ok=True)
    zero2, zero2_bf16 = os.path.join(output_dir, "zero2.json"), os.path.join(output_dir, "zero2_bf16.json")
    if rank == 0:
        with open(zero2, "w") as handle:
            json.dump({"zero_optimization": {"stage": 2}}, handle)
        with open(zero2_bf16, "w") as handle:
            json.dump({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, handle)
    torch.distributed.barrier()
    losses, saved_dtypes = {}, {}
    bf16 = {"engine": "deepspeed", "deepspeed_config": zero2_bf16, "precision": "bf16"}
    # bf16 with BatchNorm (every real backbone has it): the tiny net and iresnet18, against DDP in fp32
    for name, overrides in (("ddp", {}), ("deepspeed", {"engine": "deepspeed", "deepspeed_config": zero2}),
                            ("deepspeed_bf16", bf16), ("ddp_iresnet18", {"network": "iresnet18"}),
                            ("deepspeed_bf16_iresnet18", {**bf16, "network": "iresnet18"})):
        output = os.path.join(output_dir, name)
        engine.train(make_config(data, output, max_steps=4, grad_clip=5.0, **overrides))
        with open(os.path.join(output, "metrics.jsonl")) as handle:
            losses[name] = [json.loads(line)["loss"] for line in handle]
        if name.startswith("deepspeed_bf16"):
            weights = torch.load(os.path.join(output, "backbone.pt"), weights_only=True)["state_dict"]
            saved_dtypes[name] = {("statistics" if "running_" in key else "parameters"): value.dtype
                                  for key, value in weights.items() if value.is_floating_point()}
    fp16_error = None
    if not torch.cuda.is_available():   # DeepSpeed's CPU accelerator has no fp16: a clear error on every rank
        try:
            engine.train(make_config(data, os.path.join(output_dir, "fp16"), max_steps=4, engine="deepspeed",
                                     precision="fp16"))
        except ValueError as exc:
            fp16_error = str(exc)

    original = PartialFC.set_iteration

    def set_iteration(self, iteration):
        if iteration == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, iteration)

    PartialFC.set_iteration = set_iteration
    resumed_dir = os.path.join(output_dir, "deepspeed_resumed")
    try:
        stopped = engine.train(make_config(data, resumed_dir, max_steps=4, grad_clip=5.0, engine="deepspeed",
                                           deepspeed_config=zero2))
    finally:
        PartialFC.set_iteration = original
    resumed = engine.train(make_config(data, resumed_dir, max_steps=4, grad_clip=5.0, engine="deepspeed",
                                       deepspeed_config=zero2, resume="auto"))
    with open(os.path.join(resumed_dir, "metrics.jsonl")) as handle:
        losses["deepspeed_resumed"] = [json.loads(line)["loss"] for line in handle]
    return {"losses": losses, "stopped_at": stopped.steps, "resumed_steps": resumed.steps,
            "saved_dtypes": saved_dtypes, "fp16_error": fp16_error,
            "fine_tuned": fine_tune_under_deepspeed(rank, data, output_dir, zero2)}


def fine_tune_under_deepspeed(rank: int, data: str, output_dir: str, zero2: str) -> dict:
    """--init_backbone and --freeze_backbone_steps 2 with engine: deepspeed (ZeRO-2): whether the
    backbone holds the saved weights before step 0 and still after the frozen steps, whether the
    head trained meanwhile, and whether the backbone trained after them."""
    from pfc.backbones import build_backbone
    from pfc.evaluation.export import save_backbone
    from pfc.train import loop as engine
    from tests.train_fixtures import make_config

    weights = os.path.join(output_dir, "pretrained.pt")
    torch.manual_seed(11)
    saved = build_backbone("tiny", 16, 0.0, 16)
    if rank == 0:
        save_backbone(saved, weights, network="tiny", embedding_size=16, image_size=16)
    torch.distributed.barrier()
    seen, original = {}, engine.train_step

    def train_step(state, *args, **kwargs):
        seen[state.step] = ({k: v.detach().clone() for k, v in state.runner.model.state_dict().items()},
                            state.head.weight.detach().clone())
        return original(state, *args, **kwargs)

    engine.train_step = train_step
    try:
        engine.train(make_config(data, os.path.join(output_dir, "fine_tuned"), max_steps=4, warmup_steps=1,
                                 engine="deepspeed", deepspeed_config=zero2, **{"backbone.init": weights,
                                                                                "backbone.freeze_steps": 2}))
    finally:
        engine.train_step = original

    def same(state):
        return all(torch.equal(value, state[key]) for key, value in saved.state_dict().items())

    return {"start": same(seen[0][0]), "after_frozen": same(seen[2][0]), "trained_after": not same(seen[3][0]),
            "head_trained": not torch.equal(seen[0][1], seen[2][1])}


def load_on_other_world_size(rank: int, world_size: int, path: str) -> dict:
    """A ZeRO-2 checkpoint of 2 ranks on ``world_size`` ranks: DeepSpeed weights only, head resharded."""
    from pfc.train.checkpoint import load_checkpoint

    os.environ["LOCAL_RANK"] = str(rank)
    parts = build("deepspeed", 2)
    info = load_checkpoint(path, state_of(parts))
    weights = {k: v.clone() for k, v in parts[0].model.state_dict().items()}
    head = parts[1].weight.detach().clone()
    losses = train_steps(rank, parts, range(2, 4))          # and it trains on
    return {"weights": weights, "head": head, "class_start": parts[1].class_start, "losses": losses,
            "optimizer_restored": info.backbone_optimizer_restored}


def deepspeed_suite(rank: int, world_size: int, output_dir: str, data: str) -> dict:
    """Both checks in one process group (each spawn costs seconds of imports)."""
    results = deepspeed_vs_ddp(rank, world_size, output_dir)
    results["trainer"] = trainer_engines(rank, world_size, data, os.path.join(output_dir, "trainer"))
    return results


def test_deepspeed_zero_matches_ddp_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))     # inherited by the spawned ranks
    data = write_shards(str(tmp_path / "shards"), num_classes=12, per_class=8, image_size=16)
    results = run_ranks(deepspeed_suite, 2, str(tmp_path), data, timeout=400, collective_timeout=300)
    assert not extensions.exists() or not any(extensions.iterdir()), "DeepSpeed compiled an op"
    for rank_result in results:
        ddp = rank_result["ddp"]
        for name in ("zero1", "zero2"):        # fp32 ZeRO: the same arithmetic as DDP
            assert rank_result[name]["losses"] == pytest.approx(ddp["losses"], rel=1e-6, abs=1e-6), name
            assert torch.allclose(rank_result[name]["head"], ddp["head"], rtol=1e-5, atol=1e-6), name
        # bf16 weights and activations: agreement to bf16 precision
        assert rank_result["zero2_bf16"]["losses"] == pytest.approx(ddp["losses"], rel=2e-2)
        for stage in (1, 2):
            resume = rank_result[f"resume_zero{stage}"]
            assert resume["resumed"] == resume["continued"] and resume["head_equal"], resume
        change = rank_result["engine_change"]
        assert change["from_deepspeed"] and change["from_ddp"] and change["optimizer_restored"] == (False, False)
        assert change["next_losses"][0] == pytest.approx(change["next_losses"][1], rel=1e-6)
    # the ZeRO-2 checkpoint of 2 ranks on 3: backbone weights exact, optimizer state fresh, head resharded
    saved = {rank: result["saved_zero2"] for rank, result in enumerate(results)}
    on_three = run_ranks(load_on_other_world_size, 3, saved[0]["path"], timeout=300, collective_timeout=200)
    saved_head = torch.cat([saved[r]["head"] for r in sorted(saved, key=lambda r: saved[r]["class_start"])])
    loaded_head = torch.cat([r["head"] for r in sorted(on_three, key=lambda r: r["class_start"])])
    assert torch.equal(saved_head, loaded_head)
    for result in on_three:
        assert not result["optimizer_restored"]
        assert all(torch.equal(saved[0]["weights"][k], v) for k, v in result["weights"].items())
        assert all(map(math.isfinite, result["losses"]))

    print("\nDDP losses %s; ZeRO-2 bf16 %s" % (results[0]["ddp"]["losses"], results[0]["zero2_bf16"]["losses"]))

    # through the trainer (engine: deepspeed, ZeRO-2 file, accumulation 2, clipping) vs engine: ddp
    trainer = results[0]["trainer"]
    losses = trainer["losses"]
    assert len(losses["ddp"]) == 4
    print("trainer losses: ddp %s, deepspeed ZeRO-2 %s" % (losses["ddp"], losses["deepspeed"]))
    # ZeRO sums the accumulated, flattened gradients and the clipping norm in another order than
    # DDP's buckets: float rounding that grows with the steps (step 1 equal; then 2e-7, 4e-6 and
    # 1.5e-4 relative by step 4 with the loader's windowed shuffle; 2e-5 with the former shuffle)
    assert losses["deepspeed"][0] == losses["ddp"][0]
    assert losses["deepspeed"] == pytest.approx(losses["ddp"], rel=5e-4)
    # bf16 with BatchNorm trains (it failed at step 1 in F.batch_norm), BatchNorm statistics kept in fp32
    # beside the bf16 parameters. Step 1 is the forward alone: within bf16 rounding of fp32 DDP (0.4-0.6 %
    # measured). The later steps are not compared: with 4 images per rank, BatchNorm over a 1×1 map
    # amplifies bf16 rounding (the backbone gradient is 25-30 % off fp32's at batch 4, 6-8 % at 32, as
    # with torch's bf16 autocast, which tests/test_fp32_batchnorm.py matches bit for bit)
    print("trainer losses: ddp %s, deepspeed ZeRO-2 bf16 %s; ddp iresnet18 %s, deepspeed ZeRO-2 bf16 iresnet18 %s"
          % (losses["ddp"], losses["deepspeed_bf16"], losses["ddp_iresnet18"], losses["deepspeed_bf16_iresnet18"]))
    for fp32, bf16 in (("ddp", "deepspeed_bf16"), ("ddp_iresnet18", "deepspeed_bf16_iresnet18")):
        assert losses[bf16][0] == pytest.approx(losses[fp32][0], rel=1e-2), bf16
        assert len(losses[bf16]) == 4 and all(map(math.isfinite, losses[bf16])), bf16
    for dtypes in trainer["saved_dtypes"].values():
        assert dtypes == {"statistics": torch.float32, "parameters": torch.bfloat16}
    if not torch.cuda.is_available():
        assert all("DeepSpeed fp16 needs a GPU" in result["trainer"]["fp16_error"] for result in results)
    assert trainer["stopped_at"] == 3 and trainer["resumed_steps"] == 4
    # fine-tuning under DeepSpeed: the saved weights at step 0 and after the 2 frozen steps; then it trains
    assert all(result["trainer"]["fine_tuned"] == {"start": True, "after_frozen": True, "trained_after": True,
                                                   "head_trained": True} for result in results)
    # the stopped run logged steps 1-3 and the resumed one step 4: the uninterrupted run's losses
    assert losses["deepspeed_resumed"] == pytest.approx(losses["deepspeed"], rel=1e-6)
def test_deepspeed_config_is_resolved_against_the_trainer_config(tmp_path):
    from pfc.train.runners.deepspeed import resolve_deepspeed_config

    resolved = resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch_size=8, grad_accumulation=2,
                                        grad_clip=5.0, world_size=4)
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"],
            resolved["gradient_clipping"], resolved["train_batch_size"]) == (8, 2, 5.0, 64)
    assert resolved["zero_allow_untested_optimizer"] is True
    config_file = tmp_path / "ds.json"
    config_file.write_text('{"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 16}')
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=16, the trainer config says 8"):
        resolve_deepspeed_config(str(config_file), micro_batch_size=8)
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        resolve_deepspeed_config({"zero_optimization": {"stage": 3}}, micro_batch_size=8)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_deepspeed_config(str(tmp_path / "missing.json"), micro_batch_size=8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a GPU"):
            resolve_deepspeed_config({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}},
                                     micro_batch_size=8)


def test_engine_deepspeed_without_deepspeed_installed_names_the_extra(monkeypatch):
    from pfc.errors import ConfigError
    from pfc.train.runners.deepspeed import build_deepspeed_runner

    monkeypatch.setitem(sys.modules, "deepspeed", None)       # as if it were not installed
    with pytest.raises(ConfigError, match=r"needs DeepSpeed, which is not installed: pip install -e '.\[deepspeed\]' in pfc's clone"):
        build_deepspeed_runner(small_backbone(), {"zero_optimization": {"stage": 1}}, micro_batch_size=BATCH)


def test_a_deepspeed_file_must_agree_with_the_configured_precision(tmp_path):
    from pfc.errors import ConfigError
    from pfc.train.builders import deepspeed_settings
    from pfc.train.config import load_config
    from pfc.train.runtime import Runtime

    runtime = Runtime(0, 1, 0, torch.device("cpu"))
    fp32_file, bf16_file = tmp_path / "zero1.json", tmp_path / "zero2_bf16.json"
    fp32_file.write_text('{"zero_optimization": {"stage": 1}}')
    bf16_file.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}}')
    with pytest.raises(ConfigError, match="'backbone.precision' is 'bf16' but the DeepSpeed config .* trains in fp32"):
        deepspeed_settings(load_config(None, ["--precision", "bf16", "--deepspeed_config", str(fp32_file)]), runtime)
    assert deepspeed_settings(load_config(None, ["--precision", "bf16", "--deepspeed_config", str(bf16_file)]),
                              runtime)["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_settings(load_config(None, ["--deepspeed_config", str(fp32_file)]), runtime)
    assert deepspeed_settings(load_config(None, ["--precision", "bf16"]), runtime)["bf16"] == {"enabled": True}
    # fp16 is DeepSpeed's to refuse on a CPU, with its own clear error (before: trained in fp32 without
    # a word, or "precision is 'fp16' but the DeepSpeed config trains in fp16" with an fp16 file)
    fp16_file = tmp_path / "zero1_fp16.json"
    fp16_file.write_text('{"zero_optimization": {"stage": 1}, "fp16": {"enabled": true}}')
    for argv in (["--precision", "fp16"], ["--precision", "fp16", "--deepspeed_config", str(fp16_file)]):
        settings = deepspeed_settings(load_config(None, argv), runtime)
        assert settings["fp16"] == {"enabled": True}, argv
        if not torch.cuda.is_available():
            from pfc.train.runners.deepspeed import resolve_deepspeed_config

            with pytest.raises(ConfigError, match="DeepSpeed fp16 needs a GPU"):
                resolve_deepspeed_config(settings, micro_batch_size=8)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_deepspeed_bf16_command_trains_on_two_cpu_ranks(tmp_path, monkeypatch):
    """The README's DeepSpeed command (the tiny net of configs/synthetic_cpu.py, BatchNorm in every
    stage, ZeRO-2 bf16) under torchrun: it stopped at step 1 on every rank inside F.batch_norm."""
    import json
    import subprocess

    pytest.importorskip("deepspeed")
    data = write_shards(str(tmp_path / "shards"), num_classes=12, per_class=8, image_size=16)
    output = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "launch/train.py", "configs/synthetic_cpu.py", "--data", data, "--output", str(output),
               "--max_steps", "4", "--engine", "deepspeed", "--deepspeed_config", "configs/deepspeed_zero2_bf16.json",
               "--precision", "bf16", "--batch_size", "8", "--warmup_steps", "0", "--log_every", "1",
               "--num_workers", "0", "--eval.pairs", ""]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    assert "trained 4 steps" in text and "training in fp32 on CPU" not in text, text[-4000:]   # bf16 on CPU too
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(math.isfinite(row["loss"]) for row in rows)
