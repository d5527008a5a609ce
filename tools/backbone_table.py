"""The README's backbone table: every registered network's size, work and training memory.

    python tools/backbone_table.py                      # print the block
    python tools/backbone_table.py --write README.md    # replace the block in README.md
    python tools/backbone_table.py --check README.md    # exit 1 with a diff when stale

The block lies between ``<!-- generated: backbones -->`` and ``<!-- end: backbones -->``
(:mod:`pfc.docs_numbers`). One row per registered name except the insightface config names
(:data:`pfc.backbones.vit.VIT_SETTINGS` aliases, listed under the table): parameters (a build
on the meta device), GFLOPs of one 112-px image's forward in eval mode
(``torch.utils.flop_counter``, 2 per multiply-add, on the meta device), and the planner's
training memory per GPU (:func:`pfc.planning.simulate.simulate`: rank 0 of 8, DDP, batch 128,
bf16 autocast, SGD with momentum, the backbone's share of the peak: its parameters, gradients,
optimizer state, DDP buckets and activations; with and without gradient checkpointing). The
memory simulations take a few minutes on two cores; ``--no-memory`` leaves that column as it is
in the file (the fast check of tests/test_backbone_table.py compares the other columns).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools._cli import one_line_errors  # noqa: E402

from pfc.docs_numbers import read_block, write_or_check_block  # noqa: E402

BLOCK = "backbones"
GIB = 2**30
# the planner's categories that belong to the backbone (the head's: centers, momentum, sampled
# rows, logits and head scratch)
BACKBONE_CATEGORIES = ("backbone parameters", "gradients", "optimizer state", "activations",
                       "communication buffers", "other")
HEADER = ("| network | parameters | GFLOPs (112 px) | training memory per GPU | with gradient checkpointing |",
          "|---|---:|---:|---:|---:|")


def table_names() -> list[str]:
    """The registered networks of the table, by family (the name up to its first digit or '_')
    and size: all but insightface's ViT config names."""
    from pfc.backbones import available_backbones
    from pfc.backbones.vit import INSIGHTFACE_ALIASES

    def key(name: str) -> tuple[str, int]:
        return re.split(r"[0-9_]", name)[0], size_and_flops(name)[0]

    return sorted((name for name in available_backbones() if name not in INSIGHTFACE_ALIASES), key=key)


@functools.lru_cache(maxsize=None)
def size_and_flops(name: str, embedding_size: int = 512, image_size: int = 112) -> tuple[int, int]:
    """(parameters, forward FLOPs of one image in eval mode), counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pfc.backbones import build_backbone

    with torch.device("meta"):
        model = build_backbone(name, embedding_size=embedding_size, image_size=image_size).eval()
        images = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def training_memory(name: str, grad_checkpointing: bool) -> int:
    """Bytes of the backbone's share of one rank's peak (module docstring's job)."""
    from pfc.planning.job import Job
    from pfc.planning.simulate import simulate

    job = Job(num_classes=8000, gpus=8, network=name, batch_size=128, sample_rate=1.0, precision="bf16",
              kernels="torch", grad_checkpointing=grad_checkpointing)
    result = simulate(job)
    peak = max(result.phase_peaks.values(), key=lambda categories: sum(categories.values()))
    return sum(peak.get(category, 0) for category in BACKBONE_CATEGORIES)


def size_columns(name: str) -> str:
    """``| name | parameters | GFLOPs |`` of a row."""
    parameters, flops = size_and_flops(name)
    return f"| {name} | {parameters / 1e6:,.2f} M | {flops / 1e9:,.2f} |"


def row(name: str, memory: bool = True, previous: dict[str, str] | None = None) -> str:
    """One table row; without ``memory`` the memory columns of ``previous`` (name → row), or '?'."""
    from pfc.backbones import supports_grad_checkpointing

    if memory:
        plain = f"{training_memory(name, False) / GIB:.2f} GiB"
        checkpointed = (f"{training_memory(name, True) / GIB:.2f} GiB" if supports_grad_checkpointing(name)
                        else "—")
        memory_columns = f" {plain} | {checkpointed} |"
    else:
        old = (previous or {}).get(name)
        memory_columns = "|".join(old.split("|")[4:6]) + "|" if old else " ? | ? |"
    return size_columns(name) + memory_columns


def _rows_by_name(block_text: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in block_text.splitlines()
            if line.startswith("| ") and not line.startswith(HEADER[0][:11])}


def block(memory: bool = True, previous_block: str = "", progress=None) -> str:
    """The generated block's text (between its markers)."""
    from pfc.backbones.vit import INSIGHTFACE_ALIASES, VIT_SETTINGS

    previous = _rows_by_name(previous_block)
    rows = []
    for name in table_names():
        rows.append(row(name, memory, previous))
        if progress:
            progress(name)
    aliases = ", ".join(f"`{alias}` ({size}, drop-path {VIT_SETTINGS[alias].drop_path_rate:g}, masking "
                        f"{VIT_SETTINGS[alias].mask_ratio:g})" for alias, size in INSIGHTFACE_ALIASES.items())
    return "\n".join([
        "<!-- made by `make readme-backbones` (tools/backbone_table.py); `make check-readme-backbones` checks it all, "
        "tests/test_backbone_table.py its rows, parameters and GFLOPs: edit the tool, not this block -->",
        "Embedding 512. GFLOPs: one 112-px image's forward in eval mode, 2 FLOPs per multiply-add "
        "(`torch.utils.flop_counter`; insightface's tables count multiply-adds: half these). Training memory: "
        "the planner's peak of the backbone's share on one of 8 GPUs (DDP, batch 128, bf16 autocast, SGD with "
        "momentum: fp32 weights, gradients, momentum, DDP's gradient buckets, activations; the head not counted), "
        "without and with `--backbone.grad_checkpointing`.",
        "",
        *HEADER,
        *rows,
        "",
        f"insightface's config names, registered with their settings: {aliases}.",
    ])


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the block in FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE's block differs from a fresh one")
    parser.add_argument("--no-memory", action="store_true",
                        help="keep the memory columns of FILE's block (no planner runs; new rows get '?')")
    args = parser.parse_args(argv)
    path = args.write or args.check
    previous = ""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            previous = read_block(f.read(), BLOCK)   # the markers are checked before minutes of planning
    fresh = block(memory=not args.no_memory, previous_block=previous,
                  progress=lambda name: print(f"  {name}", file=sys.stderr, flush=True))
    if path is None:
        print(fresh)
        return 0
    return write_or_check_block(path, BLOCK, fresh, check=bool(args.check),
                                remedy=f"python tools/backbone_table.py --write {path}")


if __name__ == "__main__":
    sys.exit(main())
