"""The README's capacity block is what the planner makes now (tools/capacity_table.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pfc.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_capacity_block_matches_a_fresh_plan():
    """Reruns every plan of the block (about a minute of CPU): a stale block fails with its diff."""
    run = subprocess.run([sys.executable, "tools/capacity_table.py", "--check", "README.md"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_block_is_replaced_between_its_markers_only():
    from tools.capacity_table import BEGIN, END, replace_block

    text = f"before\n{BEGIN}\nold\n{END}\nafter\n"
    assert replace_block(text, f"{BEGIN}\nnew\n{END}", "README.md") == f"before\n{BEGIN}\nnew\n{END}\nafter\n"
    for broken in ("no markers", f"{BEGIN}\n{BEGIN}\n{END}", f"{END}\n{BEGIN}"):
        with pytest.raises(ConfigError, match="needs exactly one"):
            replace_block(broken, "", "README.md")
