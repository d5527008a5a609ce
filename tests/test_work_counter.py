"""The planner's work counter (pfc/planning/work.py) on small op sequences whose costs are known."""
from __future__ import annotations

import pytest
import torch

from pfc.head.kernels.costs import KernelCost, declare_cost
from pfc.planning.roofline import GPUS, LAUNCH_S, roofline
from pfc.planning.work import WorkCounter

F32 = 4


@torch.library.custom_op("pfc::_work_counter_probe", mutates_args=())
def _probe(block: torch.Tensor) -> torch.Tensor:
    return block * 2


@_probe.register_fake
def _(block):
    return torch.empty_like(block)


@declare_cost("pfc::_work_counter_probe")
def _(args, kwargs, out) -> KernelCost:
    return KernelCost(flops=7 * args[0].numel(), bytes_read=args[0].nbytes, bytes_written=0, launches=3)


@torch.library.custom_op("pfc::_work_counter_undeclared", mutates_args=())
def _undeclared(block: torch.Tensor) -> torch.Tensor:
    return block + 1


def _count(ops) -> WorkCounter:
    counter = WorkCounter(count_host=True)
    counter.part = "head"
    with counter:
        ops()
    return counter


def _single(counter: WorkCounter) -> tuple[int, int, int]:
    return counter.flops["head"], counter.bytes["head"], counter.launches["head"]


def test_a_gemm_costs_its_flops_and_reads_both_operands_and_writes_the_product():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert _single(_count(lambda: a @ b)) == (2 * 64 * 32 * 16, (64 * 32 + 32 * 16 + 64 * 16) * F32, 1)


def test_a_narrow_gemm_with_an_fp32_output_accumulating_into_its_out_costs_its_flops_once():
    a = torch.randn(64, 32, device="meta", dtype=torch.bfloat16)
    b = torch.randn(32, 16, device="meta", dtype=torch.bfloat16)
    out = torch.zeros(64, 16, device="meta")
    # addmm.dtype (the head's Σ_j G_j r_j w_j with narrow centers): out_dtype is positional in its schema
    counter = _count(lambda: torch.addmm(out, a, b, out_dtype=torch.float32, out=out))
    assert _single(counter) == (2 * 64 * 32 * 16, (64 * 32 + 32 * 16) * 2 + 2 * 64 * 16 * F32, 1)
    # at the tensor-core peak of its bf16 multiplicands, not the fp32 peak of the accumulator it adds to
    big = [torch.randn(shape, device="meta", dtype=dtype) for shape, dtype in
           (((4096, 4096), torch.float32), ((4096, 4096), torch.bfloat16), ((4096, 4096), torch.bfloat16))]
    counter = _count(lambda: torch.addmm(*big, out_dtype=torch.float32, out=big[0]))
    v100 = GPUS["v100"]
    assert counter.seconds[(v100.name, "head")] == pytest.approx(2 * 4096**3 / (v100.bf16_tflops * 1e12))


def test_a_convolution_without_bias_costs_its_flops():
    # a None bias and int strides among its arguments: counted by torch's formula with all of them
    images, kernel = torch.randn(2, 3, 8, 8, device="meta"), torch.randn(4, 3, 3, 3, device="meta")
    flops, _, launches = _single(_count(lambda: torch.nn.functional.conv2d(images, kernel, padding=1)))
    assert (flops, launches) == (2 * (2 * 8 * 8) * 4 * (3 * 3 * 3), 1)


def test_index_select_moves_the_rows_it_returns_and_its_index_not_the_table():
    table, index = torch.randn(1000, 8), torch.arange(10)
    counter = _count(lambda: table.index_select(0, index))
    assert _single(counter) == (0, 2 * 10 * 8 * F32 + 10 * 8, 1)
    assert dict(counter.by_class["head"]) == {"gather": 2 * 10 * 8 * F32 + 10 * 8}


