"""Fine-tuning vs training from scratch on a small set: held-out verification on synthetic identities.

    python bench/finetune.py [--seeds 1 2] [--steps 160] [--pretrain-steps 400] [--work runs/finetune]
                             [--json runs/finetune/finetune.json]

Three disjoint sets of synthetic identities (tools/make_synthetic.py, 56x56 pixels; different
seeds give different identities): a large one to pretrain on (400 identities × 16 images), a
small custom set (1,000 identities × 3 images) and held-out identities with a pairs list. The
tiny CPU network is pretrained once on the large set (``configs/margins_cpu.py``, the margin
table's recipe, ArcFace m = 0.3), then each row trains on the small set for the same number of
steps with 2 gloo ranks (``torchrun --nproc_per_node=2 launch/train.py``):

- from scratch: ``configs/margins_cpu.py`` (SGD lr 0.1, the recipe the network was tuned with);
- from scratch with the fine-tune recipe: ``configs/finetune_small.py`` without ``--init_backbone``
  (and no frozen steps): the same schedule as the fine-tuned rows, random weights;
- fine-tuned: ``configs/finetune_small.py`` with ``--init_backbone`` the pretrained run, its
  frozen steps scaled to the run (a quarter of the steps) — and the same without frozen steps;
  both again at the from-scratch learning rate 0.1 instead of the recipe's 0.01.

The recipe's iresnet50, ArcFace (0.5, s 64) and fp16 are replaced by the CPU net's settings (tiny,
128-d, ArcFace m 0.3, s 32, fp32; ``CPU_NET``) and its warmup by a sixteenth of the run.

Every row is verified on the held-out pairs (the trainer's final verification: insightface's
protocol, 10 folds); the pretrained backbone before fine-tuning and the untrained network are
evaluated with tools/evaluate.py. Runs whose folder holds their results from the same command
are reused (``--fresh`` retrains). Prints a markdown table and writes the JSON file.
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
SCRATCH, FINETUNE = "configs/margins_cpu.py", "configs/finetune_small.py"
# the fine-tune recipe is for iresnet50 at 112 px on a GPU: here the tiny net and CPU-sized batches
CPU_NET = ["--network", "tiny", "--embedding_size", "128", "--batch_size", "64", "--num_workers", "1",
           "--precision", "fp32", "--head.margin.s", "32", "--head.margin.m2", "0.3"]


def run(command: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n"
                         f"{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return result.stdout


def make_data(args) -> dict:
    """The three sets, packed once per set of sizes (a stamp records them)."""
    data = os.path.join(args.work, "data")
    sizes = dict(pretrain=[args.pretrain_ids, args.pretrain_per], small=[args.small_ids, args.small_per],
                 heldout=[args.heldout_ids, args.heldout_per, args.pairs], image_size=args.image_size)
    stamp = os.path.join(data, "sizes.json")
    paths = {name: os.path.join(data, f"{name}_shards") for name in ("pretrain", "small")}
    paths["pairs"] = os.path.join(data, "heldout", "pairs.txt")
    if os.path.exists(stamp) and json.load(open(stamp)) == sizes:
        return paths
    shutil.rmtree(data, ignore_errors=True)
    python, size = sys.executable, str(args.image_size)
    for name, (ids, per), seed in (("pretrain", sizes["pretrain"], 1), ("small", sizes["small"], 3)):
        run([python, "tools/make_synthetic.py", os.path.join(data, name), "--ids", str(ids), "--per", str(per),
             "--seed", str(seed), "--image-size", size])
        run([python, "tools/pack_shards.py", "folder", os.path.join(data, name), paths[name],
             "--shard-size", "1000", "--workers", "2", "--image-size", size, "--no-progress"])
    run([python, "tools/make_synthetic.py", os.path.join(data, "heldout"), "--ids", str(args.heldout_ids),
         "--per", str(args.heldout_per), "--seed", "2", "--pairs", str(args.pairs), "--image-size", size])
    with open(stamp, "w") as file:
        json.dump(sizes, file)
    return paths


def train(output: str, config: str, extra: list[str], paths: dict, args, data: str) -> dict:
    """One run on ``data`` (or its finished results): the final held-out verification and wall time."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               "launch/train.py", config, "--data", data, "--val_pairs", paths["pairs"], "--output", output,
               "--overwrite", "true", "--save_every_minutes", "0", "--log_every", "20"] + extra
    stamp, results = os.path.join(output, "bench_command.json"), os.path.join(output, "eval_results.json")
    if not args.fresh and os.path.exists(results) and os.path.exists(stamp) and json.load(open(stamp)) == command:
        return json.load(open(os.path.join(output, "bench_record.json")))
    started = time.perf_counter()
    run(command)
    final = json.load(open(results))["final"][0]
    record = dict(accuracy=final["accuracy"], accuracy_std=final["accuracy_std"], auc=final["auc"],
                  tar_far_1e3=final["tar@far=1e-3"], wall_s=round(time.perf_counter() - started, 1))
    with open(os.path.join(output, "bench_record.json"), "w") as file:
        json.dump(record, file)
    with open(stamp, "w") as file:
        json.dump(command, file)
    return record


