"""Config: nested per component, recipe files, overrides (dotted and legacy flat), validation, --help."""
import dataclasses
import glob
import math
import os
import subprocess
import sys

import pytest

from pfc.errors import ConfigError
from pfc.head.margins import CombinedMargin, SphereFace
from pfc.head.regularizers import MHE, AngularTriplet
from pfc.train import cli
from pfc.train.config import (ALIASES, HeadConfig, MarginConfig, ScheduleConfig, TrainConfig,
                              apply_dataset, help_text, load_config, to_dict, validate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def recipe(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


def leaf_paths(config):
    return [path for path, *_ in cli.leaves(config)]


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_in_configs_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    validate(config)


def test_recipes_carry_the_published_hyper_parameters():
    ms1m = load_config(recipe("ms1mv3_r50"))
    assert (ms1m.backbone.network, ms1m.head.margin.m2, ms1m.head.margin.s, ms1m.optim.lr, ms1m.data.batch_size,
            ms1m.head.sample_rate, ms1m.backbone.embedding_size) == ("iresnet50", 0.5, 64.0, 0.1, 128, 1.0, 512)
    webface = load_config(recipe("webface42m_r100_pfc02"))
    assert (webface.backbone.network, webface.head.sample_rate, webface.head.margin.m3) == ("iresnet100", 0.2, 0.4)
    demo = load_config(recipe("synthetic_cpu"))
    assert (demo.data.root, demo.schedule.warmup_steps, demo.eval.pairs) == ("demo/shards", 10, "demo/heldout/pairs.txt")


VIT_RECIPES = {  # size: insightface's network name, batch per GPU, accumulated micro-batches, warmup steps
    "t": ("vit_t_dp005_mask0", 512, 1, 41476), "s": ("vit_s_dp005_mask_0", 384, 1, 6912),
    "b": ("vit_b_dp005_mask_005", 256, 12, 6912), "l": ("vit_l_dp005_mask_005", 384, 1, 6912)}


@pytest.mark.parametrize("size", sorted(VIT_RECIPES))
def test_the_vit_recipes_carry_insightfaces_wf42m_pfc03_hyper_parameters(size):
    network, batch, accumulation, warmup = VIT_RECIPES[size]
    config = load_config(recipe(f"wf42m_pfc03_vit_{size}"))
    assert (config.backbone.network, config.data.batch_size, config.optim.grad_accumulation) == (network, batch,
                                                                                                  accumulation)
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay, config.optim.grad_clip) == ("adamw", 1e-3,
                                                                                                      0.1, 5.0)
    assert config.head.optimizer == "adamw"
    assert (config.head.sample_rate, config.head.margin.m1, config.head.margin.m2, config.head.margin.m3,
            config.head.margin.s) == (0.3, 1.0, 0.0, 0.4, 64.0)
    assert (config.schedule.num_epochs, config.schedule.warmup_steps, config.schedule.kind, config.schedule.power) == (
        40, warmup, "poly", 2.0)
    assert (config.backbone.precision, config.backbone.embedding_size) == ("fp16", 512)
    # insightface builds vit_b, vit_l (and vit_h) with using_checkpoint=True, vit_t and vit_s without
    assert config.backbone.grad_checkpointing == (size in ("b", "l"))


def test_the_fine_tune_recipe_freezes_the_backbone_first():
    config = load_config(recipe("finetune_small"), ["--init_backbone", "runs/r50"])
    assert (config.backbone.init, config.backbone.freeze_steps, config.head.sample_rate) == ("runs/r50", 200, 1.0)
    assert config.optim.lr < TrainConfig().optim.lr


def test_every_field_has_a_docstring_and_every_component_knob_a_field():
    for path, owner, name, _ in cli.leaves(TrainConfig()):
        assert cli.field_docs(type(owner)).get(name), f"{path} has no attribute docstring"
    knobs = {MarginConfig: {f.name for f in dataclasses.fields(CombinedMargin)} | {"base", "gamma", "power", "lambda_min"}}
    for config_class, component_knobs in knobs.items():
        assert component_knobs <= {f.name for f in dataclasses.fields(config_class)}, config_class.__name__
    # the regularisers are configured by the components themselves: every knob is a field
    assert isinstance(TrainConfig().head.mhe, MHE) and isinstance(TrainConfig().head.triplet, AngularTriplet)


def test_overrides_dotted_with_all_three_syntaxes():
    config = load_config(recipe("ms1mv3_r50"), ["--optim.lr", "0.05", "--head.margin.m2=0.4", "seed=7",
                                                "--eval.bins", "a.bin,b.bin", "data.augment=false"])
    assert (config.optim.lr, config.head.margin.m2, config.seed) == (0.05, 0.4, 7)
    assert config.eval.bins == ("a.bin", "b.bin") and config.data.augment is False
    assert config.head.margin.m1 == 1.0  # untouched fields keep the recipe's value
    assert load_config(recipe("ms1mv3_r50")).head.margin.m2 == 0.5  # the recipe itself is not mutated


def test_knobs_that_had_no_flag_are_reachable():
    config = load_config(None, ["--head.mhe.half_space", "true", "--head.mhe.unbiased=1", "--head.triplet.semihard",
                                "false", "--head.triplet.s", "16", "--head.margin.g_max", "3",
                                "--optim.head_momentum_dtype", "bfloat16", "--head.chunk_rows", "512"])
    assert config.head.mhe.half_space and config.head.mhe.unbiased and not config.head.triplet.semihard
    assert (config.head.triplet.s, config.head.margin.g_max, config.head.chunk_rows) == (16.0, 3.0, 512)
    assert config.head.momentum_storage_dtype is __import__("torch").bfloat16   # moved to head.momentum_dtype


LEGACY_VALUES = {"data": "/shards", "output": "/out", "max_steps": "50", "num_epochs": "3", "seed": "5",
                 "resume": "auto", "batch_size": "32", "lr": "0.05", "network": "tiny", "sample_rate": "0.5",
                 "val_pairs": "p.txt", "val_root": "/img", "val_bins": "a.bin,b.bin", "eval_every": "7",
                 "save_every": "9", "log_every": "3", "warmup_steps": "4", "num_workers": "0", "engine": "deepspeed",
                 "precision": "bf16", "num_classes": "10", "num_samples": "99", "augment": "false",
                 "embedding_size": "64", "dropout": "0.1", "interclass_filter": "0.8", "mhe_weight": "0.01",
                 "mhe_kernel": "log", "mhe_power": "1", "triplet_weight": "0.5", "triplet_m": "3",
                 "grad_accumulation": "2", "optimizer": "adamw", "momentum": "0.8", "weight_decay": "1e-4",
                 "lr_schedule": "cosine", "lr_power": "1.5", "min_lr": "0.001", "grad_clip": "1",
                 "keep_checkpoints": "2", "max_nonfinite_skips": "0", "deepspeed_config": "ds.json",
                 "eval_batch_size": "16", "save_every_minutes": "0.5", "overwrite": "true",
                 "sampler": "pk", "pk_k": "8"}
UNCHANGED = {"output", "seed", "log_every", "overwrite"}


@pytest.mark.parametrize("name", sorted(LEGACY_VALUES))
def test_every_legacy_flat_flag_sets_its_nested_field(name):
    text = LEGACY_VALUES[name]
    path = ALIASES.get(name, name)
    assert name in ALIASES or name in UNCHANGED
    for argv in ([f"--{name}", text], [f"--{name}={text}"], [f"{name}={text}"]):
        config = load_config(None, argv)
        value = cli.get_path(config, path)
        expected = {"false": False, "true": True}.get(text, text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            expected = float(text)
        if isinstance(value, tuple):
            expected = tuple(text.split(","))
        assert value == expected, (argv, path, value)


def test_alias_table_covers_the_old_flat_config_and_points_at_leaves():
    old_flat = set(LEGACY_VALUES) | {"margin"}
    assert set(ALIASES) | UNCHANGED == old_flat
    leaves, groups = set(leaf_paths(TrainConfig())), set(cli.groups(TrainConfig()))
    assert all(target in leaves or target in groups for target in ALIASES.values())


def test_data_alone_is_the_root_and_data_dot_addresses_the_group():
    config = load_config(None, ["--data", "/shards", "--data.num_workers", "4", "--margin.m2", "0.3"])
    assert (config.data.root, config.data.num_workers, config.head.margin.m2) == ("/shards", 4, 0.3)


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "0.1"], "unknown config field 'learning_rate'"),
    (["--margin.m4", "0.1"], "unknown config field 'head.margin.m4'"),
    (["--head.mhe.halfspace", "1"], "did you mean head.mhe.half_space"),
    (["--lr", "fast"], "--lr (optim.lr): expected a number, got 'fast'"),
    (["--batch_size", "12.5"], "--batch_size (data.batch_size): expected an integer"),
    (["--data.augment", "maybe"], "--data.augment: expected a boolean"),
    (["--margin", "0.5"], "'head.margin' is a group"),
    (["--head", "0.5"], "'head' is a group"),
    (["--lr"], "--lr: missing value"),
    (["--sample_rate", "1.5"], "config field 'head.sample_rate': sample_rate=1.5 outside (0, 1]"),
    (["--optimizer", "lamb"], "'optim.name': 'lamb' is not one of sgd, adamw"),
    (["--optim.head_momentum_dtype", "float8"], "'head.momentum_dtype': 'float8' is not one of"),
    (["--center_dtype", "int8"], "'head.center_dtype': 'int8' is not one of fp32, bf16, fp16"),
    (["--head.rounding", "up"], "'head.rounding': 'up' is not one of stochastic, nearest"),
    (["--batch_size", "0"], "'data.batch_size' must be ≥ 1"),
    (["--network", "resnet9"], "'backbone.network': unknown network 'resnet9'"),
])
def test_bad_overrides_name_the_field(argv, message):
    with pytest.raises(ConfigError) as caught:
        load_config(recipe("synthetic_cpu"), argv)
    assert message in str(caught.value)


