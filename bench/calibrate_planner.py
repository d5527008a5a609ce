"""The planner's backbone calibration (pfc.planning.roofline.BACKBONE_CALIBRATION), recomputed.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/calibrate_planner.py

For each published run it plans the same job (torch head kernels: the published runs used an
eager head) and solves ``measured step = backbone roofline / efficiency + the rest`` for the
backbone's efficiency, where the rest (head with its launches and collectives, optimizers, other)
is the planner's own estimate for that job. Prints one line per GPU kind and a JSON object.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.planning.job import Job  # noqa: E402
from pfc.planning.plan import Planner  # noqa: E402
from pfc.planning.report import estimate  # noqa: E402

# (GPU kind, the job, samples/s measured over all ranks); sources in BACKBONE_CALIBRATION
PUBLISHED = (
    ("v100", Job(num_classes=125_000, gpus=8, network="iresnet50", batch_size=128, sample_rate=0.1,
                 precision="fp16", center_dtype="fp32", kernels="torch"), 5004.0),
    ("a100", Job(num_classes=618_000, gpus=8, network="iresnet50", batch_size=128, sample_rate=1.0,
                 precision="fp16", center_dtype="fp32", kernels="torch"), 5400.0),
)


def main() -> int:
    results = {}
    for kind, job, measured in PUBLISHED:
        time = estimate(Planner(job).plan(job.num_classes), kind)
        step = job.gpus * job.batch_size / measured
        rest = time.step_s - time.backbone_s
        efficiency = time.roofline_backbone_s / (step - rest)
        results[kind] = {"measured_step_s": step, "rest_s": rest, "backbone_roofline_s": time.roofline_backbone_s,
                         "efficiency": efficiency}
        print(f"{kind}: measured step {1e3 * step:.1f} ms, planned rest {1e3 * rest:.1f} ms, backbone roofline "
              f"{1e3 * time.roofline_backbone_s:.1f} ms → efficiency {efficiency:.3f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