def evaluate(target: str, paths: dict, *extra: str) -> dict:
    summary = json.loads(run([sys.executable, "tools/evaluate.py", target, "--pairs", paths["pairs"], *extra]))
    return dict(accuracy=summary["accuracy"], accuracy_std=summary["accuracy_std"], auc=summary["auc"],
                tar_far_1e3=summary["tar@far=1e-3"])


def rows(args, pretrained: str) -> list[dict]:
    steps = ["--max_steps", str(args.steps), "--warmup_steps", str(args.steps // 16)]
    arcface = ["--head.margin.m2", "0.3"]
    frozen = str(args.steps // 4)
    init = ["--init_backbone", pretrained]
    return [
        dict(key="scratch", label=f"from scratch, {SCRATCH} (SGD lr 0.1)", config=SCRATCH, args=steps + arcface),
        dict(key="scratch_recipe", label=f"from scratch, {FINETUNE} without init", config=FINETUNE,
             args=CPU_NET + steps + ["--freeze_backbone_steps", "0"]),
        dict(key="finetune", label=f"fine-tuned, {FINETUNE}, {frozen} frozen steps", config=FINETUNE,
             args=CPU_NET + steps + init + ["--freeze_backbone_steps", frozen]),
        dict(key="finetune_unfrozen", label=f"fine-tuned, {FINETUNE}, no frozen steps", config=FINETUNE,
             args=CPU_NET + steps + init + ["--freeze_backbone_steps", "0"]),
        dict(key="finetune_lr01", label=f"fine-tuned at the from-scratch lr 0.1, {frozen} frozen steps",
             config=FINETUNE, args=CPU_NET + steps + init + ["--freeze_backbone_steps", frozen, "--lr", "0.1"]),
        dict(key="finetune_lr01_unfrozen", label="fine-tuned at the from-scratch lr 0.1, no frozen steps",
             config=FINETUNE, args=CPU_NET + steps + init + ["--freeze_backbone_steps", "0", "--lr", "0.1"]),
    ]


def summary(runs: list[dict]) -> dict:
    accuracy = [r["accuracy"] for r in runs]
    return dict(accuracy=statistics.fmean(accuracy), fold_std=statistics.fmean(r["accuracy_std"] for r in runs),
                auc=statistics.fmean(r["auc"] for r in runs), accuracies=accuracy,
                wall_s=statistics.fmean(r.get("wall_s", 0.0) for r in runs))


def table(report: dict) -> str:
    lines = ["| backbone on the held-out identities | accuracy (mean of seeds) ± fold std | per seed | AUC | "
             "wall s per run |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        s = row["summary"]
        per_seed = " / ".join(f"{a:.3f}" for a in s["accuracies"])
        wall = f"{s['wall_s']:.0f}" if s["wall_s"] else ""
        lines.append(f"| {row['label']} | {s['accuracy']:.4f} ± {s['fold_std']:.4f} | {per_seed} | {s['auc']:.4f} "
                     f"| {wall} |")
    return "\n".join(lines)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/finetune", help="folder for the data and the runs")
    parser.add_argument("--json", default="", help="results file (default: WORK/finetune.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps on the small set")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pretrain-ids", type=int, default=400)
    parser.add_argument("--pretrain-per", type=int, default=16)
    parser.add_argument("--small-ids", type=int, default=1000)
    parser.add_argument("--small-per", type=int, default=3)
    parser.add_argument("--heldout-ids", type=int, default=200)
    parser.add_argument("--heldout-per", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=3000, help="held-out verification pairs")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--rows", nargs="+", default=None, help="row keys (default: all)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs whose results exist")
    args = parser.parse_args(argv)
    args.work = os.path.abspath(args.work)
    args.json = args.json or os.path.join(args.work, "finetune.json")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    paths = make_data(args)
    pretrained = os.path.join(args.work, "runs", "pretrained")
    train(pretrained, SCRATCH, ["--max_steps", str(args.pretrain_steps), "--head.margin.m2", "0.3"], paths, args,
          paths["pretrain"])
    report = dict(command=" ".join(["python bench/finetune.py", *(sys.argv[1:] if argv is None else argv)]),
                  settings=vars(args), rows=[])
    chosen = [row for row in rows(args, pretrained) if args.rows is None or row["key"] in args.rows]
    for row in chosen:
        runs = []
        for seed in args.seeds:
            output = os.path.join(args.work, "runs", f"{row['key']}-seed{seed}")
            runs.append(dict(train(output, row["config"], row["args"] + ["--seed", str(seed)], paths, args,
                                   paths["small"]), seed=seed))
            print(f"  {row['key']} seed {seed}: accuracy {runs[-1]['accuracy']:.4f}", flush=True)
        report["rows"].append(dict(key=row["key"], label=row["label"], args=row["args"], runs=runs,
                                   summary=summary(runs)))
    before = evaluate(pretrained, paths)
    report["rows"].append(dict(key="pretrained", label=f"pretrained only ({args.pretrain_steps} steps on the large "
                                                      f"set), not fine-tuned", runs=[before], summary=summary([before])))
    untrained = [evaluate(pretrained, paths, "--untrained", "--seed", str(seed)) for seed in args.seeds]
    report["rows"].append(dict(key="untrained", label="untrained network (floor)", runs=untrained,
                               summary=summary(untrained)))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as file:
        json.dump(report, file, indent=1)
    print(table(report))
    print(f"\n{report['command']}: {report['wall_s']:.0f} s; results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
