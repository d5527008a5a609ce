"""One command that checks pfc on a GPU machine and prints the numbers for docs/benchmarks.md.

    python bench/gpu_check.py [--out runs/gpu-check] [--device cuda|cpu] [--stages tests head train plan]

(``make gpu-check`` runs it in the project's venv.) Five stages, each a subprocess, within
about 8 minutes on one H100/H200:

1. tests: the CUDA test set, ``pytest -m cuda tests/test_cuda.py``;
2. head: ``bench/head.py`` on one GPU (world size 1, NCCL): 10M classes, ρ = 0.1, bf16
   centers, B = 1024 gathered rows (one node of 8 × 128), the update inside the backward;
3. kernels: ``bench/head_kernels.py``: the head's Triton softmax kernels against its torch path
   (with 2,048-row chunks and with GPU-sized ones) on one rank of the issue-19 job (S = 362,500
   of 3,625,000 classes, B = 1,024, D = 512, fp16 centers): step time, peak memory, launches;
4. train: synthetic identities made on the spot (``tools/make_synthetic.py`` in parallel
   processes, ``tools/pack_shards.py``), then a 200-step NCCL training of iresnet50 (torchrun,
   one process, batch 128, bf16 autocast) that reports samples/s (the trainer's own log
   windows, the first one left out as warm-up) and ``torch.cuda.max_memory_allocated``;
5. plan: ``tools/plan.py`` simulates the same job (class count, network, batch, ρ, center type,
   precision, one GPU) on fake tensors; its peak is compared with the training's
   ``max_memory_allocated`` (issue 13: within 10 %).

Writes ``OUT/gpu_check.json`` and prints a markdown summary. ``--device cpu`` is a dry run of
the same commands at toy sizes (CUDA tests run with the CPU standing in, the tiny network,
gloo), to check a change to this script on a machine without a GPU. Exit status 1 when a stage
failed (the others still run).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 480

# (GPU run, CPU dry run)
SIZES = {
    "head_classes": (10_000_000, 20_000), "head_batch": (1024, 64), "head_steps": (5, 1),
    "kernels_classes": (3_625_000, 2_000), "kernels_batch": (1024, 16), "kernels_dim": (512, 32),
    "kernels_steps": (5, 1),
    "ids_per_process": (250, 12), "per_id": (8, 4), "generators": (8, 1),
    "network": ("iresnet50", "tiny"), "steps": (200, 3), "batch": (128, 8), "workers": (8, 0), "log_every": (20, 1),
}


def _size(name: str, device: str):
    return SIZES[name][0 if device == "cuda" else 1]


def _run(command: list[str], log_path: str, env: dict | None = None, timeout: float = BUDGET_S) -> tuple[int, float, str]:
    """Run ``command`` from the repository root, its output into ``log_path``; (status, seconds, output)."""
    start = time.perf_counter()
    print(f"$ {' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
                                    stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = 124
    with open(log_path) as log:
        output = log.read()
    return status, time.perf_counter() - start, output


def stage_tests(args, python: str) -> dict:
    env = {"PFC_CUDA_TESTS_DEVICE": "cpu"} if args.device == "cpu" else {}
    status, seconds, output = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                                    "tests/test_cuda.py"], os.path.join(args.out, "tests.log"), env)
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts = {kind: int(number) for number, kind in
              re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)", summary[-1] if summary else "")}
    return {"status": status, "seconds": seconds, "summary": summary[-1].strip("= ") if summary else "", **counts}


def stage_head(args, python: str) -> dict:
    path = os.path.join(args.out, "head.json")
    command = [python, "bench/head.py", "--device", args.device, "--world", "1",
               "--classes", str(_size("head_classes", args.device)), "--rates", "0.1", "--center-dtype", "bf16",
               "--batch", str(_size("head_batch", args.device)), "--steps", str(_size("head_steps", args.device)),
               "--update", "backward", "--json", path]
    status, seconds, output = _run(command, os.path.join(args.out, "head.log"), {"OMP_NUM_THREADS": "1"})
    result = {"status": status, "seconds": seconds, "command": " ".join(command[1:])}
    if status == 0:
        with open(path) as f:
            result["rows"] = json.load(f)["rows"]
        result["table"] = [line for line in output.splitlines() if line.startswith("|")]
    return result


def stage_kernels(args, python: str) -> dict:
    path = os.path.join(args.out, "kernels.json")
    command = [python, "bench/head_kernels.py", "--device", args.device,
               "--classes", str(_size("kernels_classes", args.device)), "--rate", "0.1",
               "--batch", str(_size("kernels_batch", args.device)), "--dim", str(_size("kernels_dim", args.device)),
               "--center-dtype", "fp16", "--steps", str(_size("kernels_steps", args.device)), "--json", path]
    # the dry run: Triton's interpreter on CPU tensors
    env = {"OMP_NUM_THREADS": "1", **({"TRITON_INTERPRET": "1"} if args.device == "cpu" else {})}
    status, seconds, output = _run(command, os.path.join(args.out, "kernels.log"), env)
    result = {"status": status, "seconds": seconds, "command": " ".join(command[1:])}
    if status == 0:
        with open(path) as f:
            result["rows"] = json.load(f)["rows"]
        result["table"] = [line for line in output.splitlines() if line.startswith("|")]
    else:
        result["error"] = output[-2000:]
    return result


def _make_shards(args, python: str) -> tuple[int, str]:
    """Synthetic identities from parallel generators (disjoint seeds), merged into one tree, packed."""
    data = os.path.join(args.out, "data")
    shutil.rmtree(data, ignore_errors=True)
    generators = _size("generators", args.device)
    procs = [subprocess.Popen([python, "tools/make_synthetic.py", os.path.join(data, f"part{seed}"),
                               "--ids", str(_size("ids_per_process", args.device)),
                               "--per", str(_size("per_id", args.device)), "--seed", str(seed)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL)
             for seed in range(1, generators + 1)]
    if any(proc.wait() != 0 for proc in procs):
        return 1, data
    train = os.path.join(data, "train")
    os.makedirs(train)
    for seed in range(1, generators + 1):   # identity folders carry their seed: no name clashes
        part = os.path.join(data, f"part{seed}")
        for identity in os.listdir(part):
            os.rename(os.path.join(part, identity), os.path.join(train, identity if identity.startswith(f"s{seed}_")
                                                                 else f"s{seed}_{identity}"))
    status = subprocess.run([python, "tools/pack_shards.py", "folder", train, os.path.join(data, "shards"),
                             "--shard-size", "1000", "--workers", str(max(generators, 1)), "--no-progress"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL).returncode
    return status, data


def stage_train(args, python: str) -> dict:
    start = time.perf_counter()
    status, data = _make_shards(args, python)
    data_seconds = time.perf_counter() - start
    result = {"status": status, "data_seconds": data_seconds}
    if status != 0:
        return {**result, "seconds": data_seconds, "error": "making the synthetic shards failed"}
    run = os.path.join(args.out, "train")
    shutil.rmtree(run, ignore_errors=True)
    overrides = ["--data", os.path.join(data, "shards"), "--output", run,
                 "--network", _size("network", args.device), "--max_steps", str(_size("steps", args.device)),
                 "--batch_size", str(_size("batch", args.device)), "--num_workers", str(_size("workers", args.device)),
                 "--log_every", str(_size("log_every", args.device)), "--precision", args.precision,
                 "--warmup_steps", "0", "--eval_every", "0", "--save_every", "0", "--save_every_minutes", "0",
                 *args.train_args]
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "bench/gpu_check.py", "--worker", "--out", run, "--", *overrides]
    status, seconds, output = _run(command, os.path.join(args.out, "train.log"), {"OMP_NUM_THREADS": "4"})
    result.update(status=status, seconds=data_seconds + seconds, train_seconds=seconds,
                  command="torchrun --standalone --nproc_per_node=1 launch/train.py configs/ms1mv3_r50.py "
                          + " ".join(overrides))
    worker = os.path.join(run, "gpu_check_worker.json")
    if status == 0 and os.path.exists(worker):
        with open(worker) as f:
            result.update(json.load(f))
    elif status != 0:
        result["error"] = output[-2000:]
    return result


PLAN_TOLERANCE = 0.10


def stage_plan(args, python: str, train: dict | None) -> dict:
    """The capacity planner on the training stage's job; its peak against the measured one."""
    if not train or train.get("status") != 0 or "num_classes" not in train:
        return {"status": 1, "seconds": 0.0, "error": "needs the train stage's numbers (run it first)"}
    # the GPU kind from the device's name (its memory then is the kind's: only the peak is compared)
    name = train.get("gpu_name", "").lower()
    kind = next((kind for kind in ("h200", "h100", "a100", "v100") if kind in name), "h100")
    command = [python, "tools/plan.py", "--classes", str(train["num_classes"]), "--gpus", "1",
               "--gpu", kind, "--network", train["network"],
               "--batch-size", str(train["batch_size"]), "--sample-rate", str(train["sample_rate"]),
               "--center-dtype", train["center_dtype"], "--precision", train["precision"], "--json"]
    status, seconds, output = _run(command, os.path.join(args.out, "plan.log"))
    result = {"status": status, "seconds": seconds, "command": " ".join(command[1:])}
    if status != 0:
        return {**result, "error": output[-2000:]}
    plan = json.loads(output.strip().splitlines()[-1])
    result["simulated_peak"] = plan["peak_bytes"]
    measured = train.get("max_memory_allocated", 0)
    if measured:   # on a GPU: the simulation must be within 10 % of the allocator's peak
        result["measured_peak"] = measured
        result["ratio"] = plan["peak_bytes"] / measured
        result["status"] = 0 if abs(result["ratio"] - 1) <= PLAN_TOLERANCE else 1
    return result


