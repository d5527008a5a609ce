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


def test_readme_and_makefile_agree_on_the_demo_time():
    """The Makefile's demo comment quotes the README's measured time."""
    measured = re.search(r"Whole `make demo` in a fresh clone, creating `.venv` included: (\d+ min \d+ s)",
                         read("README.md"))
    assert measured, "the README's measured demo time"
    demo_comment = read("Makefile").split("\ndemo: ")[0].rsplit("# The demo", 1)[1]
    assert measured.group(1) in demo_comment
    assert not re.search(r"~\s*\d+ min", demo_comment)   # no other estimate beside the measurement
