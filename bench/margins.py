"""The margin table: held-out verification of every margin loss trained the same way, three seeds each.

    python bench/margins.py [--seeds 1 2 3] [--steps 200] [--rows softmax arcface_0.3 ...]
                            [--work runs/margins] [--json runs/margins/margins.json]

Makes synthetic identities once (tools/make_synthetic.py: a training set and a disjoint held-out
set with a pairs list, 56x56 pixels) and packs them (tools/pack_shards.py), then trains each row
with ``torchrun --nproc_per_node=2 launch/train.py configs/margins_cpu.py`` (gloo, 2 CPU ranks):
the same data, steps, learning rate, scale s = 32 and seeds for every row; only the margin or the
regulariser differs. The trainer's final verification (insightface protocol, 10 folds) gives the
accuracy, its fold std, the AUC and TAR @ FAR=1e-3 of each run; the untrained network (the same
architecture, each seed's initialisation, ``tools/evaluate.py --untrained``) is the floor.

Rows (``--rows``; default all): NormFace (no margin), CosFace, ArcFace at m = 0.3 and 0.5, the
combined margin (1, 0.3, 0.2), SphereFace (m = 4) with its λ schedule, ArcFace + MHE at the
SphereFace+ weight, ArcFace on P×K batches without and with the angular triplet (semi-hard at
weight 1 as in ATL; every pair at weight 0.1). SphereFace's and the triplet's λ schedules are
the papers' (base 1000, power 1) with γ scaled to the run: SphereFace reaches λ_min at 1658 of
its 28k iterations (6 %), so γ = 0.12 · 28000 / steps keeps that share. The P×K rows need the
sampler (``data.sampler``); without it in the trainer's options they are reported as skipped
("needs --sampler pk").

A run whose folder already holds its results from the same command is not trained again, so an
interrupted table continues where it stopped (``--fresh`` retrains). Prints a markdown table and
writes everything (per seed and summarised) to the JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/margins_cpu.py"
PAPER_ITERATIONS = 28000          # SphereFace's CASIA-WebFace schedule (its λ annealing, γ = 0.12)
PAPER_GAMMA = 0.12


def rows(steps: int) -> list[dict]:
    """Every row: key, label as printed, trainer overrides, config fields it needs, and a note."""
    gamma = PAPER_GAMMA * PAPER_ITERATIONS / steps
    arcface = ["--head.margin.m2", "0.3"]
    return [
        dict(key="softmax", label="NormFace (softmax, no margin)", args=["--head.margin.m2", "0"]),
        dict(key="cosface", label="CosFace m3 = 0.35", args=["--head.margin.m2", "0", "--head.margin.m3", "0.35"],
             note="AM-Softmax's m (s = 30, m = 0.35 in its paper)"),
        dict(key="arcface_0.3", label="ArcFace m2 = 0.3", args=arcface),
        dict(key="arcface_0.5", label="ArcFace m2 = 0.5", args=["--head.margin.m2", "0.5"],
             note="insightface's default"),
        dict(key="combined", label="combined (1, 0.3, 0.2)",
             args=["--head.margin.m2", "0.3", "--head.margin.m3", "0.2"],
             note="insightface's combined margin"),
        dict(key="sphereface", label="SphereFace m = 4, λ annealed",
             args=["--head.margin.kind", "sphereface", "--head.margin.m1", "4", "--head.margin.gamma", f"{gamma:.4g}"],
             note=f"λ = max(1000·(1 + {gamma:.3g}·step)^-1, 5)"),
        dict(key="arcface_mhe", label="ArcFace 0.3 + MHE λ = 1", args=arcface + ["--head.mhe.weight", "1"],
             note="euclidean d^-2 kernel; SphereFace+'s range for batch 128 is 0.1-2"),
        dict(key="arcface_pk", label="ArcFace 0.3, P×K batches (K = 4), no triplet",
             args=arcface + ["--data.sampler", "pk", "--data.pk_k", "4"], needs=["data.sampler", "data.pk_k"],
             note="the triplet row's control: its batches without its term"),
        dict(key="arcface_triplet", label="ArcFace 0.3 + angular triplet, P×K (K = 4)",
             args=arcface + ["--data.sampler", "pk", "--data.pk_k", "4", "--head.triplet.weight", "1",
                             "--head.triplet.m", "2", "--head.triplet.lambda_min", "3",
                             "--head.triplet.gamma", f"{gamma:.4g}"],
             needs=["data.sampler", "data.pk_k"], note="ATL: m = 2, λ_min = 3 for small sets"),
        dict(key="arcface_triplet_all", label="ArcFace 0.3 + triplet 0.1, every pair, P×K (K = 4)",
             args=arcface + ["--data.sampler", "pk", "--data.pk_k", "4", "--head.triplet.weight", "0.1",
                             "--head.triplet.semihard", "false", "--head.triplet.m", "2",
                             "--head.triplet.lambda_min", "3", "--head.triplet.gamma", f"{gamma:.4g}"],
             needs=["data.sampler", "data.pk_k"], note="no semi-hard selection, weight 0.1"),
    ]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, **kwargs)


def checked(command: list[str]) -> str:
    result = run(command)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n"
                         f"{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return result.stdout


def make_data(args) -> dict:
    """The training shards and the held-out pairs, made once per set of sizes (a stamp records them)."""
    data = os.path.join(args.work, "data")
    sizes = dict(ids=args.ids, per=args.per, heldout_ids=args.heldout_ids, heldout_per=args.heldout_per,
                 pairs=args.pairs, image_size=args.image_size)
    stamp = os.path.join(data, "sizes.json")
    paths = dict(shards=os.path.join(data, "shards"), pairs=os.path.join(data, "heldout", "pairs.txt"))
    if os.path.exists(stamp) and json.load(open(stamp)) == sizes:
        return paths
    shutil.rmtree(data, ignore_errors=True)
    python, size = sys.executable, str(args.image_size)
    checked([python, "tools/make_synthetic.py", os.path.join(data, "train"), "--ids", str(args.ids),
             "--per", str(args.per), "--seed", "1", "--image-size", size])
    checked([python, "tools/make_synthetic.py", os.path.join(data, "heldout"), "--ids", str(args.heldout_ids),
             "--per", str(args.heldout_per), "--seed", "2", "--pairs", str(args.pairs), "--image-size", size])
    checked([python, "tools/pack_shards.py", "folder", os.path.join(data, "train"), paths["shards"],
             "--shard-size", "2000", "--workers", "2", "--image-size", size, "--no-progress"])
    with open(stamp, "w") as file:
        json.dump(sizes, file)
    return paths


def trainer_fields() -> str:
    """The trainer's --help for the recipe: which config fields this checkout has."""
    return checked([sys.executable, "launch/train.py", CONFIG, "--help"])


