"""Will my job fit? One rank of an N-GPU Partial-FC job, simulated on this CPU with pfc's own code.

    pfc-plan --classes 100M --gpus 8 --gpu h100 --network iresnet100 [--grad-checkpointing] \
        --batch-size 128 --sample-rate 0.1 --center-dtype bf16 --precision bf16 [--optimizer adamw] [--head-optimizer adamw]
        [--max-classes] [--json]

--gpu names the GPU kind (its memory and its speed); --gpu-memory alone picks the kind of that
size, or sets a smaller memory for the named kind (an A100-40GB: --gpu a100 --gpu-memory 40).

Prints memory by category at the peak, whether it fits, host syncs, device-placement findings and
a time estimate (see pfc/planning/roofline.py). With --json the last line is the same as one object.
"""
from __future__ import annotations

import argparse
import json
import sys

from pfc.cli.errors import one_line_errors
from pfc.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error of the tools
        raise ConfigError(message)


def parse_args(argv):
    from pfc.head.kernels import KERNEL_CHOICES
    from pfc.planning.job import CENTER_DTYPES
    from pfc.planning.roofline import GPUS
    from pfc.train.config import PRECISIONS

    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", required=True, help="class count: 100M, 1.5B, 2e8, 250000 (required)")
    parser.add_argument("--gpus", default="8", help="number of GPUs (ranks) (default: 8)")
    parser.add_argument("--gpu-memory", default=None,
                        help="GiB per GPU (default: the --gpu kind's: " +
                             ", ".join(f"{kind} {spec.memory_gb:g}" for kind, spec in GPUS.items()) + ")")
    parser.add_argument("--gpu", default=None,
                        help=f"GPU kind of the time estimate: {' | '.join(GPUS)} (default: the one kind with "
                             "--gpu-memory's size, h100 when it is 80 or not given)")
    parser.add_argument("--network", default="iresnet100", help="backbone (default: iresnet100)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="the backbone recomputes its activations in the backward (iresnet*, vit_*)")
    parser.add_argument("--batch-size", default="128", help="per GPU (default: 128)")
    parser.add_argument("--sample-rate", default="0.1", help="ρ, in (0, 1] (default: 0.1)")
    parser.add_argument("--center-dtype", default="fp32", help=f"{' | '.join(CENTER_DTYPES)} (default: fp32)")
    parser.add_argument("--head-optimizer", default="sgd",
                        help="the centers' optimizer: sgd (one momentum per center) | adamw (two moments and a step "
                             "count per center) (default: sgd)")
    parser.add_argument("--optimizer", default="sgd",
                        help="the backbone's optimizer (optim.name): sgd (one momentum per parameter) | adamw (two "
                             "moments per parameter, as the ViT recipes) (default: sgd)")
    parser.add_argument("--precision", default="bf16",
                        help=f"backbone autocast: {' | '.join(PRECISIONS)} (fp16 with a GradScaler) (default: bf16)")
    parser.add_argument("--kernels", default="triton",
                        help=f"the head's kernels: {' | '.join(KERNEL_CHOICES)} (default: triton, what a CUDA run "
                             "with triton installed uses)")
    parser.add_argument("--chunk-rows", default="0",
                        help="sampled centers per chunk of the head's softmax; 0: automatic, what a GPU run picks "
                             "(a 1 GiB scratch budget, pfc/head/chunking.py) (default: 0)")
    parser.add_argument("--logits", default="auto",
                        help="the head's logits: keep (the [S, B] block held for the backward: faster, more memory) | "
                             "recompute (one GEMM more) | auto (recompute when the block would exceed 10 %% of the "
                             "centers' storage) (default: auto)")
    parser.add_argument("--engine", default="ddp", help="ddp (deepspeed is not simulated) (default: ddp)")
    parser.add_argument("--zero", default=None, help="DeepSpeed ZeRO stage (needs --engine deepspeed)")
    parser.add_argument("--max-classes", action="store_true", help="also find the largest class count that fits")
    parser.add_argument("--compare-classes", default=None, help="also predict the throughput at this class count")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    return parser.parse_args(argv)


def _number(text: str, flag: str, kind=float, minimum=None):
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{flag} must be ≥ {minimum}, got {text}")
    return value


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from pfc.planning.job import Job, parse_count, train_config
    from pfc.planning.plan import Planner, largest_fitting
    from pfc.planning.report import choose_gpu, format_report, summary
    from pfc.train.config import PRECISIONS

    memory = None if args.gpu_memory is None else _number(args.gpu_memory, "--gpu-memory", float, 1)
    gpu, gpu_memory, gpu_choice = choose_gpu(args.gpu, memory)
    if args.zero is not None and args.engine != "deepspeed":
        raise ConfigError("--zero needs --engine deepspeed")
    if args.precision not in PRECISIONS:
        raise ConfigError(f"--precision {args.precision!r} is not one of {', '.join(PRECISIONS)}")
    job = Job(num_classes=parse_count(args.classes, "--classes"), gpus=_number(args.gpus, "--gpus", int, 1),
              network=args.network, batch_size=_number(args.batch_size, "--batch-size", int, 1),
              sample_rate=_number(args.sample_rate, "--sample-rate"), precision=args.precision,
              center_dtype=args.center_dtype, head_optimizer=args.head_optimizer, optimizer=args.optimizer, engine=args.engine, kernels=args.kernels,
              chunk_rows=_number(args.chunk_rows, "--chunk-rows", int, 0), logits=args.logits,
              grad_checkpointing=args.grad_checkpointing)
    baseline_classes = parse_count(args.compare_classes, "--compare-classes") if args.compare_classes else None
    train_config(job)  # every check before the first simulation
    runs = 3 + (2 if baseline_classes else 0) + (4 if args.max_classes else 0)
    with tqdm(total=3 * runs, desc="simulating", unit="phase", file=sys.stderr, leave=False) as bar:
        planner = Planner(job, progress=bar.update)
        plan = planner.plan(job.num_classes)
        max_classes = largest_fitting(planner, gpu_memory) if args.max_classes else None
        baseline = planner.plan(baseline_classes) if baseline_classes else None
        bar.update(bar.total - bar.n)
    result = summary(plan, gpu_memory, gpu, max_classes, baseline, gpu_choice)
    print(format_report(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
