"""The README's capacity block is what the planner makes now (tools/capacity_table.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_capacity_block_matches_a_fresh_plan():
    """Reruns every plan of the block (about a minute of CPU): a stale block fails with its diff."""
    run = subprocess.run([sys.executable, "tools/capacity_table.py", "--check", "README.md"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_readme_has_the_capacity_block_and_only_the_planner_writes_it():
    from pfc.docs_numbers import read_block
    from tools.capacity_table import BLOCK
    from tools.readme_numbers import problems

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "| bf16 |" in read_block(text, BLOCK)
    # the README-numbers check knows the block is checked by the planner's rerun, not from a results file
    assert not [problem for problem in problems(text) if repr(BLOCK) in problem]
