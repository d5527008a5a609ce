"""The capacity planner (tools/plan.py, pfc/planning): its simulation against real runs and itself."""
from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from pfc.errors import ConfigError
from pfc.planning.job import Job, parse_count
from tests.distributed import run_ranks

# two gloo ranks, a tiny backbone, 4000 classes: the sampled rows (200 per rank) outnumber the
# gathered batch (16), so the sample size does not depend on the labels' values; the CPU's chunk
# rows on both sides (the simulated GPU would pick budget-sized chunks)
SMALL = Job(num_classes=4000, gpus=2, network="tiny", batch_size=8, sample_rate=0.1, precision="fp32", kernels="torch",
            chunk_rows=2048)
# budget-sized chunks small enough to simulate several of them quickly: 2,048 gathered columns and
# fp16 centers give 35,840 rows per chunk, ρ = 0.5 makes C0 = 286,720 classes
BUDGET_CHUNKS = Job(num_classes=1, gpus=2, network="tiny", batch_size=1024, sample_rate=0.5, precision="bf16",
                    center_dtype="fp16")


def _real_rank(rank, world_size):
    from pfc.planning.simulate import run_tracked
    from pfc.planning.tracker import MemoryTracker
    from pfc.train.runtime import Runtime

    generator = torch.Generator().manual_seed(rank)
    images = torch.rand(SMALL.batch_size, 3, 112, 112, generator=generator) * 2 - 1
    labels = torch.randint(0, SMALL.num_classes, (SMALL.batch_size,), generator=generator)
    tracker = MemoryTracker()
    with tracker:
        result = run_tracked(SMALL, Runtime(rank, world_size, 0, torch.device("cpu")), tracker, steps=2,
                             batch=(images, labels))
    return result.phase_peaks, result.host_syncs


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process: the simulated GPU must exist before the process's
    first backward pass (see pfc.planning.sim_device.sim_device), and earlier tests ran some."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _simulate(job):
    from pfc.planning.simulate import simulate

    return simulate(job)


def test_simulated_rank_matches_a_real_two_rank_cpu_run_per_phase_and_category():
    real_peaks, real_syncs = run_ranks(_real_rank, 2, timeout=300)[0]
    simulated = _in_fresh_process(_simulate, SMALL)
    assert set(simulated.phase_peaks) == set(real_peaks)
    # setup differs by design: the head makes its centers by its device path on the simulated
    # GPU (blocks joined by one cat) and by its CPU path in the real run
    # a category within 5 %, or within 0.2 % of the step's peak: the head phase has two high-water
    # moments within a few KB of each other (in the softmax's backward, and in the feature
    # gradient's tail after it), and gloo drops its references to collective buffers from its own
    # thread, so which one is the real run's peak varies between runs (~30 % of runs, also before
    # session 6): its "logits and head scratch" is then 92 KB larger ([8, 512] blocks of the
    # normalisation's backward instead of [200, 16] softmax scratch), 0.11 % of the 80 MB peak
    floor = 0.002 * max(sum(c.values()) for p, c in real_peaks.items() if p != "setup")
    for phase, categories in ((p, c) for p, c in simulated.phase_peaks.items() if p != "setup"):
        for category, simulated_bytes in categories.items():
            real_bytes = real_peaks[phase][category]
            assert simulated_bytes == pytest.approx(real_bytes, rel=0.05, abs=floor), (phase, category)
    step_peak = {name: max(sum(c.values()) for p, c in peaks.items() if p != "setup")
                 for name, peaks in (("simulated", simulated.phase_peaks), ("real", real_peaks))}
    assert step_peak["simulated"] == pytest.approx(step_peak["real"], rel=0.05)
    assert simulated.host_syncs == real_syncs   # the same reads, at the same source lines


def _extrapolated_and_direct():
    from pfc.planning.plan import Planner
    from pfc.planning.simulate import simulate

    planner = Planner(BUDGET_CHUNKS)
    target = 3 * planner.base + planner.base // 3   # beyond 2·C0: extrapolated, 6⅔ chunks' rows per rank
    return planner.plan(target), simulate(planner.job.with_classes(target)), planner.chunk_rows, planner.base


def test_extrapolated_plan_with_budget_sized_chunks_matches_a_direct_simulation():
    plan, direct, chunk_rows, base = _in_fresh_process(_extrapolated_and_direct)
    assert chunk_rows == 35_840 and base == 2 * 2 * 35_840 * 2   # two full chunks per rank at C0
    assert plan.peak_bytes == pytest.approx(direct.peak_bytes, rel=0.01)
    for category, value in direct.categories.items():
        assert plan.categories[category] == pytest.approx(value, rel=0.01, abs=65536), category
    assert plan.host_syncs_per_step == pytest.approx(
        sum(direct.host_syncs.values()) + sum(n for site, n in direct.step_findings.items()
                                               if site.startswith("data-dependent")), rel=0.01)
    # launches are a step in the chunk count: 7 chunks here (6⅔ chunks' rows), exact, not 6⅔ chunks' worth
    assert plan.launches == direct.launches


