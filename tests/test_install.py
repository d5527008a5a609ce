"""An installed pfc has its tools: console scripts in the package metadata, each one's ``--help``,
the trainer as a module (``python -m pfc.train``, what ``torchrun -m pfc.train`` runs), and a
wheel that carries them (without ``tools/`` or ``launch/``, which only a clone has)."""
import importlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
TOOLS = {"pfc-train", "pfc-pack", "pfc-plan", "pfc-evaluate", "pfc-compare-eval", "pfc-export-onnx",
         "pfc-make-synthetic", "pfc-eval-ijb", "pfc-embed",
         "pfc-import-weights"}


def scripts() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["project"]["scripts"]


def test_every_tool_is_a_console_script_whose_main_prints_help(capsys):
    assert set(scripts()) == TOOLS
    for name, target in scripts().items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        try:
            code = main(["--help"])
        except SystemExit as exit_:   # argparse's --help
            code = exit_.code
        output = capsys.readouterr().out
        assert code == 0 and ("usage:" in output or "Fields" in output), (name, output[:300])
        if name == "pfc-train":
            assert "torchrun --nproc_per_node=N -m pfc.train" in output and "optim.lr" in output


def test_the_tools_in_a_clone_are_the_packages_mains():
    for target in scripts().values():
        module = target.split(":")[0]
        entry = "launch/train.py" if module == "pfc.cli.train" else f"tools/{module.rsplit('.', 1)[1]}.py"
        with open(os.path.join(ROOT, entry), encoding="utf-8") as handle:
            text = handle.read()
        assert f"from {module} import main" in text and len(text.splitlines()) <= 12, entry


def test_the_trainer_runs_as_a_module_and_names_a_missing_data_folder(tmp_path):
    """``python -m pfc.train`` (what ``torchrun -m pfc.train`` starts on each rank) trains until the
    data: the folder the user gave is named, not the manifest inside it."""
    missing = tmp_path / "shards"
    result = subprocess.run([sys.executable, "-m", "pfc.train", "--data", str(missing), "--output",
                             str(tmp_path / "run"), "--network", "tiny"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (f"error (rank 0): data folder {missing} does not exist "
                                     f"(pack images into it with pfc-pack or tools/pack_shards.py)")
    missing.mkdir()
    from pfc.data.manifest import read_manifest
    from pfc.errors import DataError
    with pytest.raises(DataError, match=f"data folder {missing} holds no dataset.json: not a packed shard set"):
        read_manifest(str(missing))


def test_a_wheel_carries_the_console_scripts_and_the_trainer_module(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "pfc"), source / "pfc", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True,
                           timeout=120)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").iterdir()
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for name, target in scripts().items():
        assert f"{name} = {target}" in entry_points
        assert target.split(":")[0].replace(".", "/") + ".py" in names
    assert "pfc/train/__main__.py" in names
    assert not any(name.startswith(("tools/", "launch/", "tests/")) for name in names)
