"""The README's measured numbers are what the committed generator writes from the committed results.

``pfc.docs_numbers`` replaces the text between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``;
``tools/readme_numbers.py`` renders each block from ``docs/results/*.json`` (``make readme-numbers``
measures and writes them). A README edited by hand, or a results file whose run definition
changed, fails here.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from pfc.docs_numbers import BlockError, block_names, read_block, replace_block
from tools import readme_numbers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOC = """intro
<!-- generated: table -->
old 1
old 2
<!-- end: table -->
middle
<!-- generated: time -->
<!-- end: time -->
outro
"""


# ---------------------------------------------------------------------------------------------
# the marker mechanism

def test_replace_block_rewrites_only_the_lines_between_its_markers():
    text = replace_block(DOC, "table", "new 1\nnew 2\nnew 3\n")
    assert text == DOC.replace("old 1\nold 2\n", "new 1\nnew 2\nnew 3\n")
    assert read_block(text, "table") == "new 1\nnew 2\nnew 3"
    assert read_block(text, "time") == ""
    assert replace_block(replace_block(DOC, "time", "t = 1 s"), "time", "") == DOC   # empty block again
    assert block_names(DOC) == ["table", "time"]


@pytest.mark.parametrize("text, message", [
    (DOC, "no block '<!-- generated: absent -->'"),
    (DOC.replace("<!-- end: table -->\n", ""), "block 'time' starts inside block 'table' (opened on line 2)"),
    (DOC.replace("<!-- generated: time -->\n", ""), "line 7: '<!-- end: time -->' without its"),
    (DOC.replace("<!-- end: time -->\n", ""), "line 7: block 'time' has no '<!-- end: time -->'"),
    (DOC + DOC, "line 11: block 'table' appears twice"),
    (DOC.replace("<!-- end: table -->", "<!-- end:table -->"), "line 5: malformed marker"),
])
def test_missing_or_malformed_markers_are_errors_naming_the_marker_and_line(text, message):
    with pytest.raises(BlockError) as error:
        replace_block(text, "absent" if text == DOC else "table", "x")
    assert message in str(error.value)


def test_a_body_with_a_marker_line_is_refused():
    with pytest.raises(BlockError, match="contains a marker line"):
        replace_block(DOC, "table", "x\n<!-- end: table -->")


# ---------------------------------------------------------------------------------------------
# the README against the committed results

def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def test_the_readme_blocks_are_what_the_generator_writes_from_the_committed_results():
    readme = read("README.md")
    assert set(readme_numbers.RENDERERS) | set(readme_numbers.CHECKED_ELSEWHERE) == set(block_names(readme))
    assert readme_numbers.problems(readme) == []


def test_the_demo_block_states_the_recorded_evaluations():
    results = json.loads(read("docs/results/demo.json"))
    block = read_block(read("README.md"), "demo")
    trained = results["trained"]
    assert f"**{trained['accuracy']:.4f} ± {trained['accuracy_std']:.4f}**" in block
    assert f"| {trained['auc']:.4f} |" in block
    assert f"{results['training']['steps']} steps" in block


def test_a_block_without_a_renderer_is_reported():
    readme = read("README.md") + "\n<!-- generated: by-hand -->\n1 s\n<!-- end: by-hand -->\n"
    assert readme_numbers.problems(readme) == [
        "README block 'by-hand' has no renderer in tools/readme_numbers.py's RENDERERS"]


def test_the_tar_note_appears_only_while_the_pairs_cannot_measure_it():
    results = json.loads(read("docs/results/demo.json"))
    results["trained"]["tar@far=1e-3"] = results["untrained"]["tar@far=1e-3"] = None
    results["impostor_pairs"] = 600
    assert "hold 600 impostor pairs" in readme_numbers.render_demo_table(results)
    results["trained"]["tar@far=1e-3"] = results["untrained"]["tar@far=1e-3"] = 0.25
    table = readme_numbers.render_demo_table(results)
    assert "impostor" not in table and "| 0.2500 |" in table


def test_a_number_edited_by_hand_is_reported():
    readme = read("README.md")
    block = read_block(readme, "demo")
    trained = json.loads(read("docs/results/demo.json"))["trained"]
    edited = replace_block(readme, "demo", block.replace(f"{trained['auc']:.4f}", "0.9999"))
    assert [problem for problem in readme_numbers.problems(edited) if "'demo'" in problem]


def test_results_measured_under_another_demo_definition_are_stale(tmp_path):
    root = tmp_path / "repo"
    (root / "configs").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "Makefile"), root / "Makefile")
    shutil.copy(os.path.join(ROOT, readme_numbers.DEMO_CONFIG), root / readme_numbers.DEMO_CONFIG)
    readme = read("README.md")
    assert readme_numbers.problems(readme, root=str(root)) == []
    makefile = (root / "Makefile").read_text()
    (root / "Makefile").write_text(makefile.replace("--ids 200 --per 24", "--ids 300 --per 24"))
    assert any("demo.json was measured with another definition" in problem
               for problem in readme_numbers.problems(readme, root=str(root)))
    comment_only = makefile.replace("# The demo:", "# The demo (a comment changes nothing):")
    (root / "Makefile").write_text(comment_only)
    assert readme_numbers.problems(readme, root=str(root)) == []


def test_the_check_command_fails_on_a_stale_block(tmp_path, monkeypatch, capsys):
    stale = replace_block(read("README.md"), "demo-time", "Whole `make demo`: 1 s.")
    (tmp_path / "README.md").write_text(stale, encoding="utf-8")
    monkeypatch.setattr(readme_numbers, "README", str(tmp_path / "README.md"))
    assert readme_numbers.main(["check"]) == 1
    assert "README block 'demo-time' differs" in capsys.readouterr().out
    assert readme_numbers.main(["write"]) == 0
    assert readme_numbers.main(["check"]) == 0
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == read("README.md")


# ---------------------------------------------------------------------------------------------
# timing the demo's steps

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@needs_make
def test_every_step_of_make_demo_is_timed_under_its_name():
    commands = readme_numbers.make_commands(["make", "--no-print-directory", "demo", "VENV=/nonexistent-venv"])
    steps = [readme_numbers.demo_step(command) for _, command in commands]
    steps = [step for step in steps if step not in (None, "venv")]
    assert steps == ["images", "images", "packing", "training", "evaluation", "evaluation", "evaluation"]


@needs_make
def test_a_step_lasts_from_its_commands_echo_to_the_next_one(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text(".PHONY: demo\ndemo:\n"
                        "\techo start\n"
                        "\tsleep 0.4 # tools/make_synthetic.py\n"
                        "\tsleep 0.2 # launch/train.py\n")
    seconds, loads = readme_numbers.run_timed(["make", "--no-print-directory", "-f", str(makefile), "demo"])
    assert seconds["images"] >= 0.4 and seconds["training"] >= 0.2
    assert seconds["packing"] == seconds["evaluation"] == seconds["venv"] == 0
    assert seconds["total"] >= seconds["images"] + seconds["training"]
    assert len(loads) == 5          # the start, each command's start, the end