def train_one(row: dict, seed: int, paths: dict, args) -> dict:
    """Train one (row, seed) (or reuse its finished run) and return its final verification."""
    output = os.path.join(args.work, "runs", f"{row['key']}-seed{seed}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               "launch/train.py", CONFIG, "--data", paths["shards"], "--val_pairs", paths["pairs"],
               "--output", output, "--overwrite", "true", "--seed", str(seed),
               "--save_every_minutes", "0",   # short runs: no periodic or final checkpoint
               "--max_steps", str(args.steps)] + row["args"]
    stamp, results = os.path.join(output, "bench_command.json"), os.path.join(output, "eval_results.json")
    if not args.fresh and os.path.exists(results) and os.path.exists(stamp) and json.load(open(stamp)) == command:
        record = json.load(open(os.path.join(output, "bench_record.json")))
        print(f"  {row['key']} seed {seed}: reused {output}", flush=True)
        return record
    started = time.perf_counter()
    result = run(command)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"training failed: {' '.join(command)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    final = json.load(open(results))["final"][0]
    record = dict(seed=seed, accuracy=final["accuracy"], accuracy_std=final["accuracy_std"], auc=final["auc"],
                  tar_far_1e3=final["tar@far=1e-3"], wall_s=round(wall, 1), output=output)
    record.update(triplet_usage(os.path.join(output, "metrics.jsonl")))
    with open(os.path.join(output, "bench_record.json"), "w") as file:
        json.dump(record, file)
    with open(stamp, "w") as file:
        json.dump(command, file)
    print(f"  {row['key']} seed {seed}: accuracy {record['accuracy']:.4f} ± {record['accuracy_std']:.4f} "
          f"auc {record['auc']:.4f} in {wall:.0f} s", flush=True)
    return record


def triplet_usage(metrics_path: str) -> dict:
    """Mean triplet pairs per logged step and rows with a positive, when the trainer logs them."""
    pairs, rows_with_positive = [], []
    with open(metrics_path) as file:
        for line in file:
            record = json.loads(line)
            if "triplet_pairs" in record:
                pairs.append(float(record["triplet_pairs"]))
            if "triplet_rows_with_positive" in record:
                rows_with_positive.append(float(record["triplet_rows_with_positive"]))
    usage = {}
    if pairs:
        usage.update(triplet_pairs_mean=statistics.fmean(pairs), triplet_pairs_min=min(pairs))
    if rows_with_positive:
        usage["triplet_rows_with_positive_mean"] = statistics.fmean(rows_with_positive)
    return usage


