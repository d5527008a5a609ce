"""The README and the Makefile tell a new user the same, usable things."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def test_the_readme_activates_the_venv_before_the_first_python_command():
    readme = read("README.md")
    activate = readme.find(". .venv/bin/activate")
    first_command = re.search(r"^python (tools|launch)/", readme, re.MULTILINE).start()   # in a code block
    assert 0 <= activate < first_command


def test_the_makefile_leaves_the_demo_time_to_the_readmes_generated_block():
    """The demo's time is measured by `make readme-numbers` into the README; the Makefile quotes none."""
    assert "Whole `make demo`" in read("README.md")
    demo_comment = read("Makefile").split("\ndemo: ")[0].rsplit("# The demo", 1)[1]
    assert "README" in demo_comment
    assert not re.search(r"\d+\s*(min|s)\b", demo_comment)