@pytest.mark.parametrize("field", ["lr", "optim.lr", "head.margin.s", "min_lr", "mhe_weight"])
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(field, text):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, [f"--{field}", text])


@pytest.mark.parametrize("argv, field, cause", [
    (["--margin.kind", "sphereface", "--margin.m1", "2.5"], "head.margin.m1", "SphereFace margin m=2.5 must be a positive integer"),
    (["--head.margin.kind", "cos"], "head.margin.kind", "not one of combined, sphereface"),
    (["--head.margin.s", "0"], "head.margin.s", "margin scale s=0.0 must be > 0"),
    (["--head.margin.fallback", "insightface", "--margin.m3", "0.2"], "head.margin.fallback", "ArcFace only"),
    (["--head.margin.g_max", "-1"], "head.margin.g_max", "g_max=-1.0 must be > 0"),
    (["--mhe_kernel", "cubic"], "head.mhe.kernel", "MHE kernel 'cubic'"),
    (["--head.mhe.eps", "0.7"], "head.mhe.eps", "MHE eps=0.7 outside (0, 0.5)"),
    (["--triplet_m", "0"], "head.triplet.m", "SphereFace margin m=0 must be a positive integer"),
    (["--head.triplet.weight", "-1"], "head.triplet.weight", "AngularTriplet weight=-1.0"),
    (["--embedding_size", "0"], "backbone.embedding_size", "embedding_size=0 must be >= 1"),
    (["--interclass_filter", "1.5"], "head.interclass_filter", "(it is a cosine)"),
    (["--head.chunk_rows", "-1"], "head.chunk_rows", "chunk_rows=-1 must be >= 1"),
    (["--momentum", "1.0"], "optim.momentum", "momentum 1.0 outside [0, 1)"),
    (["--weight_decay", "-1"], "optim.weight_decay", "weight_decay -1.0 must be >= 0"),
    (["--max_steps", "10", "--warmup_steps", "10"], "schedule.warmup_steps", "warmup_steps=10"),
    (["--lr_schedule", "step"], "schedule.kind", "kind='step' is not one of poly, cosine, constant"),
    (["--min_lr", "1.0"], "schedule.min_lr", "min_ratio=10.0"),
])
def test_a_component_check_surfaces_as_a_config_error_naming_the_field(argv, field, cause):
    with pytest.raises(ConfigError) as caught:
        load_config(None, argv)
    assert str(caught.value).startswith(f"config field {field!r}: ") and cause in str(caught.value)