def _plan_tool_and_bisection():
    import contextlib
    import io

    from pfc.planning.plan import Planner, fits, largest_fitting, memory_anchors
    from tools.plan import main

    job_args = ["--gpus", "2", "--network", "tiny", "--batch-size", "1024", "--sample-rate", "0.5",
                "--center-dtype", "fp16", "--gpu", "h100", "--max-classes", "--json"]
    planner = Planner(BUDGET_CHUNKS)
    results = {}
    for gpu_memory, classes in ((8, "2M"), (3, "140k")):   # 2·C0 fits 8 GiB; on 3 GiB not even one full chunk
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            code = main(["--classes", classes, "--gpu-memory", str(gpu_memory), *job_args])
        result = json.loads(output.getvalue().strip().splitlines()[-1])
        largest = result["max_classes"]
        results[gpu_memory] = (code, result, fits(planner.plan(largest), gpu_memory),
                               fits(planner.plan(int(largest * 1.01)), gpu_memory), largest_fitting(planner, gpu_memory))
    one_gpu = io.StringIO()   # the job make gpu-check plans: one GPU (no process group of its own)
    with contextlib.redirect_stdout(one_gpu):
        one_gpu_code = main(["--classes", "1000", "--gpus", "1", "--network", "tiny", "--batch-size", "8",
                             "--sample-rate", "1.0", "--json"])
    return (results, planner.base, memory_anchors(BUDGET_CHUNKS),
            (one_gpu_code, json.loads(one_gpu.getvalue().strip().splitlines()[-1])))


def test_max_classes_fits_and_one_percent_more_does_not_and_one_gpu_jobs_are_planned():
    results, base, anchors, one_gpu = _in_fresh_process(_plan_tool_and_bisection)
    code, result, fits_at, fits_above, bisected = results[8]
    assert code == 0
    assert {"peak_bytes", "bytes_per_identity", "fits", "host_syncs_per_step", "categories", "flops_per_step",
            "predicted_samples_per_s", "max_classes", "predicted_head_s", "predicted_backbone_s",
            "head_kernel_launches", "roofline_samples_per_s", "roofline_head_s"} <= set(result)
    assert result["head_kernel_launches"] > 0 and result["kernel_launches"]["optimizer"] > 0
    assert result["head_bytes_per_class"]["matmul"] > 0
    # the row update in the head's backward: the Triton path's pfc::apply_rows (declared cost) on a CUDA plan
    assert result["head_bytes_per_class"]["pfc kernel"] > 0 and "optimizer" not in result["head_bytes_per_class"]
    assert result["gpu"] == "H100-SXM5-80GB" and "--gpu h100" in result["gpu_choice"]
    largest = result["max_classes"]
    assert result["fits"] == (2_000_000 <= largest)
    assert largest > 2 * base   # found on the extrapolated plans
    assert fits_at and not fits_above
    assert largest == bisected
    # a small GPU: 2·C0 does not fit, the limit lies below one full chunk per rank (anchors[1]), found
    # on the peak interpolated between simulations, and direct simulations around it agree to 1 %
    code, result, fits_at, fits_above, bisected = results[3]
    assert code == 0 and not result["fits"]
    assert anchors[0] < result["max_classes"] < anchors[1] and result["max_classes"] == bisected
    assert fits_at and not fits_above
    one_gpu_code, one_gpu_result = one_gpu   # make gpu-check compares this plan with the allocator's peak
    assert one_gpu_code == 0
    assert one_gpu_result["fits"] and one_gpu_result["host_syncs_per_step"] == 0 and one_gpu_result["peak_bytes"] > 0


def _fp16_on_the_memory_named_gpu():
    import contextlib
    import io

    from tools.plan import main

    unscaled = []
    original = torch.amp.GradScaler.unscale_

    def unscale_(scaler, optimizer):
        unscaled.append(type(optimizer).__name__)
        return original(scaler, optimizer)

    torch.amp.GradScaler.unscale_ = unscale_
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main(["--classes", "1000", "--gpus", "1", "--network", "tiny", "--batch-size", "8",
                     "--sample-rate", "1.0", "--precision", "fp16", "--center-dtype", "fp16", "--gpu-memory", "141",
                     "--json"])
    return code, json.loads(output.getvalue().strip().splitlines()[-1]), unscaled


