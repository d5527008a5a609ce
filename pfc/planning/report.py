"""A plan as the tool prints it: a table by category, the verdict, syncs, findings, time on paper."""
from __future__ import annotations

from pfc.errors import ConfigError
from pfc.planning.plan import GIB, HEADROOM_NOTE, Plan, fits, usable_bytes
from pfc.planning.roofline import BACKBONE_CALIBRATION, GPUS, LAUNCH_S, TimeEstimate, roofline
from pfc.planning.tracker import CATEGORIES


DEFAULT_GPU = "h100"


def choose_gpu(gpu: str | None, gpu_memory_gib: float | None) -> tuple[str, float, str]:
    """``(kind, memory GiB, how the kind was chosen)`` from the ``--gpu`` and ``--gpu-memory``
    given (None: not given). The kind follows from the memory when only that is given: the
    default kind (h100) if its memory matches (within 10 %), else the kind whose memory does;
    memory matching no kind, or more memory than the named kind has, is refused (ConfigError)."""
    sizes = ", ".join(f"{kind}: {spec.memory_gb:g}" for kind, spec in GPUS.items())
    if gpu is not None and gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}")
    if gpu is None and gpu_memory_gib is None:
        return DEFAULT_GPU, GPUS[DEFAULT_GPU].memory_gb, f"--gpu {DEFAULT_GPU} (the default)"
    if gpu is None:
        # within 10 %: a device reports a little less than its data sheet (an H100 79.2 GiB, an H200 139.8)
        kinds = [kind for kind, spec in GPUS.items() if abs(spec.memory_gb - gpu_memory_gib) <= 0.1 * spec.memory_gb]
        if not kinds:
            raise ConfigError(f"--gpu-memory {gpu_memory_gib:g} names no GPU kind ({sizes}): give --gpu for the "
                              "time estimate")
        kind = DEFAULT_GPU if DEFAULT_GPU in kinds else kinds[0]
        return kind, gpu_memory_gib, f"--gpu {kind}, from --gpu-memory {gpu_memory_gib:g} (--gpu to choose another)"
    spec = GPUS[gpu]
    if gpu_memory_gib is None:
        return gpu, spec.memory_gb, f"--gpu {gpu}"
    if gpu_memory_gib > spec.memory_gb:
        raise ConfigError(f"--gpu-memory {gpu_memory_gib:g} is more than a {spec.name} has ({spec.memory_gb:g}); "
                          f"memory per kind: {sizes}")
    return gpu, gpu_memory_gib, f"--gpu {gpu}"


def estimate(plan: Plan, gpu: str) -> TimeEstimate:
    """The plan's time estimate on ``gpu`` (a key of GPUS): calibrated, with the pure roofline beside it."""
    spec = GPUS[gpu]
    return roofline(plan.seconds.get(spec.name, {}), plan.comm_bytes, spec, plan.job.batch_size * plan.job.gpus,
                    launches=plan.launches)


def summary(plan: Plan, gpu_memory_gib: float, gpu: str, max_classes: int | None = None,
            baseline: Plan | None = None, gpu_choice: str = "") -> dict:
    """Everything the tool reports, JSON-ready (the keys of ``--json``)."""
    time = estimate(plan, gpu)
    job = plan.job
    result = {
        "job": {"classes": job.num_classes, "gpus": job.gpus, "network": job.network, "batch_size": job.batch_size,
                "sample_rate": job.sample_rate, "precision": job.precision, "center_dtype": job.center_dtype,
                "engine": job.engine, "kernels": job.kernels, "grad_checkpointing": job.grad_checkpointing,
                "optimizer": job.optimizer, "head_optimizer": job.head_optimizer},
        "peak_bytes": plan.peak_bytes, "peak_phase": plan.peak_phase,
        "categories": plan.categories,
        "bytes_per_identity": round(plan.bytes_per_identity),
        "gpu_memory_gib": gpu_memory_gib, "usable_bytes": round(usable_bytes(gpu_memory_gib)),
        "fits": fits(plan, gpu_memory_gib), "headroom": HEADROOM_NOTE,
        "host_syncs_per_step": plan.host_syncs_per_step,
        "host_sync_sites": {site: round(n) for site, n in sorted(plan.host_syncs.items(), key=lambda kv: -kv[1])
                            if round(n)},
        "step_findings": {site: round(n) for site, n in sorted(plan.step_findings.items(), key=lambda kv: -kv[1])
                          if round(n)},
        "setup_placement": {site: round(n) for site, n in plan.setup_findings.items()
                            if site.split(" at ")[-1].startswith(("head/", "train/", "distributed/"))},
        "flops_per_step": plan.flops_per_step,
        "gpu": time.gpu, "gpu_kind": gpu, "gpu_choice": gpu_choice or f"--gpu {gpu}",
        "estimate": (f"backbone calibrated on a published run ({BACKBONE_CALIBRATION[gpu].source}; "
                     f"{BACKBONE_CALIBRATION[gpu].efficiency:.2f} of its roofline), the rest at roofline plus "
                     f"{LAUNCH_S * 1e6:g} µs per kernel launch"),
        "predicted_step_s": time.step_s, "predicted_backbone_s": time.backbone_s,
        "predicted_head_s": time.head_s + time.head_comm_s, "head_share": time.head_share,
        "predicted_samples_per_s": time.samples_per_s,
        "head_kernel_launches": time.head_launches, "kernel_launches": dict(time.launches),
        "roofline_step_s": time.roofline_step_s, "roofline_backbone_s": time.roofline_backbone_s,
        "roofline_head_s": time.roofline_head_s + time.head_comm_s,
        "roofline_samples_per_s": time.roofline_samples_per_s,
        "head_bytes_per_class": {name: round(value) for name, value in
                                 sorted(plan.by_class.get("head", {}).items(), key=lambda kv: -kv[1])},
        "method": plan.method, "simulated_class_counts": plan.simulated,
    }
    if max_classes is not None:
        result["max_classes"] = max_classes
    if baseline is not None:
        base_time = estimate(baseline, gpu)
        result["baseline_classes"] = baseline.job.num_classes
        result["baseline_samples_per_s"] = base_time.samples_per_s
        result["throughput_vs_baseline"] = time.samples_per_s / base_time.samples_per_s
        result["roofline_throughput_vs_baseline"] = time.roofline_samples_per_s / base_time.roofline_samples_per_s
    return result


