"""The README's backbone table is the registry's (tools/backbone_table.py): every registered network
with its parameters and GFLOPs as counted now. The planner's memory columns take minutes:
`make check-readme-backbones` reruns those."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block() -> str:
    from pfc.docs_numbers import read_block
    from tools.backbone_table import BLOCK

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return read_block(f.read(), BLOCK)


def test_readme_backbone_rows_are_every_registered_network_with_its_size_and_flops_now():
    from tools.backbone_table import size_columns, table_names

    rows = [line for line in _block().splitlines() if re.match(r"^\| [a-z]", line) and "| network |" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == table_names(), "stale backbone table: run make readme-backbones"
    for name, row in zip(names, rows):
        assert row.startswith(size_columns(name) + " "), f"stale row {name}: run make readme-backbones"
        memory = [cell.strip() for cell in row.split("|")[4:6]]
        assert all(re.fullmatch(r"[0-9.]+ GiB|—", cell) for cell in memory), row


def test_the_block_is_checked_by_its_tool_not_by_the_results_files():
    from tools.readme_numbers import problems

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert not [problem for problem in problems(f.read()) if "'backbones'" in problem]
