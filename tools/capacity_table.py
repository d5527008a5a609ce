"""The README's capacity table and its text, made by the planner (so they cannot drift from it).

    python tools/capacity_table.py                      # print the block
    python tools/capacity_table.py --write README.md    # replace the block in README.md (make readme-capacity)
    python tools/capacity_table.py --check README.md    # exit 1 with a diff when stale (make check-readme-capacity)

The block lies between ``<!-- generated: capacity -->`` and ``<!-- end: capacity -->``
(:mod:`pfc.docs_numbers`, the README's generated blocks; this one is rerun by its own check, not
from a results file).
It plans 8 × iresnet100 (batch 128, ρ = 0.1, bf16 autocast, DDP) with fp32 and bf16 centers at
10M and 100M classes with the largest class count on 8 × 80 and 8 × 141 GB, and insightface's
speed job (8 × iresnet50, batch 128, fp16, fp32 centers) at 29M against 125k classes on V100 and
H100; about a minute on two cores.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools._cli import one_line_errors  # noqa: E402

from pfc.docs_numbers import read_block, write_or_check_block  # noqa: E402

BLOCK = "capacity"
GIB = 2**30


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def _millions(value: int) -> str:
    return f"{value / 1e6:.0f}M"


def capacity_rows(progress=None) -> tuple[list[str], dict]:
    """The table's rows (markdown) and the bf16 plan at 100M classes (for the text)."""
    from pfc.planning.job import Job
    from pfc.planning.plan import Planner, fits, largest_fitting

    rows, bf16_100m = [], None
    for center_dtype in ("fp32", "bf16"):
        planner = Planner(Job(num_classes=1, gpus=8, network="iresnet100", batch_size=128, sample_rate=0.1,
                              precision="bf16", center_dtype=center_dtype), progress=progress)
        at_10m, at_100m = planner.plan(10_000_000), planner.plan(100_000_000)
        largest = {memory: largest_fitting(planner, memory) for memory in (80, 141)}
        rows.append(f"| {center_dtype} | {_gib(at_10m.peak_bytes)} | {_gib(at_100m.peak_bytes)} | "
                    f"{'yes' if fits(at_100m, 80) else 'no'} | {_millions(largest[80])} | {_millions(largest[141])} | "
                    f"{at_100m.bytes_per_identity:,.0f} |")
        if center_dtype == "bf16":
            bf16_100m = at_100m
    return rows, bf16_100m


def memory_text(plan) -> str:
    """Where the memory goes (the bf16 plan at 100M), per category and per identity."""
    categories, job = plan.categories, plan.job
    storage = (categories["centers"] + categories["momentum"]) * job.gpus / job.num_classes
    row_bytes = storage / 2          # one center row (its momentum row is the same size)
    copies = (plan.bytes_per_identity - storage) / (job.sample_rate * row_bytes)
    return (f"Where the memory goes at 100M with bf16 centers (peak in the {plan.peak_phase} phase): centers "
            f"{_gib(categories['centers'])}, their momentum {_gib(categories['momentum'])}, the sampled rows "
            f"{_gib(categories['sampled rows'])} (the rows the head gathers and the rollback's copies), backbone "
            f"activations {_gib(categories['activations'])}, parameters {_gib(categories['backbone parameters'])}, "
            f"gradients {_gib(categories['gradients'])}, communication buffers "
            f"{_gib(categories['communication buffers'])}, optimizer state {_gib(categories['optimizer state'])}. "
            f"Per identity that is 2 × {row_bytes:,.0f} bytes of storage (center and momentum) plus "
            f"ρ × {copies:.1f} rows' worth of sampled copies: {plan.bytes_per_identity:,.0f} bytes.")


def speed_text(progress=None) -> str:
    """insightface's speed job on V100 and H100: 29M against 125k classes, calibrated and pure roofline."""
    from pfc.planning.job import Job
    from pfc.planning.plan import Planner
    from pfc.planning.report import estimate

    planner = Planner(Job(num_classes=1, gpus=8, network="iresnet50", batch_size=128, sample_rate=0.1,
                          precision="fp16", center_dtype="fp32"), progress=progress)
    large, small = planner.plan(29_000_000), planner.plan(125_000)
    parts = []
    for gpu in ("v100", "h100"):
        at_large, at_small = estimate(large, gpu), estimate(small, gpu)
        kept = 100 * at_large.samples_per_s / at_small.samples_per_s
        parts.append(f"on 8 × {gpu.upper()} 29M classes keep {kept:.0f} % of the 125k-class throughput "
                     f"({at_large.samples_per_s:,.0f} against "
                     f"{at_small.samples_per_s:,.0f} samples/s; pure roofline "
                     f"{100 * at_large.roofline_samples_per_s / at_small.roofline_samples_per_s:.0f} %), the head "
                     f"{1e3 * (at_large.head_s + at_large.head_comm_s):.0f} ms of a "
                     f"{1e3 * at_large.step_s:.0f} ms step with {at_large.head_launches:,} kernel launches")
    return ("Time on paper for insightface's speed job (8 × iresnet50, batch 128, fp16 with its GradScaler, fp32 "
            "centers as insightface keeps them, ρ = 0.1, the head's kernels as a CUDA run picks them): "
            f"{parts[0]}; {parts[1]}. insightface "
            "measured 37 % for that pair on 8 × V100 (5,004 and 1,855 samples/s). The backbone's time is calibrated "
            "on published runs and each kernel launch costs 5 µs (`pfc/planning/roofline.py`).")


def block(progress=None) -> str:
    """The generated block's text (between its markers)."""
    rows, bf16_100m = capacity_rows(progress)
    return "\n".join([
        "<!-- made by `make readme-capacity` (tools/capacity_table.py); `make check-readme-capacity` and "
        "tests/test_capacity_table.py check it: edit the tool, not this block -->",
        "iresnet100, batch 128 per GPU, ρ = 0.1, bf16 autocast, DDP, 8 GPUs (commands and earlier numbers in",
        "[docs/benchmarks.md](docs/benchmarks.md#capacity-planner-toolsplanpy-issue-13)):",
        "",
        "| centers | peak per rank, 10M classes | peak per rank, 100M classes | 100M fits 8 × 80 GB | "
        "largest on 8 × 80 GB | largest on 8 × 141 GB | bytes per identity |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        memory_text(bf16_100m),
        "",
        speed_text(progress),
    ])


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the block in FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE's block differs from a fresh one")
    args = parser.parse_args(argv)
    path = args.write or args.check
    if path is not None:
        with open(path, encoding="utf-8") as f:
            read_block(f.read(), BLOCK)   # the markers are checked before a minute of planning
    fresh = block()
    if path is None:
        print(fresh)
        return 0
    return write_or_check_block(path, BLOCK, fresh, check=bool(args.check), remedy="make readme-capacity")


if __name__ == "__main__":
    sys.exit(main())