def worker(out: str, overrides: list[str]) -> int:
    """Under torchrun: train the iresnet50 recipe with ``overrides``; rank 0 writes its numbers."""
    import torch

    from pfc.train.config import load_config
    from pfc.train.loop import train

    import torch.distributed as dist

    from pfc.data.manifest import read_manifest

    config = load_config(os.path.join(ROOT, "configs", "ms1mv3_r50.py"), overrides)
    start = time.perf_counter()
    try:
        result = train(config)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(config.output, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        steady = [record["samples_per_s"] for record in records[1:]] or [r["samples_per_s"] for r in records]
        on_gpu = torch.cuda.is_available()
        report = {"steps": result.steps, "final_loss": result.final_loss, "train_call_seconds": seconds,
                  "samples_per_s": statistics.median(steady),
                  "samples_per_s_windows": [round(r["samples_per_s"], 1) for r in records],
                  "max_memory_allocated": torch.cuda.max_memory_allocated() if on_gpu else 0,
                  "max_memory_reserved": torch.cuda.max_memory_reserved() if on_gpu else 0,
                  "batch_size": config.data.batch_size, "network": config.backbone.network,
                  "precision": config.backbone.precision, "num_classes": int(read_manifest(config.data.root)["num_classes"]),
                  "sample_rate": config.head.sample_rate, "center_dtype": config.head.center_dtype,
                  "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30) if on_gpu else 80,
                  "gpu_name": torch.cuda.get_device_name(0) if on_gpu else "",
                  "world_size": int(os.environ.get("WORLD_SIZE", "1")), "backend": "nccl" if on_gpu else "gloo"}
        with open(os.path.join(out, "gpu_check_worker.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


def environment(device: str) -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return facts


def summary(report: dict) -> str:
    """The markdown lines to paste into docs/benchmarks.md."""
    gib = 2 ** 30
    env = report["environment"]
    lines = [f"### gpu-check: {env.get('gpu', 'CPU dry run')}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"{report['total_seconds']:.0f} s in all (budget {BUDGET_S} s)", ""]
    tests = report["stages"].get("tests")
    if tests:
        lines.append(f"- CUDA tests: {tests['summary'] or 'no summary'} ({tests['seconds']:.0f} s)")
    head = report["stages"].get("head")
    if head:
        lines.append(f"- head (`python {head['command']}`, {head['seconds']:.0f} s):" if head["status"] == 0
                     else f"- head: FAILED (status {head['status']}, see head.log)")
        lines += ["", *head.get("table", []), ""]
    kernels = report["stages"].get("kernels")
    if kernels:
        lines.append(f"- head kernels (`python {kernels['command']}`, {kernels['seconds']:.0f} s):"
                     if kernels["status"] == 0 else f"- head kernels: FAILED (status {kernels['status']}, see kernels.log)")
        lines += ["", *kernels.get("table", []), ""]
    train = report["stages"].get("train")
    if train and train["status"] == 0 and "samples_per_s" in train:
        lines.append(f"- training ({train['network']}, batch {train['batch_size']}, {train['precision']}, "
                     f"{train['num_classes']:,} synthetic identities, {train['steps']} steps, {train['backend']}, "
                     f"{train['world_size']} process): **{train['samples_per_s']:,.0f} samples/s** "
                     f"(median of the log windows after the first), max_memory_allocated "
                     f"**{train['max_memory_allocated'] / gib:.2f} GiB** (reserved {train['max_memory_reserved'] / gib:.2f} "
                     f"GiB), final loss {train['final_loss']:.3f}; data {train['data_seconds']:.0f} s, "
                     f"training {train['train_seconds']:.0f} s")
        lines.append(f"  `{train['command']}`")
    elif train:
        lines.append(f"- training: FAILED (status {train['status']}, see train.log)")
    plan = report["stages"].get("plan")
    if plan and "ratio" in plan:
        lines.append(f"- capacity planner (`python {plan['command']}`): simulated peak "
                     f"{plan['simulated_peak'] / gib:.2f} GiB vs max_memory_allocated {plan['measured_peak'] / gib:.2f} GiB: "
                     f"**{plan['ratio']:.3f}** ({'within' if plan['status'] == 0 else 'OUTSIDE'} ±{PLAN_TOLERANCE:.0%})")
    elif plan and plan["status"] == 0:
        lines.append(f"- capacity planner: simulated peak {plan['simulated_peak'] / gib:.2f} GiB (no GPU peak to compare)")
    elif plan:
        lines.append(f"- capacity planner: FAILED (status {plan['status']}, see plan.log)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu-check"), help="logs, data and results")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run at toy sizes")
    parser.add_argument("--stages", nargs="+", choices=["tests", "head", "kernels", "train", "plan"],
                        default=["tests", "head", "kernels", "train", "plan"])
    parser.add_argument("--precision", default="bf16", help="the backbone's precision in the training stage")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # the training, under torchrun
    parser.add_argument("train_args", nargs="*", help="after --: extra trainer overrides (e.g. --head.center_dtype bf16)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.out, args.train_args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: torch {torch.__version__} sees no CUDA device. On a GPU machine install a CUDA build: "
              "make clean && make gpu-check TORCH_SPEC=torch (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    python = sys.executable
    report = {"environment": environment(args.device), "device": args.device, "stages": {}}
    start = time.perf_counter()
    for name in args.stages:
        if name == "plan":
            report["stages"][name] = stage_plan(args, python, report["stages"].get("train"))
        else:
            report["stages"][name] = {"tests": stage_tests, "head": stage_head, "kernels": stage_kernels,
                                      "train": stage_train}[name](args, python)
        print(f"{name}: status {report['stages'][name]['status']} in {report['stages'][name]['seconds']:.0f} s",
              flush=True)
    report["total_seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print()
    print(summary(report))
    print(f"\n(results: {os.path.join(args.out, 'gpu_check.json')}; logs beside it)")
    failed = [name for name, stage in report["stages"].items() if stage["status"] != 0]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
