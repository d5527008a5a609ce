"""Config: recipe files, overrides (plain and dotted), unknown fields, wrong types, the manifest."""
import os

import pytest

from pfc.train.config import TrainConfig, apply_manifest, load_config, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(name):
    return os.path.join(ROOT, "configs", f"{name}.py")


@pytest.mark.parametrize("name", ["synthetic_cpu", "ms1mv3_r50", "glint360k_r100", "webface42m_r100_pfc02"])
def test_shipped_recipes_load(name):
    config = load_config(recipe(name))
    assert isinstance(config, TrainConfig)


def test_recipes_carry_the_published_hyper_parameters():
    ms1m = load_config(recipe("ms1mv3_r50"))
    assert (ms1m.network, ms1m.margin.m2, ms1m.margin.s, ms1m.lr, ms1m.batch_size, ms1m.sample_rate,
            ms1m.embedding_size) == ("iresnet50", 0.5, 64.0, 0.1, 128, 1.0, 512)
    webface = load_config(recipe("webface42m_r100_pfc02"))
    assert (webface.network, webface.sample_rate, webface.margin.m3) == ("iresnet100", 0.2, 0.4)


def test_overrides_plain_dotted_and_equals_forms():
    config = load_config(recipe("ms1mv3_r50"), ["--lr", "0.05", "--margin.m2", "0.4", "--seed=7",
                                                "batch_size=32", "--val_bins", "a.bin,b.bin", "--augment", "false"])
    assert (config.lr, config.margin.m2, config.seed, config.batch_size) == (0.05, 0.4, 7, 32)
    assert config.val_bins == ("a.bin", "b.bin") and config.augment is False
    assert config.margin.m1 == 1.0  # untouched fields keep the recipe's value
    assert load_config(recipe("ms1mv3_r50")).margin.m2 == 0.5  # the recipe itself is not mutated


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "0.1"], "unknown config field 'learning_rate'"),
    (["--margin.m4", "0.1"], "unknown config field 'margin.m4'"),
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--batch_size", "12.5"], "--batch_size: expected an integer"),
    (["--augment", "maybe"], "--augment: expected a boolean"),
    (["--margin", "0.5"], "'margin' is a group"),
    (["--lr"], "--lr: missing value"),
    (["--sample_rate", "1.5"], "sample_rate"),
    (["--optimizer", "lamb"], "'optimizer': 'lamb' is not one of sgd, adamw"),
])
def test_bad_overrides_name_the_field(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", "'")):
        load_config(recipe("synthetic_cpu"), argv)


def test_wrong_type_or_unknown_field_in_a_recipe_file(tmp_path):
    wrong_type = tmp_path / "wrong_type.py"
    wrong_type.write_text("from pfc.train.config import TrainConfig\nconfig = TrainConfig(lr='0.1')\n")
    with pytest.raises(ValueError, match="config field 'lr': expected float, got str"):
        load_config(str(wrong_type))
    unknown = tmp_path / "unknown.py"
    unknown.write_text("from pfc.train.config import TrainConfig\nconfig = TrainConfig(learning_rate=0.1)\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(str(unknown))
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))


def test_manifest_fills_and_checks_num_classes():
    manifest = {"num_classes": 93431, "num_samples": 5179510, "image_size": 112}
    config = apply_manifest(load_config(recipe("ms1mv3_r50")), manifest)
    assert (config.num_classes, config.num_samples) == (93431, 5179510)
    mismatched = load_config(recipe("ms1mv3_r50"), ["--num_classes", "85742"])
    with pytest.raises(ValueError, match="num_classes=85742 disagrees with .*num_classes=93431"):
        apply_manifest(mismatched, manifest)
    with pytest.raises(ValueError, match="num_samples=7 disagrees"):
        apply_manifest(TrainConfig(num_samples=7), manifest)


def test_parse_overrides_rejects_stray_words():
    with pytest.raises(ValueError, match="unexpected argument 'lr'"):
        parse_overrides(["lr", "0.1"])
