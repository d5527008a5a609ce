"""AdamW's row update as a Triton kernel (interpreted on CPU tensors) against the torch path: equal up
to FMA rounding, untouched rows and skips bit-identical, the old rows for the rollback, narrow
storage rounded stochastically and reproducibly, the op under fake tensors and its declared cost,
and the head's update in the backward either way."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pfc.head.kernels.costs import declared_cost
from pfc.head.kernels.rows import AdamWStep, counter_seed, row_kernels
from tests.dispatch import RecordedOps
from tests.triton_interpret import triton_interpreter  # noqa: F401  (fixture)

ROWS, DIM = 50, 48          # D not a power of two: the kernel's column mask is exercised


def _state(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, DIM, generator=generator).to(dtype)
    exp_avg = (0.1 * torch.randn(ROWS, DIM, generator=generator)).to(dtype)
    exp_avg_sq = (0.01 * torch.rand(ROWS, DIM, generator=generator)).to(dtype)
    return [weight, exp_avg, exp_avg_sq, (torch.arange(ROWS) % 3).to(torch.int32)]


def _run(name, where, count, updates=3, dtype=torch.float32, rounding="nearest", found_inf=None, seed=1):
    state = _state(dtype)
    old = (*(torch.full((count, DIM), 7.0, dtype=dtype) for _ in range(3)), torch.full((count,), -1, dtype=torch.int32))
    for number in range(updates):
        grad = torch.randn(count, DIM, generator=torch.Generator().manual_seed(number))
        step = AdamWStep(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, rounding=rounding,
                         found_inf=found_inf, generator=torch.Generator().manual_seed(number),
                         seed=counter_seed(seed, number))
        row_kernels(name).apply_adamw_rows(*state, where, grad, step, old_rows=old)
    return state, old


def test_triton_adamw_equals_torch_up_to_fma_rounding_and_leaves_other_rows_bit_identical(triton_interpreter):
    start = _state()
    for where in (torch.tensor([0, 3, 17, 18, 49]), slice(10, 15)):
        touched = torch.zeros(ROWS, dtype=torch.bool)
        touched[where] = True
        (ours, old), (theirs, old_torch) = _run("triton", where, 5, updates=2), _run("torch", where, 5, updates=2)
        assert torch.equal(ours[3], theirs[3]) and torch.equal(old[3], old_torch[3])   # the counts: exact
        for mine, reference, before in zip(ours[:3], theirs[:3], start[:3]):
            # a few fp32 roundings of the largest value per update (lerp, FMA): measured one ulp
            assert (mine - reference).abs().max() <= 2 * 8 * 2.0 ** -24 * reference.abs().max()
            assert torch.equal(mine[~touched], before[~touched])
        for mine, reference in zip(old[:3], old_torch[:3]):     # the values before the last update
            assert (mine - reference).abs().max() <= 2 * 8 * 2.0 ** -24 * reference.abs().max()


def test_a_skip_leaves_everything_bit_identical_and_writes_the_old_rows_anyway(triton_interpreter):
    rows = torch.tensor([1, 2, 40])
    state, old = _run("triton", rows, 3, updates=1, found_inf=torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(state, _state()))
    assert all(torch.equal(block, live[rows]) for block, live in zip(old, state))


def test_bf16_storage_rounds_stochastically_reproducibly_from_the_seed(triton_interpreter):
    rows = torch.tensor([1, 2, 40])
    first, _ = _run("triton", rows, 3, dtype=torch.bfloat16, rounding="stochastic", seed=4)
    again, _ = _run("triton", rows, 3, dtype=torch.bfloat16, rounding="stochastic", seed=4)
    other, _ = _run("triton", rows, 3, dtype=torch.bfloat16, rounding="stochastic", seed=5)
    nearest, _ = _run("torch", rows, 3, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    # three updates rounded either way: the weights within a few bf16 spacings (2⁻⁷ of the larger
    # value's binade) plus what rounding the moments changes in the three updates (each ≤ ~lr)
    larger = torch.maximum(first[0][rows].double().abs(), nearest[0][rows].double().abs())
    spacing = 2.0 ** (torch.floor(torch.log2(larger)) - 7)
    assert ((first[0][rows].double() - nearest[0][rows].double()).abs() <= 4 * spacing + 3 * 0.01).all()


def test_the_op_runs_on_fake_cuda_tensors_without_a_launch_and_declares_its_cost():
    from torch._subclasses.fake_tensor import FakeTensorMode

    count, dim = 300, 512
    with FakeTensorMode(), RecordedOps() as recorded:
        state = [torch.empty(10_000, dim, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
        steps = torch.zeros(10_000, dtype=torch.int32, device="cuda")
        rows = torch.empty(count, dtype=torch.int64, device="cuda")
        step = AdamWStep(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                         found_inf=torch.zeros((), device="cuda"), seed=1)
        row_kernels("triton").apply_adamw_rows(*state, steps, rows, torch.empty(count, dim, device="cuda"), step)
    calls = [(args, kwargs) for name, args, kwargs in recorded.calls if name == "pfc::apply_adamw_rows"]
    assert len(calls) == 1
    cost = declared_cost("pfc::apply_adamw_rows")(*calls[0], None)
    values = count * dim
    # read w, m, v (bf16) and g (fp32), the row ids, two corrections per row and the flag; write w, m, v
    assert cost.bytes_read == values * (3 * 2 + 4) + count * (8 + 8) + 4
    assert cost.bytes_written == values * 3 * 2 and cost.launches == 1


def test_the_heads_update_in_the_backward_with_the_triton_kernel_follows_the_torch_path(triton_interpreter):
    from pfc.head.margins import CosFace
    from pfc.head.partial_fc import PartialFC

    results = {}
    for kernels in ("torch", "triton"):
        head = PartialFC(40, 16, margin=CosFace(s=16.0, m=0.2), sample_rate=0.3, seed=5, chunk_rows=8, kernels=kernels)
        optimizer = head.adamw(lr=0.01, weight_decay=0.1, update_in_backward=True)
        data = torch.Generator().manual_seed(6)
        for step in range(3):
            head.set_iteration(step)
            head(torch.randn(6, 16, generator=data), torch.randint(0, 40, (6,), generator=data)).backward()
        results[kernels] = [head.weight.detach(), *optimizer.row_states(head.weight).values()]
    assert torch.equal(results["torch"][3], results["triton"][3])
    for ours, theirs in zip(results["triton"][:3], results["torch"][:3]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pfc.head.kernels import _adamw_triton_kernels as kernels

def adamw_rows(arch, weight, moments, weight_mode, moment_mode):
    pointers = dict(W=weight, M=moments, V=moments, G="fp32", ROWS="i64", FOUND_INF="fp32", OLD_W=weight,
                    OLD_M=moments, OLD_V=moments, UNSCALE="fp32", RADIAL="fp32", STEP_SIZE="fp32", CORRECTION2="fp32")
    scalars = dict(num_rows="i32", row_start="i64", D="i32", w_stride="i32", m_stride="i32", v_stride="i32",
                   g_stride="i32", old_stride="i32", decay="fp32", one_minus_beta1="fp32", beta2="fp32",
                   one_minus_beta2="fp32", eps="fp32", seed="i64")
    constexprs = dict(HAS_ROWS=True, HAS_SKIP=True, HAS_UNSCALE=True, HAS_RADIAL=True, SAVE=True, W_MODE=weight_mode,
                      M_MODE=moment_mode, BLOCK_R=2, BLOCK_D=512)
    signature = {**{k: "*" + v for k, v in pointers.items()}, **scalars, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(kernels.adamw_row_kernel, signature, constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"]

adamw_rows(90, "fp32", "fp32", 0, 0)
adamw_rows(90, "bf16", "bf16", 2, 2)
adamw_rows(70, "fp16", "fp32", 1, 0)
print("compiled")
"""


@pytest.mark.slow   # a fresh process and Triton's compiler
def test_the_kernel_compiles_for_nvidia_gpus_without_one():
    """The interpreter runs the kernel's Python, not Triton's compiler: here it is compiled to PTX and
    cubin for an H100 (sm_90) and a V100 (sm_70), every storage type and rounding mode among the calls."""
    pytest.importorskip("triton")
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root, TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