def test_an_out_argument_is_written_not_read():
    x, y, out = torch.randn(100), torch.randn(100), torch.empty(100)
    assert _single(_count(lambda: torch.add(x, y, out=out))) == (0, 3 * 100 * F32, 1)


def test_an_in_place_op_reads_and_writes_its_target_and_copy_reads_only_its_source():
    x, y = torch.randn(100), torch.randn(100)
    assert _single(_count(lambda: x.add_(y))) == (0, 3 * 100 * F32, 1)
    assert _single(_count(lambda: x.copy_(y))) == (0, 2 * 100 * F32, 1)


def test_slices_views_and_metadata_queries_cost_nothing_and_launch_nothing():
    x = torch.randn(100, 8)

    def ops():
        x[10:20].t()
        x.view(800)
        torch.ops.prim.device.default(x)
        x.detach()

    assert _single(_count(ops)) == (0, 0, 0)


def test_allocations_cost_nothing_and_fills_write_only_their_output():
    x = torch.randn(1000)

    def allocations():
        torch.empty(1000)
        torch.empty_like(x)
        x.new_empty(50)

    assert _single(_count(allocations)) == (0, 0, 0)
    assert _single(_count(lambda: torch.zeros_like(x))) == (0, 1000 * F32, 1)
    assert _single(_count(lambda: x.new_zeros(10))) == (0, 10 * F32, 1)


def test_a_pfc_custom_op_is_charged_its_declared_cost_and_launches():
    block = torch.randn(16, 8)
    counter = _count(lambda: torch.ops.pfc._work_counter_probe(block))
    assert _single(counter) == (7 * 128, 128 * F32, 3)
    assert not counter.undeclared


def test_an_undeclared_pfc_op_is_charged_its_inputs_and_outputs_and_named():
    block = torch.randn(16, 8)
    counter = _count(lambda: torch.ops.pfc._work_counter_undeclared(block))
    assert _single(counter) == (0, 2 * 128 * F32, 1)
    assert counter.undeclared == {"pfc::_work_counter_undeclared": 1}


def test_the_fused_sgd_step_reads_weights_gradients_momentum_and_writes_weights_and_momentum():
    weights = [torch.randn(1000) for _ in range(50)]
    grads = [torch.randn(1000) for _ in range(50)]
    momenta = [torch.zeros(1000) for _ in range(50)]

    def step():
        torch._fused_sgd_(weights, grads, momenta, weight_decay=1e-4, momentum=0.9, lr=0.1, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=False)

    counter = _count(step)
    # 50 tensors of a three-list multi-tensor kernel: 48 per launch, so 2 launches
    assert _single(counter) == (6 * 50_000, 5 * 50_000 * F32, 2)
    assert dict(counter.by_class["head"]) == {"optimizer": 5 * 50_000 * F32}


def test_host_ops_are_not_counted_by_default():
    a = torch.randn(8, 8)
    counter = WorkCounter()
    with counter:
        a @ a
    assert not counter.bytes and not counter.launches


def test_the_estimate_adds_a_launch_cost_per_kernel_and_calibrates_only_the_backbone():
    gpu = GPUS["v100"]
    seconds = {"backbone": 0.060, "head": 0.010, "optimizer": 0.001, "other": 0.0}
    time = roofline(seconds, {}, gpu, global_batch=1024, launches={"backbone": 600, "head": 1000},
                    backbone_efficiency=0.5)
    assert time.roofline_step_s == pytest.approx(0.071)
    assert time.roofline_samples_per_s == pytest.approx(1024 / 0.071)
    assert time.backbone_s == pytest.approx(0.120)          # its launches are in the calibration
    assert time.head_s == pytest.approx(0.010 + 1000 * LAUNCH_S)
    assert time.step_s == pytest.approx(0.120 + 0.010 + 1000 * LAUNCH_S + 0.001)
    assert time.samples_per_s == pytest.approx(1024 / time.step_s)
    assert time.head_launches == 1000
