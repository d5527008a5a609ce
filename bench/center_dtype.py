"""Learning parity of narrow class centers: the demo's training with fp32, bf16 + stochastic
rounding, and bf16 + round-to-nearest centers, side by side, on 2 CPU gloo ranks.

    python bench/center_dtype.py [--workdir runs/center_dtype] [--ids 200] [--per 24]
                                 [--epochs 6] [--seeds 2048] [--variants fp32 bf16 bf16-nearest]
    python bench/center_dtype.py --cost [--rows 50000] [--dim 512] [--rate 0.1]

The synthetic identities of ``make demo`` (tools/make_synthetic.py: a training set and a disjoint
held-out set with a pairs list; tools/pack_shards.py) are made once in ``--workdir``; then each
variant trains ``configs/synthetic_cpu.py`` with the same steps, data order and seed, differing
only in ``--center_dtype``, the momentum's type (the centers' own) and ``--head.rounding``, and
tools/evaluate.py measures held-out verification accuracy (10 folds, mean ± std). Prints a
markdown table: accuracy ± fold std, the difference to fp32 in points, the head's stored state
per identity (centers + momentum), and the training's wall time.

``--cost``: the price of rounding, in one process, side by side: a ``[chunk, D]`` block cast to
bf16/fp16 to nearest and stochastically (:func:`pfc.head.rounding.round_into`), and one
``SparseRowSGD.update_rows`` of ``rate × rows`` random rows of a ``[rows, D]`` shard with fp32,
bf16 + nearest and bf16 + stochastic storage (median of 7 runs, milliseconds, and ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# variant → (center_dtype, rounding)
VARIANTS = {"fp32": ("fp32", "stochastic"), "bf16": ("bf16", "stochastic"), "bf16-nearest": ("bf16", "nearest"),
            "fp16": ("fp16", "stochastic"), "fp16-nearest": ("fp16", "nearest")}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def make_data(workdir: str, ids: int, per: int) -> tuple[str, str]:
    """The demo's data (made once): shards of the training identities, the held-out pairs list."""
    shards, pairs = os.path.join(workdir, "shards"), os.path.join(workdir, "heldout", "pairs.txt")
    if not os.path.exists(os.path.join(shards, "dataset.json")):
        python = sys.executable
        run([python, "tools/make_synthetic.py", os.path.join(workdir, "train"), "--ids", str(ids), "--per", str(per),
             "--seed", "1"])
        run([python, "tools/make_synthetic.py", os.path.join(workdir, "heldout"), "--ids", str(ids // 2), "--per", "6",
             "--seed", "2", "--pairs", "1200"])
        run([python, "tools/pack_shards.py", "folder", os.path.join(workdir, "train"), shards, "--shard-size", "600",
             "--workers", "2"])
    return shards, pairs


def train_and_evaluate(variant: str, seed: int, epochs: int, shards: str, pairs: str, workdir: str) -> dict:
    center_dtype, rounding = VARIANTS[variant]
    output = os.path.join(workdir, f"{variant}-seed{seed}")
    start = time.perf_counter()
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
         "configs/synthetic_cpu.py", "--data", shards, "--output", output, "--overwrite", "true",
         "--val_pairs", pairs, "--num_epochs", str(epochs), "--seed", str(seed),
         "--center_dtype", center_dtype, "--head.rounding", rounding])
    seconds = time.perf_counter() - start
    result = json.loads(run([sys.executable, "tools/evaluate.py", output, "--pairs", pairs]).stdout)
    with open(os.path.join(output, "config.json")) as handle:
        embedding = json.load(handle)["backbone"]["embedding_size"]
    return {"variant": variant, "seed": seed, "accuracy": result["accuracy"], "std": result["accuracy_std"],
            "bytes_per_identity": 2 * BYTES[center_dtype] * embedding, "seconds": seconds}


def table(results: list[dict]) -> str:
    reference = {r["seed"]: r["accuracy"] for r in results if r["variant"] == "fp32"}
    lines = ["| centers (momentum alike) | rounding | seed | held-out accuracy ± fold std | Δ vs fp32 (points) "
             "| centers + momentum per identity | training wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        center_dtype, rounding = VARIANTS[r["variant"]]
        delta = f"{100 * (r['accuracy'] - reference[r['seed']]):+.1f}" if r["seed"] in reference else "–"
        lines.append(f"| {center_dtype} | {rounding if center_dtype != 'fp32' else '–'} | {r['seed']} "
                     f"| {r['accuracy']:.3f} ± {r['std']:.3f} | {delta} | {r['bytes_per_identity']} B "
                     f"| {r['seconds']:.0f} s |")
    return "\n".join(lines)


def _median_ms(fn, repeats: int = 7) -> float:
    import statistics

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cost(rows: int, dim: int, rate: float, chunk: int = 1024) -> str:
    """The rounding's price (see the module docstring) as a markdown table."""
    import torch

    sys.path.insert(0, ROOT)
    from pfc.head.optim import SparseRowSGD
    from pfc.head.rounding import round_into
    from pfc.head.scratch import ScratchBlocks

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(chunk, dim)
    scratch = ScratchBlocks()
    lines = [f"| operation ({chunk}×{dim} block; update: {int(rate * rows)} of {rows}×{dim} rows) | ms | × the first row |",
             "|---|---|---|"]
    base = None
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(chunk, dim, dtype=dtype)
        for rounding in ("nearest", "stochastic"):
            ms = _median_ms(lambda: round_into(out, block, rounding, generator, scratch))
            base = base or ms
            lines.append(f"| cast fp32 → {str(dtype)[6:]}, {rounding} | {ms:.2f} | {ms / base:.1f} |")
    index = torch.randperm(rows)[:int(rate * rows)].sort().values
    grad = torch.randn(index.numel(), dim) * 1e-3
    base = None
    for name, dtype, rounding in (("fp32", torch.float32, "nearest"), ("bf16, nearest", torch.bfloat16, "nearest"),
                                  ("bf16, stochastic", torch.bfloat16, "stochastic")):
        param = torch.nn.Parameter(torch.randn(rows, dim).to(dtype))
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4, rounding=rounding)
        ms = _median_ms(lambda: optimizer.update_rows(param, index, grad))
        base = base or ms
        lines.append(f"| update_rows, centers + momentum {name} | {ms:.1f} | {ms / base:.2f} |")
        del param, optimizer
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/center_dtype")
    parser.add_argument("--ids", type=int, default=200, help="training identities (the held-out set has half)")
    parser.add_argument("--per", type=int, default=24, help="images per training identity")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2048])
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "bf16-nearest"], choices=sorted(VARIANTS))
    parser.add_argument("--cost", action="store_true", help="time the rounding instead (one process)")
    parser.add_argument("--rows", type=int, default=50000, help="--cost: rows of the shard")
    parser.add_argument("--dim", type=int, default=512, help="--cost: embedding size")
    parser.add_argument("--rate", type=float, default=0.1, help="--cost: share of the rows updated")
    args = parser.parse_args(argv)
    if args.cost:
        import torch

        torch.set_num_threads(1)
        print(f"# rounding cost: 1 thread, torch {torch.__version__}")
        print(cost(args.rows, args.dim, args.rate))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    shards, pairs = make_data(args.workdir, args.ids, args.per)
    print(f"# center storage: {args.ids} identities × {args.per}, {args.epochs} epochs, 2 gloo ranks, "
          f"seeds {args.seeds}", flush=True)
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            results.append(train_and_evaluate(variant, seed, args.epochs, shards, pairs, args.workdir))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