def test_components_are_built_from_their_configs():
    assert isinstance(MarginConfig().build(), CombinedMargin)
    sphere = MarginConfig(kind="sphereface", m1=4, s=30).build()
    assert isinstance(sphere, SphereFace) and sphere.m == 4
    head = HeadConfig()
    assert head.mhe.weight == 0 and head.triplet.weight == 0        # off by default
    built = head.build(12, 8, seed=0)
    assert built.mhe is None and built.triplet is None
    head = HeadConfig(mhe=MHE(weight=0.1, half_space=True), triplet=AngularTriplet(weight=1.0, semihard=False))
    built = head.build(12, 8, seed=0)
    assert isinstance(built.mhe, MHE) and built.mhe.half_space and built.mhe is not head.mhe
    assert isinstance(built.triplet, AngularTriplet) and not built.triplet.semihard
    schedule = ScheduleConfig(warmup_steps=2, kind="cosine", min_lr=0.01).build(total_steps=10, lr=0.1)
    assert (schedule(0), schedule(1)) == (0.5, 1.0) and math.isclose(schedule(10), 0.1)
    with pytest.raises(ValueError, match="warmup_steps=20"):
        ScheduleConfig(warmup_steps=20).build(total_steps=10, lr=0.1)


def test_wrong_type_or_unknown_field_in_a_recipe_file(tmp_path):
    wrong_type = tmp_path / "wrong_type.py"
    wrong_type.write_text("from pfc.train.config import OptimConfig, TrainConfig\n"
                          "config = TrainConfig(optim=OptimConfig(lr='0.1'))\n")
    with pytest.raises(ConfigError, match="config field 'optim.lr': expected float, got str"):
        load_config(str(wrong_type))
    flat = tmp_path / "flat.py"
    flat.write_text("from pfc.train.config import TrainConfig\nconfig = TrainConfig(lr=0.1)\n")
    with pytest.raises(ConfigError, match="unexpected keyword argument 'lr'"):
        load_config(str(flat))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))


