"""The row update's Triton kernel (interpreted on CPU tensors) against the torch path: momentum SGD
of the gathered rows equal up to FMA rounding, the skip and the untouched rows bit-identical, the
old rows for the rollback, rounding into narrow storage, the custom ops under fake tensors and
their declared costs, one kernel per head chunk, and the head trained end to end either way."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from pfc.head.kernels.costs import declared_cost
from pfc.head.kernels.rows import RowStep, counter_seed, row_kernels
from tests.dispatch import RecordedOps, record_update_chunks
from tests.triton_interpret import kernels, triton_interpreter  # noqa: F401  (fixtures)

ROWS, DIM = 50, 48          # D not a power of two: the kernel's column mask is exercised


def _state(seed=0, dtype=torch.float32, momentum_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, DIM, generator=generator).to(dtype)
    momentum = torch.randn(ROWS, DIM, generator=generator).to(momentum_dtype or dtype)
    return weight, momentum


def _grads(count, rows, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, DIM, generator=generator) for _ in range(count)]


def _run(name, where, grads, momentum=0.9, weight_decay=5e-4, dtype=torch.float32, momentum_dtype=None,
         rounding="nearest", found_inf=None, old_rows=None, seed=7):
    weight, buffer = _state(dtype=dtype, momentum_dtype=momentum_dtype)
    for number, grad in enumerate(grads):
        step = RowStep(lr=0.1, momentum=momentum, weight_decay=weight_decay, rounding=rounding, found_inf=found_inf,
                       generator=torch.Generator().manual_seed(number), seed=counter_seed(seed, number))
        row_kernels(name).apply_rows(weight, buffer, where, grad, step, old_rows=old_rows)
    return weight, buffer


def _fma_bound(reference: torch.Tensor, updates: int) -> float:
    """How far the Triton update may be from torch's in fp32: each update does three multiply-adds
    (d = g + wd·w, v = μ·v + d, w = w − lr·v), each rounded twice or, fused into an FMA (the GPU
    compiler's choice, and torch's own CPU kernel's in places), once: a difference of at most one
    rounding of the product, 2⁻²⁴ of it, per operation. Through the momentum the differences of
    earlier updates carry on, so ``updates`` updates stay within 4·updates roundings of the largest
    value (a loose bound: measured, one ulp)."""
    return 4 * updates * 2.0 ** -24 * reference.abs().max().item()


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 0.0)])
def test_triton_fp32_update_equals_torch_up_to_fma_rounding_and_leaves_other_rows_bit_identical(
        triton_interpreter, momentum, weight_decay):
    rows = torch.tensor([0, 3, 17, 18, 49])
    grads = _grads(3, rows.numel())
    start_weight, start_momentum = _state()
    untouched = torch.ones(ROWS, dtype=torch.bool)
    untouched[rows] = False
    for where in (rows, slice(10, 15)):
        if isinstance(where, slice):
            untouched = torch.ones(ROWS, dtype=torch.bool)
            untouched[where] = False
        weight, buffer = _run("torch", where, grads, momentum, weight_decay)
        fused_weight, fused_buffer = _run("triton", where, grads, momentum, weight_decay)
        assert (fused_weight - weight).abs().max() <= _fma_bound(weight, 3)
        assert (fused_buffer - buffer).abs().max() <= _fma_bound(buffer, 3)
        assert not torch.equal(fused_weight[~untouched], start_weight[~untouched])   # the rows moved
        assert torch.equal(fused_weight[untouched], start_weight[untouched])
        assert torch.equal(fused_buffer[untouched], start_momentum[untouched])
        if momentum == 0:   # torch.optim.SGD leaves the buffer alone without momentum
            assert torch.equal(fused_buffer, start_momentum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_leaves_every_row_bit_identical_and_the_old_rows_are_written_anyway(kernels, dtype):
    rows = torch.tensor([1, 4, 9, 30])
    grad = _grads(1, 4)[0]
    grad[0, 0] = math.nan
    start_weight, start_momentum = _state(dtype=dtype)
    for skip, name in ((1.0, "skipped"), (0.0, "applied")):
        old = (torch.full((4, DIM), 7.0, dtype=dtype), torch.full((4, DIM), 7.0, dtype=dtype))
        weight, buffer = _run(kernels, rows, [grad], dtype=dtype, rounding="stochastic",
                              found_inf=torch.tensor(skip), old_rows=old)
        assert torch.equal(old[0], start_weight[rows]) and torch.equal(old[1], start_momentum[rows]), name
        if skip:
            assert torch.equal(weight, start_weight) and torch.equal(buffer, start_momentum)
        else:
            assert torch.isnan(weight[1, 0]) and not torch.equal(weight[rows[1:]], start_weight[rows[1:]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_scaled_gradient_is_unscaled_in_float32_as_if_handed_over_unscaled(kernels, dtype):
    """``step.unscale`` (a loss scale's inverse, 2⁻¹⁶): a gradient stored scaled in the centers'
    type updates the rows bit for bit as its float32 value divided by the scale would. For fp16
    the gradient is small (≈1e-6) so that unscaling it in fp16 itself would have lost bits
    (subnormals): the unscaling happens after the widening."""
    rows = torch.tensor([1, 4, 9, 30])
    scale = 2.0 ** 16
    scaled = (_grads(1, 4)[0] * (1e-6 if dtype == torch.float16 else 1.0) * scale).to(dtype)
    exact = scaled.float() / scale
    assert dtype != torch.float16 or not torch.equal((scaled * (1 / scale)).float(), exact)   # fp16 would lose
    weight, buffer = _state(dtype=dtype)
    step = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, rounding="nearest", unscale=torch.tensor(1 / scale))
    row_kernels(kernels).apply_rows(weight, buffer, rows, scaled, step)
    reference_weight, reference_buffer = _state(dtype=dtype)
    reference = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, rounding="nearest")
    row_kernels(kernels).apply_rows(reference_weight, reference_buffer, rows, exact, reference)
    assert torch.equal(weight, reference_weight) and torch.equal(buffer, reference_buffer)
    assert not torch.equal(buffer, _state(dtype=dtype)[1])


@pytest.mark.parametrize("dtype, momentum_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                   (torch.float32, torch.bfloat16)])
def test_triton_nearest_rounding_into_narrow_storage_is_torchs_up_to_the_fp32_ulp(triton_interpreter, dtype,
                                                                                   momentum_dtype):
    """The fp32 results differ at most by FMA roundings (above), which move a round-to-nearest
    result only when they straddle a rounding boundary: then by one spacing, rarely."""
    rows = torch.arange(0, ROWS, 2)
    grads = _grads(2, rows.numel())
    reference = _run("torch", rows, grads, dtype=dtype, momentum_dtype=momentum_dtype)
    fused = _run("triton", rows, grads, dtype=dtype, momentum_dtype=momentum_dtype)
    for ours, theirs in zip(fused, reference):
        assert ours.dtype == theirs.dtype
        if theirs.dtype == torch.float32:
            assert (ours - theirs).abs().max() <= _fma_bound(theirs, 2)
            continue
        spacing = 2.0 ** (torch.floor(torch.log2(theirs.double().abs().clamp(min=1e-30)))
                          - (7 if theirs.dtype == torch.bfloat16 else 10))
        assert ((ours.double() - theirs.double()).abs() <= spacing * 1.001).all()
        assert (ours == theirs).double().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_stochastic_rounding_depends_on_seed_row_and_column_only(triton_interpreter, dtype):
    """Philox keyed by the update's seed at (row, column): the rows updated in one call or in two
    chunks round identically; another seed rounds differently."""
    rows = torch.tensor([2, 5, 6, 11, 40, 41])
    grad = _grads(1, 6)[0]
    whole = _run("triton", rows, [grad], dtype=dtype, rounding="stochastic")
    weight, buffer = _state(dtype=dtype)
    step = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, rounding="stochastic", seed=counter_seed(7, 0))
    for part in (slice(0, 2), slice(2, 6)):
        row_kernels("triton").apply_rows(weight, buffer, rows[part], grad[part], step)
    assert torch.equal(weight, whole[0]) and torch.equal(buffer, whole[1])
    other = _run("triton", rows, [grad], dtype=dtype, rounding="stochastic", seed=8)
    assert not torch.equal(other[0], whole[0])


def test_the_ops_run_on_fake_cuda_tensors_without_a_launch_and_declare_their_costs():
    """The planner's simulated GPU holds fake tensors: the ops' fake implementations serve (a
    launch would fail: there is no GPU and no interpreter for fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    count, dim = 300, 512
    with FakeTensorMode(), RecordedOps() as recorded:
        weight = torch.empty(10_000, dim, dtype=torch.bfloat16, device="cuda")
        momentum = torch.empty(10_000, dim, dtype=torch.bfloat16, device="cuda")
        rows = torch.empty(count, dtype=torch.int64, device="cuda")
        old = (torch.empty(count, dim, dtype=torch.bfloat16, device="cuda"),
               torch.empty(count, dim, dtype=torch.bfloat16, device="cuda"))
        step = RowStep(lr=0.1, momentum=0.9, weight_decay=5e-4, found_inf=torch.zeros((), device="cuda"), seed=1)
        row_kernels("triton").apply_rows(weight, momentum, rows, torch.empty(count, dim, device="cuda"), step,
                                         old_rows=old)
        row_kernels("triton").round_into(torch.empty(count, dim, dtype=torch.float16, device="cuda"),
                                         torch.empty(count, dim, device="cuda"), "stochastic")
    ops = {name: (args, kwargs) for name, args, kwargs in recorded.calls if name.startswith("pfc::")}
    assert set(ops) == {"pfc::apply_rows", "pfc::round_into"}
    cost = declared_cost("pfc::apply_rows")(*ops["pfc::apply_rows"], None)
    values = count * dim
    # read w, v (bf16) and g (fp32), the row ids and the flag; write w, v and their old values
    assert cost.bytes_read == values * (2 + 2 + 4) + count * 8 + 4
    assert cost.bytes_written == values * (2 + 2) * 2
    assert cost.launches == 1 and cost.flops == 6 * values
    rounding = declared_cost("pfc::round_into")(*ops["pfc::round_into"], None)
    assert (rounding.bytes_read, rounding.bytes_written) == (values * 4 + 8, values * 2)


# ------------------------------------------------------------------------------ the head

NUM_CLASSES, HEAD_DIM, BATCH = 61, 16, 6


def _train_head(name, dtype=torch.float32, steps=3, count_ops=None, update_in_backward=True):
    from pfc.head.partial_fc import PartialFC

    head = PartialFC(NUM_CLASSES, HEAD_DIM, sample_rate=0.5, seed=3, chunk_rows=8, dtype=dtype, kernels=name)
    optimizer = head.optimizer(lr=0.5, momentum=0.9, weight_decay=0.01, update_in_backward=update_in_backward)
    assert optimizer.kernels == name
    data = torch.Generator().manual_seed(5)
    for step in range(steps):
        head.set_iteration(step)
        x = torch.randn(BATCH, HEAD_DIM, generator=data)
        loss = head(x, torch.randint(0, NUM_CLASSES, (BATCH,), generator=data))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return head.weight.detach().clone(), optimizer.state[head.weight]["momentum_buffer"].clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_with_triton_kernels_updates_its_rows_like_the_torch_path(triton_interpreter, dtype):
    """fp32: equal up to FMA rounding (a little more: the update's differences feed the next
    step's logits; 1e-5 of the largest value); bf16: two stochastic roundings of the same update
    differ by up to a spacing per value per step, 2⁻⁷ relative: within 2⁻⁵ of the largest value,
    and the differences average out (mean within 6 standard errors of 0: no drift between them)."""
    weight, momentum = _train_head("torch", dtype)
    fused_weight, fused_momentum = _train_head("triton", dtype)
    start, _ = _train_head("torch", dtype, steps=0)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -5
    for ours, theirs in ((fused_weight, weight), (fused_momentum, momentum)):
        assert ours.dtype == theirs.dtype == dtype
        assert (ours.float() - theirs.float()).abs().max() <= tolerance * theirs.float().abs().max()
    moved = (weight != start).any(dim=1)
    assert torch.equal(moved, (fused_weight != start).any(dim=1))   # the same rows, and only they, moved
    assert 0 < moved.sum() < NUM_CLASSES
    if dtype == torch.bfloat16:   # unbiased either way: the mean difference, in spacings, is noise
        spacing = 2.0 ** (torch.floor(torch.log2(weight[moved].double().abs())) - 7)
        difference = ((fused_weight[moved].double() - weight[moved].double()) / spacing).flatten()
        assert difference.abs().max() > 0   # other random numbers than torch's
        assert abs(difference.mean().item()) < 6 * difference.std().item() / math.sqrt(difference.numel())


def test_each_head_chunk_is_updated_by_one_kernel_and_nothing_else(triton_interpreter, monkeypatch):
    """On a GPU every op is a launch: the update of a head chunk is the one ``pfc::apply_rows``
    (no gather, no widening, no rounding passes), with narrow storage too."""
    per_chunk = record_update_chunks(monkeypatch)   # views (the chunk's slice of the row ids) left out
    _train_head("triton", torch.bfloat16, steps=2)
    assert len(per_chunk) >= 2 * 3                            # ⌈31 sampled rows / 8⌉ chunks a step
    assert all(ops == ["pfc::apply_rows"] for ops in per_chunk), per_chunk


def test_the_rollback_puts_back_the_old_rows_the_triton_update_wrote(triton_interpreter):
    """The rollback no longer snapshots the rows after the forward (no hook on the head): the
    update writes their old values, and a skipped step gets them back bit for bit."""
    from pfc.head.partial_fc import PartialFC
    from pfc.train.rollback import StepRollback

    head = PartialFC(NUM_CLASSES, HEAD_DIM, sample_rate=0.5, seed=3, chunk_rows=8, dtype=torch.bfloat16,
                     kernels="triton")
    optimizer = head.optimizer(lr=0.5, update_in_backward=True)
    rollback = StepRollback(torch.nn.BatchNorm1d(4), head, optimizer, head_update_in_backward=True)
    assert not head._forward_hooks
    data = torch.Generator().manual_seed(6)
    for step, skip in enumerate((False, True, False)):
        before = head.weight.detach().clone(), optimizer.state[head.weight]["momentum_buffer"].clone()
        rollback.begin()
        head.set_iteration(step)
        head(torch.randn(BATCH, HEAD_DIM, generator=data),
             torch.randint(0, NUM_CLASSES, (BATCH,), generator=data)).backward()
        rollback.restore(torch.tensor(skip))
        after = head.weight.detach(), optimizer.state[head.weight]["momentum_buffer"]
        same = torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
        assert same == skip, step
    rollback.close()
    assert optimizer.old_rows is None


def test_the_head_chooses_its_optimizers_kernels_and_unresolved_names_are_refused():
    from pfc.head.partial_fc import PartialFC

    head = PartialFC(NUM_CLASSES, HEAD_DIM, kernels="torch")
    assert head.optimizer().kernels == "torch"
    with pytest.raises(ValueError, match=r"choose them with PartialFC\(kernels=...\)"):
        head.optimizer(kernels="triton")
    with pytest.raises(ValueError, match="row kernels 'auto': not 'torch' or 'triton'"):
        row_kernels("auto")


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pfc.head.kernels import _rows_triton_kernels as kernels

def row_update(arch, weight, momentum, weight_mode, momentum_mode):
    pointers = dict(W=weight, V=momentum, G="fp32", ROWS="i64", FOUND_INF="fp32", OLD_W=weight, OLD_V=momentum,
                    UNSCALE="fp32", RADIAL="fp32")
    scalars = dict(num_rows="i32", row_start="i64", D="i32", w_stride="i32", v_stride="i32", g_stride="i32",
                   old_w_stride="i32", old_v_stride="i32", lr="fp32", momentum="fp32", weight_decay="fp32", seed="i64")
    constexprs = dict(HAS_ROWS=True, USE_MOMENTUM=True, LOAD_V=True, HAS_DECAY=True, HAS_SKIP=True, HAS_UNSCALE=True,
                      HAS_RADIAL=True, SAVE_W=True,
                      SAVE_V=True, W_MODE=weight_mode, V_MODE=momentum_mode, BLOCK_R=4, BLOCK_D=512)
    signature = {**{k: "*" + v for k, v in pointers.items()}, **scalars, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(kernels.row_update_kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"]

def round_into(arch, out):
    signature = dict(X="*fp32", OUT="*" + out, SEED="*i64", numel="i64", BLOCK="constexpr")
    compiled = triton.compile(ASTSource(kernels.round_kernel, signature, dict(BLOCK=2048)), target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"]

row_update(90, "fp32", "fp32", 0, 0)
row_update(90, "fp16", "fp32", 2, 0)
row_update(70, "bf16", "bf16", 2, 1)
round_into(90, "fp16")
round_into(70, "bf16")
print("compiled")
"""


@pytest.mark.slow   # a fresh process and Triton's compiler: ~9 s, ~17 s with a cold Triton cache
def test_the_kernels_compile_for_nvidia_gpus_without_one():
    """The interpreter runs the kernels' Python, not Triton's compiler: here they are compiled to
    PTX and cubin (Triton's own ptxas) for an H100 (sm_90) and a V100 (sm_70, no bf16 arithmetic)
    in a process without the interpreter, every storage type and rounding mode among the calls."""
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