def _gib(value: float) -> str:
    return f"{value / GIB:9.2f}"


def format_report(result: dict) -> str:
    """The human-readable report of :func:`summary`'s result."""
    job = result["job"]
    checkpointing = " (gradient checkpointing)" if job.get("grad_checkpointing") else ""
    lines = [f"one rank of {job['gpus']} × {job['network']}{checkpointing}, batch {job['batch_size']}/GPU, "
             f"{job['classes']:,} classes, ρ = {job['sample_rate']}, {job['precision']} autocast, "
             f"{job['center_dtype']} centers, {job['engine']}, {job['kernels']} head kernels, "
             f"{job.get('optimizer', 'sgd')} backbone, {job.get('head_optimizer', 'sgd')} centers' optimizer",
             f"{'category':<26}{'GiB':>9}{'share':>8}"]
    peak = result["peak_bytes"] or 1
    for name in CATEGORIES:
        value = result["categories"].get(name, 0)
        lines.append(f"{name:<26}{_gib(value)}{100 * value / peak:7.1f}%")
    lines += [f"{'peak (' + result['peak_phase'] + ')':<26}{_gib(result['peak_bytes'])}",
              f"bytes per identity (all ranks): {result['bytes_per_identity']:,}",
              f"fits in {result['gpu_memory_gib']} GiB: {'yes' if result['fits'] else 'NO'} "
              f"(usable {result['usable_bytes'] / GIB:.2f} GiB; {result['headroom']})"]
    if "max_classes" in result:
        lines.append(f"largest class count that fits: {result['max_classes']:,}")
    lines.append(f"host syncs per step: {result['host_syncs_per_step']} (target 0)")
    for site, count in list(result["host_sync_sites"].items())[:8]:
        lines.append(f"  {count:6d} × {site}")
    for site, count in list(result["step_findings"].items())[:8]:
        lines.append(f"  {count:6d} × {site}")
    for site, count in result["setup_placement"].items():
        lines.append(f"  setup: {count} × {site}")
    lines.append(f"estimate on {result['gpu']} ({result['gpu_choice']}; {result['estimate']}):")
    lines.append(f"  step {1e3 * result['predicted_step_s']:.1f} ms "
                 f"(backbone {1e3 * result['predicted_backbone_s']:.1f}, head {1e3 * result['predicted_head_s']:.1f} "
                 f"with {result['head_kernel_launches']:,} kernel launches, "
                 f"head share {100 * result['head_share']:.0f} %), {result['predicted_samples_per_s']:,.0f} samples/s; "
                 f"{result['flops_per_step'] / 1e12:.2f} TFLOP per step on this rank")
    lines.append(f"  pure roofline (vendor peak, no launch cost): step {1e3 * result['roofline_step_s']:.1f} ms "
                 f"(backbone {1e3 * result['roofline_backbone_s']:.1f}, head {1e3 * result['roofline_head_s']:.1f}), "
                 f"{result['roofline_samples_per_s']:,.0f} samples/s")
    if "baseline_classes" in result:
        lines.append(f"throughput vs {result['baseline_classes']:,} classes: "
                     f"{100 * result['throughput_vs_baseline']:.0f} % (pure roofline: "
                     f"{100 * result['roofline_throughput_vs_baseline']:.0f} %)")
    lines.append(f"method: {result['method']}")
    return "\n".join(lines)