def test_apply_dataset_fills_and_checks_the_class_and_sample_counts():
    config = apply_dataset(load_config(recipe("ms1mv3_r50")), 93431, 5179510, "/data/dataset.json")
    assert (config.data.num_classes, config.data.num_samples) == (93431, 5179510)
    mismatched = load_config(recipe("ms1mv3_r50"), ["--num_classes", "85742"])
    with pytest.raises(ConfigError, match="config num_classes=85742 disagrees with /data/dataset.json "
                                          r"\(num_classes=93431\); remove it from the config"):
        apply_dataset(mismatched, 93431, 5179510, "/data/dataset.json")
    with pytest.raises(ConfigError, match="num_samples=7 disagrees"):
        apply_dataset(load_config(None, ["--num_samples", "7"]), 93431, 5179510, "dataset.json")


def test_to_dict_is_nested_and_json_ready():
    as_dict = to_dict(load_config(None, ["--val_bins", "a.bin"]))
    assert as_dict["head"]["margin"]["m2"] == 0.5 and as_dict["eval"]["bins"] == ["a.bin"]
    assert set(as_dict) == {"output", "overwrite", "seed", "log_every", "data", "backbone", "head", "optim", "schedule",
                            "eval", "checkpoint"}


def test_parse_overrides_rejects_stray_words():
    with pytest.raises(ConfigError, match="unexpected argument 'lr'"):
        cli.parse_overrides(["lr", "0.1"])


def test_help_text_lists_every_field_with_type_value_and_meaning():
    text = help_text(load_config(recipe("synthetic_cpu")))
    for path in leaf_paths(TrainConfig()):
        assert f"--{path} " in text
    assert "--data.batch_size int (default: 64)" in text  # the recipe's value, not the default 128
    assert "images per rank per micro-batch" in text
    assert "--lr → optim.lr" in text and "--data → data.root" in text


@pytest.mark.parametrize("args", [["--help"], ["configs/synthetic_cpu.py", "--help"],
                                  ["configs/ms1mv3_r50.py", "--lr", "0.1", "-h"]])
def test_launch_help_prints_every_field_and_exits_0(args):
    result = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--head.mhe.half_space bool (default: False)" in result.stdout
    assert "also count the reflections" in result.stdout
    batch = "64" if "synthetic_cpu" in " ".join(args) else "128"
    assert f"--data.batch_size int (default: {batch})" in result.stdout


def test_launch_prints_a_config_error_as_one_line_and_exits_2():
    result = subprocess.run([sys.executable, "launch/train.py", "configs/synthetic_cpu.py", "--lr", "nan"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error (rank 0): config field 'optim.lr' must be a finite number, got nan"


def test_pk_sampler_needs_a_k_that_divides_the_batch():
    config = load_config(None, ["--sampler", "pk", "--pk_k", "4", "--batch_size", "32"])
    assert (config.data.sampler, config.data.pk_k) == ("pk", 4)
    with pytest.raises(ConfigError, match="batch_size 30 is not a multiple of pk_k 4"):
        load_config(None, ["--sampler", "pk", "--pk_k", "4", "--batch_size", "30"])
    with pytest.raises(ConfigError, match="'data.sampler'"):
        load_config(None, ["--sampler", "balanced"])
    assert load_config(None, ["--batch_size", "30"]).data.sampler == "shuffle"   # K is the P×K sampler's only


def test_head_kernels_triton_where_it_cannot_run_is_a_config_error_naming_the_field(monkeypatch):
    import torch

    from pfc.errors import ConfigError
    from pfc.train.builders import build_head
    from pfc.train.config import TrainConfig
    from pfc.train.runtime import Runtime

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the CPU runs Triton only in its interpreter
    config = TrainConfig()
    config.data.num_classes = 10
    config.head.kernels = "triton"
    with pytest.raises(ConfigError, match="config field 'head.kernels': kernels='triton' on CPU tensors"):
        build_head(config, Runtime(0, 1, 0, torch.device("cpu")))