def test_fp16_is_simulated_with_its_grad_scaler_and_the_memory_picks_the_gpu_kind():
    """fp16 loss scaling with fp16 centers (their gradients unscaled in float32 inside the head's
    update) simulates without a host sync."""
    code, result, unscaled = _in_fresh_process(_fp16_on_the_memory_named_gpu)
    assert code == 0 and result["job"]["precision"] == "fp16" and result["job"]["center_dtype"] == "fp16"
    # every simulated step unscales the backbone's optimizer, then reports the head's own overflow
    # check to the scaler (the head's gradients are unscaled inside its update), before stepping them
    assert unscaled and unscaled == ["SGD", "OverflowProbe"] * (len(unscaled) // 2)
    assert result["host_syncs_per_step"] == 0
    assert result["gpu"] == "H200-SXM-141GB" and "from --gpu-memory 141" in result["gpu_choice"]
    assert result["gpu_memory_gib"] == 141


def test_the_gpu_kind_is_named_or_follows_from_the_memory():
    from pfc.planning.report import choose_gpu

    assert choose_gpu(None, None)[:2] == ("h100", 80)
    assert choose_gpu(None, 32)[:2] == ("v100", 32)
    assert choose_gpu(None, 141)[:2] == ("h200", 141)
    assert choose_gpu(None, 139.8)[:2] == ("h200", 139.8)   # what torch reports on an H200
    with pytest.raises(ConfigError, match="--gpu-memory 4 names no GPU kind"):
        choose_gpu(None, 4)
    assert choose_gpu(None, 80)[:2] == ("h100", 80)     # a100 has 80 too: the default kind wins, said so
    assert choose_gpu("a100", None)[:2] == ("a100", 80)
    assert choose_gpu("a100", 40)[:2] == ("a100", 40)   # an A100-40GB
    with pytest.raises(ConfigError, match="more than a V100-SXM2-32GB has"):
        choose_gpu("v100", 80)


def test_help_shows_every_default(capsys):
    from tools.plan import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--gpus", "8"), ("--gpu-memory", "the --gpu kind's"), ("--gpu", "the one kind"),
                          ("--network", "iresnet100"), ("--batch-size", "128"), ("--sample-rate", "0.1"),
                          ("--center-dtype", "fp32"), ("--precision", "bf16"), ("--kernels", "triton"),
                          ("--chunk-rows", "0"), ("--logits", "auto"), ("--engine", "ddp"),
                          ("--head-optimizer", "sgd")):
        upper = flag[2:].upper().replace("-", "_")
        after = text.split(f"{flag} {upper} ", 1)[1]
        assert after.split(" --", 1)[0].count("(default: ") == 1 and f"(default: {default}" in after, flag


@pytest.mark.parametrize("argv, message", [
    (["--classes", "12x"], "--classes '12x' is not a number"),
    (["--classes", "-5"], "--classes '-5' must be a whole number ≥ 1"),
    (["--classes", "1e30"], "--classes '1e30' is more than 1,000,000,000,000"),
    (["--classes", "1M", "--compare-classes", "1e30"], "--compare-classes '1e30' is more than"),
    (["--classes", "1M", "--gpu", "h100", "--gpu-memory", "141"], "--gpu-memory 141 is more than a H100-SXM5-80GB"),
    (["--classes", "1M", "--gpu-memory", "48"], "--gpu-memory 48 names no GPU kind"),
    (["--classes", "1M", "--precision", "fp8"], "--precision 'fp8' is not one of fp32, fp16, bf16"),
    (["--classes", "1M", "--kernels", "cuda"], "--kernels 'cuda' is not one of auto, torch, triton"),
    (["--classes", "1M", "--gpus", "0"], "--gpus must be ≥ 1"),
    (["--classes", "1M", "--chunk-rows", "-1"], "--chunk-rows must be ≥ 0, got -1"),
    (["--classes", "1M", "--logits", "never"], "--logits 'never' is not one of auto, keep, recompute"),
    (["--classes", "1M", "--network", "resnet9000"], "unknown network 'resnet9000'"),
    (["--classes", "1M", "--gpu", "x100"], "--gpu 'x100' is not one of"),
    (["--classes", "1M", "--center-dtype", "fp8"], "--center-dtype 'fp8' is not one of"),
    (["--classes", "1M", "--head-optimizer", "lamb"], "--head-optimizer 'lamb' is not one of sgd, adamw"),
    (["--classes", "1M", "--head-optimizer", "adamw", "--center-dtype", "fp16"], "'head.momentum_dtype'"),
    (["--classes", "0.5"], "must be a whole number"),
    (["--gpus", "8"], "the following arguments are required: --classes"),
])
def test_bad_arguments_end_with_one_line_naming_the_cause(argv, message, capsys):
    from tools.plan import main

    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and message in error, error


def test_the_planned_chunk_rows_are_the_jobs_or_what_the_head_picks_on_a_gpu():
    from pfc.head.chunking import auto_chunk_rows
    from pfc.planning.job import train_config
    from pfc.planning.plan import base_classes

    issue = Job(num_classes=29_000_000, gpus=8, network="iresnet50", batch_size=128, center_dtype="fp16")
    assert issue.head_chunk_rows == 61_440 == auto_chunk_rows("meta", 1024, 512, torch.float16)
    assert base_classes(issue) == 8 * 2 * 614_400   # two full chunks per rank at ρ = 0.1
    assert train_config(issue).head.chunk_rows == 0   # automatic in the simulated head as well
    explicit = Job(num_classes=4000, gpus=2, batch_size=8, chunk_rows=2048)
    assert explicit.head_chunk_rows == 2048 and train_config(explicit).head.chunk_rows == 2048
    assert base_classes(explicit) == 2 * 40_960


def test_class_counts_read_with_suffixes():
    assert parse_count("100M") == 100_000_000
    assert parse_count("1.5B") == 1_500_000_000
    assert parse_count("2e8") == 200_000_000
    assert parse_count("250k") == 250_000
    with pytest.raises(ConfigError, match="not a number"):
        parse_count("1.5.0M")