def untrained(seed: int, any_output: str, paths: dict) -> dict:
    """The same network with seed ``seed``'s initial weights, verified on the same pairs."""
    summary = json.loads(checked([sys.executable, "tools/evaluate.py", any_output, "--pairs", paths["pairs"],
                                  "--untrained", "--seed", str(seed)]))
    return dict(seed=seed, accuracy=summary["accuracy"], accuracy_std=summary["accuracy_std"], auc=summary["auc"],
                tar_far_1e3=summary["tar@far=1e-3"])


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of accuracy, fold std, AUC and TAR; the seeds' spread (sample std) of each."""
    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0
    accuracy = [r["accuracy"] for r in runs]
    auc = [r["auc"] for r in runs]
    tar = [r["tar_far_1e3"] for r in runs if r["tar_far_1e3"] is not None]
    return dict(accuracy=statistics.fmean(accuracy), accuracy_seed_std=spread(accuracy),
                fold_std=statistics.fmean(r["accuracy_std"] for r in runs), auc=statistics.fmean(auc),
                auc_seed_std=spread(auc), tar_far_1e3=statistics.fmean(tar) if tar else None,
                seeds=[r["seed"] for r in runs], accuracies=accuracy)


def table(report: dict) -> str:
    """The markdown table: one line per row, the untrained network last."""
    lines = ["| loss | accuracy (mean of seeds) ± fold std | seeds' std | per seed | AUC ± seeds' std "
             "| TAR @ FAR=1e-3 | Δ acc vs NormFace |", "|---|---|---|---|---|---|---|"]
    baseline = next((r["summary"]["accuracy"] for r in report["rows"]
                     if r["key"] == "softmax" and "summary" in r), None)
    entries = report["rows"] + [dict(key="untrained", label="untrained network (floor)", summary=report["untrained"])]
    for row in entries:
        if "summary" not in row:
            lines.append(f"| {row['label']} | {row['skipped']} | | | | | |")
            continue
        s = row["summary"]
        tar = "n/a" if s["tar_far_1e3"] is None else f"{s['tar_far_1e3']:.3f}"
        delta = "" if baseline is None or row["key"] in ("softmax", "untrained") else f"{s['accuracy'] - baseline:+.4f}"
        per_seed = " / ".join(f"{a:.3f}" for a in s["accuracies"])
        lines.append(f"| {row['label']} | {s['accuracy']:.4f} ± {s['fold_std']:.4f} | {s['accuracy_seed_std']:.4f} "
                     f"| {per_seed} | {s['auc']:.4f} ± {s['auc_seed_std']:.4f} | {tar} | {delta} |")
    return "\n".join(lines)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/margins", help="folder for the data and the runs")
    parser.add_argument("--json", default="", help="results file (default: WORK/margins.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps per run")
    parser.add_argument("--rows", nargs="+", default=None, help="row keys (default: all)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ids", type=int, default=400, help="training identities")
    parser.add_argument("--per", type=int, default=16, help="training images per identity")
    parser.add_argument("--heldout-ids", type=int, default=200)
    parser.add_argument("--heldout-per", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=3000, help="held-out verification pairs")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--fresh", action="store_true", help="retrain runs whose results exist")
    args = parser.parse_args(argv)
    args.work = os.path.abspath(args.work)
    args.json = args.json or os.path.join(args.work, "margins.json")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    all_rows = rows(args.steps)
    known = {row["key"] for row in all_rows}
    chosen = args.rows or [row["key"] for row in all_rows]
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {sorted(known)}")
    started = time.perf_counter()
    paths = make_data(args)
    fields = trainer_fields()
    report = dict(command="python bench/margins.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  settings=dict(vars(args), config=CONFIG), rows=[])
    selected = [r for r in all_rows if r["key"] in chosen]
    for row in selected:
        entry = dict(key=row["key"], label=row["label"], args=row["args"], note=row.get("note", ""))
        missing = [field for field in row.get("needs", []) if f"--{field} " not in fields]
        if missing:
            entry["skipped"] = "needs --sampler pk (not in this checkout)" if "data.sampler" in missing \
                else f"needs {', '.join(missing)}"
            print(f"  {row['key']}: skipped, {entry['skipped']}", flush=True)
        else:
            entry["runs"] = []
        report["rows"].append(entry)
    for seed in args.seeds:            # seed-major: a table cut short still has every row
        for row, entry in zip(selected, report["rows"]):
            if "runs" in entry:
                entry["runs"].append(train_one(row, seed, paths, args))
    for entry in report["rows"]:
        if "runs" in entry:
            entry["summary"] = summarise(entry["runs"])
    first = next(r for r in report["rows"] if "runs" in r)["runs"][0]["output"]
    untrained_runs = [untrained(seed, first, paths) for seed in args.seeds]
    report["untrained"] = dict(summarise(untrained_runs), runs=untrained_runs)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as file:
        json.dump(report, file, indent=1)
    print(table(report))
    print(f"\n{report['command']}: {report['wall_s']:.0f} s; results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
