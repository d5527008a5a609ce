"""On one CUDA device: the head computes what it computes on the CPU, the trainer runs, and a
head step keeps every tensor on the device (nothing made on the host and copied over).

Every test here is marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` selects
them; ``make gpu-check`` runs them). ``PFC_CUDA_TESTS_DEVICE=cpu`` runs the same code with the
CPU standing in for the GPU: a dry run of the tests' own logic on a machine without one (the
placement checks are then trivially met).
"""
from __future__ import annotations

import dataclasses
import json
import os
import traceback
from collections import Counter

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pfc.head.margins import ArcFace
from pfc.head.partial_fc import PartialFC
from tests.reference import reference_loss, relative_error

DEVICE = os.environ.get("PFC_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# relative errors allowed against the float64 reference (bf16: GEMMs on bf16 operands, rounded updates)
LOSS_TOL = {"fp32": 1e-5, "bf16": 2e-2}
GRAD_TOL = {"fp32": 1e-4, "bf16": 6e-2}
STATE_TOL = {"fp32": 1e-5, "bf16": 2e-2}
NUM_CLASSES, DIM, BATCH = 777, 32, 24
aten = torch.ops.aten


class DevicePlacement(TorchDispatchMode):
    """Records, while active, every op that mixes host (CPU) and CUDA tensors and every copy of a
    host tensor to a CUDA device, by the innermost pfc source line that made it (``report()``).
    ``device_type`` names the accelerator (another one, e.g. "meta", checks this class itself)."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.mixed: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()

    @staticmethod
    def _site() -> str:
        frames = [frame for frame in traceback.extract_stack() if "/pfc/" in frame.filename]
        return f"{frames[-1].filename.split('/pfc/')[-1]}:{frames[-1].lineno}" if frames else "outside pfc"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        devices = {tensor.device.type for tensor in tensors}
        out = func(*args, **kwargs)
        if func is aten._to_copy.default and isinstance(out, torch.Tensor) \
                and args[0].device.type == "cpu" and out.device.type == self.device_type:
            self.uploads[f"{func} at {self._site()}"] += 1
        elif func in (aten.copy_.default, aten._copy_from.default) and args[1].device.type == "cpu" \
                and args[0].device.type == self.device_type:   # copy_(destination, source)
            self.uploads[f"{func} at {self._site()}"] += 1
        elif "cpu" in devices and self.device_type in devices:
            shapes = [(tuple(tensor.shape), tensor.device.type) for tensor in tensors]
            self.mixed[f"{func} {shapes} at {self._site()}"] += 1
        return out

    def report(self) -> str:
        lines = [f"{count} × upload {site}" for site, count in self.uploads.items()]
        lines += [f"{count} × mixed {site}" for site, count in self.mixed.items()]
        return "; ".join(lines) or "clean"


def _head(device, center_dtype, rate):
    options = {} if center_dtype == "fp32" else {"dtype": DTYPES[center_dtype]}
    head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(), sample_rate=rate, seed=5, device=device, **options)
    optimizer = head.optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4, update_in_backward=True)
    return head, optimizer


def _batch(device, step):
    """The same batch on every device: made on the host, handed to the device (the loader's
    hand-off), with labels on both shard edges."""
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, DIM, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    labels[:2] = torch.tensor([0, NUM_CLASSES - 1])
    return x.to(device).requires_grad_(), labels.to(device)


def _to_host(tensor):
    return None if tensor is None else tensor.detach().to("cpu", torch.float64)


def _train_steps(device, center_dtype, rate, steps=2, placement=None, initial=None):
    """``steps`` head steps (forward, backward with the update inside it, optimizer step) on
    ``device``; what each step saw and did, as float64 host tensors. ``placement``: a
    :class:`DevicePlacement` active over the steps (inputs are made outside it). ``initial``: the
    centers to start from (a GPU draws its initial centers differently from the CPU)."""
    head, optimizer = _head(device, center_dtype, rate)
    if initial is not None:
        with torch.no_grad():
            head.weight.copy_(initial.to(head.weight.dtype))
    initial = _to_host(head.weight)
    records = []
    for step in range(steps):
        head.set_iteration(step)
        if hasattr(head, "check_inputs"):   # as the trainer: the collective input check on the first step only
            head.check_inputs = step == 0
        before = _to_host(head.weight)
        x, labels = _batch(device, step)
        if placement is not None:
            with placement:
                loss = head(x, labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        else:
            loss = head(x, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        index, target = head.last_sample
        records.append(dict(loss=float(loss.detach()), x=_to_host(x), x_grad=_to_host(x.grad), weight_before=before,
                            index=None if index is None else index.cpu(), target=target.cpu()))
    momentum = optimizer.state[head.weight].get("momentum_buffer")
    return dict(steps=records, initial=initial, weight=_to_host(head.weight), momentum=_to_host(momentum),
                weight_device=head.weight.device, weight_dtype=head.weight.dtype)


def _reference(record):
    """Loss and feature gradient of one step in float64 over the centers the step sampled."""
    centers = record["weight_before"] if record["index"] is None else record["weight_before"][record["index"]]
    x = record["x"].clone().requires_grad_()
    loss = reference_loss(x, record["target"], centers, ArcFace())
    loss.backward()
    return float(loss.detach()), x.grad


@pytest.mark.parametrize("center_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_head_steps_on_cuda_match_the_cpu_and_the_float64_reference(center_dtype, rate):
    on_device = _train_steps(DEVICE, center_dtype, rate)
    assert on_device["weight_device"].type == torch.device(DEVICE).type
    assert on_device["weight_dtype"] == DTYPES[center_dtype]
    for record in on_device["steps"]:
        loss, x_grad = _reference(record)
        assert abs(record["loss"] - loss) <= LOSS_TOL[center_dtype] * abs(loss), (record["loss"], loss)
        assert relative_error(record["x_grad"], x_grad) <= GRAD_TOL[center_dtype]
    on_host = _train_steps("cpu", center_dtype, rate, initial=on_device["initial"])
    if rate == 1.0:  # the same classes on both devices: the whole state must agree
        for step_device, step_host in zip(on_device["steps"], on_host["steps"]):
            assert abs(step_device["loss"] - step_host["loss"]) <= LOSS_TOL[center_dtype] * abs(step_host["loss"])
            assert relative_error(step_device["x_grad"], step_host["x_grad"]) <= GRAD_TOL[center_dtype]
        assert relative_error(on_device["weight"], on_host["weight"]) <= STATE_TOL[center_dtype]
        assert relative_error(on_device["momentum"], on_host["momentum"]) <= STATE_TOL[center_dtype]
    else:  # the device draws its own sample: rows it never sampled are left exactly as they were
        sampled = torch.cat([record["index"] for record in on_device["steps"]]).unique()
        untouched = torch.ones(NUM_CLASSES, dtype=torch.bool)
        untouched[sampled] = False
        assert torch.equal(on_device["weight"][untouched], on_device["initial"][untouched])
        assert torch.count_nonzero(on_device["momentum"][untouched]) == 0
        for record in on_device["steps"]:
            positives = record["target"][record["target"] >= 0]
            assert positives.numel() == BATCH  # world size 1: every label is a sampled positive


@pytest.mark.parametrize("center_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_head_step_keeps_every_tensor_on_the_device(center_dtype, rate):
    placement = DevicePlacement()
    _train_steps(DEVICE, center_dtype, rate, steps=3, placement=placement)
    assert not placement.uploads and not placement.mixed, placement.report()


def test_head_construction_makes_its_state_on_the_device():
    placement = DevicePlacement()
    with placement:
        _head(DEVICE, "fp32", 0.3)
    assert not placement.uploads and not placement.mixed, placement.report()


def _center_dtype_field() -> bool:
    from pfc.train.config import HeadConfig

    return "center_dtype" in {field.name for field in dataclasses.fields(HeadConfig)}


@pytest.mark.parametrize("center_dtype", ["fp32", "bf16"])
def test_trainer_runs_a_few_steps_on_cuda(tmp_path, center_dtype):
    from pfc.train.loop import train
    from tests.train_fixtures import make_config, write_shards

    overrides = {"max_steps": 4, "grad_accumulation": 1, "sample_rate": 0.5}
    if center_dtype != "fp32":
        if not _center_dtype_field():
            pytest.skip("this trainer has no head.center_dtype")
        overrides["head.center_dtype"] = center_dtype
    config = make_config(write_shards(str(tmp_path / "shards")), str(tmp_path / "run"), **overrides)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(config)
    assert result.steps == 4 and result.stopped == ""
    assert torch.isfinite(torch.tensor(result.final_loss))
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    if DEVICE == "cuda":
        assert torch.cuda.max_memory_allocated() > 0  # the run computed on the device


def test_stochastic_rounding_on_the_device_keeps_every_nan_pattern():
    # the bf16 rounding repairs carried NaN patterns with clamp(rounded, min=x, max=rounded),
    # which relies on the device's clamp propagating a NaN bound
    from pfc.head.rounding import round_into

    patterns = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, -8388607, 0x7FC00000], dtype=torch.int32)
    values = torch.cat([patterns.view(torch.float32), torch.tensor([1.0, -2.5, float("inf"), -0.0])]).to(DEVICE)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for _ in range(20):
        out = round_into(torch.empty(values.shape, dtype=torch.bfloat16, device=DEVICE), values, "stochastic",
                         generator)
        assert torch.isnan(out[:5]).all()
        assert torch.equal(out[5:].float().cpu(), torch.tensor([1.0, -2.5, float("inf"), -0.0]))
        assert torch.signbit(out[8]).item()


def test_the_fused_center_update_skips_on_the_device():
    from pfc.head.optim import SparseRowSGD

    for dtype in (torch.float32, torch.bfloat16):
        param = torch.nn.Parameter(torch.randn(40, DIM, device=DEVICE).to(dtype))
        optimizer = SparseRowSGD([param], lr=0.1, momentum=0.9, weight_decay=5e-4)
        before = (param.detach().clone(), optimizer.state[param]["momentum_buffer"].clone())
        rows = torch.tensor([3, 17, 39], device=DEVICE)
        optimizer.update_rows(param, rows, torch.randn(3, DIM, device=DEVICE), skip=torch.tensor(True, device=DEVICE))
        assert torch.equal(param.detach(), before[0])
        assert torch.equal(optimizer.state[param]["momentum_buffer"], before[1])
        optimizer.update_rows(param, rows, torch.randn(3, DIM, device=DEVICE))
        assert not torch.equal(param.detach()[rows], before[0][rows])
        untouched = torch.ones(40, dtype=torch.bool, device=DEVICE)
        untouched[rows] = False
        assert torch.equal(param.detach()[untouched], before[0][untouched])


def _kernels_step(kernels, center_dtype, logits):
    """Two sampled steps of a head with MHE and the inter-class filter, the update inside the
    backward, on the given kernels; what they produced, on the host."""
    from pfc.head.regularizers import MHE

    head = PartialFC(NUM_CLASSES, DIM, margin=ArcFace(s=30.0, m=0.5), sample_rate=0.5, seed=5, device=DEVICE,
                     dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[center_dtype],
                     mhe=MHE(weight=0.1), interclass_filter=0.2, logits=logits, kernels=kernels, chunk_rows=100)
    optimizer = head.optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4, update_in_backward=True, rounding="nearest")
    losses, grads = [], []
    for step in range(2):
        head.set_iteration(step)
        x, labels = _batch(DEVICE, step)
        loss = head(x, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        grads.append(_to_host(x.grad))
    return dict(losses=losses, grads=grads, weight=_to_host(head.weight), kernels=head.kernels)


def _triton_runs_here() -> bool:
    from pfc.head.kernels import triton_available, triton_interpreted

    return triton_available() and (DEVICE == "cuda" or triton_interpreted())


@pytest.mark.parametrize("center_dtype", ["fp32", "bf16", "fp16"])
def test_triton_softmax_kernels_follow_the_torch_path_on_the_device(center_dtype):
    if not _triton_runs_here():
        pytest.skip("triton does not run here (on the CPU stand-in it needs TRITON_INTERPRET=1)")
    reference = _kernels_step("torch", center_dtype, "keep")
    tolerance = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}[center_dtype]   # narrow: the gradient block is rounded
    for logits in ("keep", "recompute"):
        got = _kernels_step("triton", center_dtype, logits)
        assert got["kernels"] == "triton"
        assert got["losses"] == pytest.approx(reference["losses"], rel=tolerance)
        assert all(relative_error(a, b) <= tolerance for a, b in zip(got["grads"], reference["grads"]))
        assert relative_error(got["weight"], reference["weight"]) <= tolerance
    # recomputing rebuilds the kept logits bit for bit (no FMA in the kernels); on a GPU the
    # recomputed GEMM may take another cuBLAS algorithm (its output is a scratch block, not a
    # slice of the kept logits), so there only closeness is asserted
    kept, recomputed = _kernels_step("triton", center_dtype, "keep"), _kernels_step("triton", center_dtype, "recompute")
    if DEVICE == "cpu":
        assert kept["losses"] == recomputed["losses"] and torch.equal(kept["weight"], recomputed["weight"])
    else:
        assert relative_error(recomputed["weight"], kept["weight"]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_output_addmm_accumulates_narrow_operands_into_its_input(dtype):
    if DEVICE == "cpu":
        pytest.skip("addmm(out_dtype=float32) has no CPU kernel: the CPU path upcasts instead")
    from pfc.head.gemm import StorageGemm
    from pfc.head.scratch import ScratchBlocks

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(64, 300, device=DEVICE, generator=generator).to(dtype)
    b = torch.randn(300, 48, device=DEVICE, generator=generator).to(dtype)
    out = torch.randn(64, 48, device=DEVICE, generator=generator)
    expected = out + torch.mm(a, b, out_dtype=torch.float32)
    StorageGemm(dtype, DEVICE, ScratchBlocks()).addmm_(out, a, b)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_gpu_sized_chunks_on_the_device():
    from pfc.head.chunking import CPU_CHUNK_ROWS, auto_chunk_rows

    head = PartialFC(NUM_CLASSES, DIM, device=DEVICE)
    head(*_batch(DEVICE, 0))
    expected = CPU_CHUNK_ROWS if DEVICE == "cpu" else auto_chunk_rows(DEVICE, BATCH, DIM, torch.float32)
    assert head.last_chunk_rows == expected and (DEVICE == "cpu" or expected > CPU_CHUNK_ROWS)


def test_the_sampler_gives_the_cpu_sample_on_the_device_with_either_kernels():
    """The O(S) sampler at a 29M-class, 8-GPU job's shard (C_r = 3,625,000, S = 362,500,
    B = 1,024): the torch ops and the Triton kernel on the device draw the CPU's rows bit for bit."""
    from pfc.head.kernels import triton_available
    from pfc.head.sampling import sample_classes

    num_local, key = 3_625_000, 2**64 - 1
    labels = torch.randint(0, 2 * num_local, (1_024,), generator=torch.Generator().manual_seed(0))
    expected = sample_classes(labels, 0, num_local, 0.1, key)
    kernel_names = ["torch"] + (["triton"] if DEVICE == "cuda" and triton_available() else [])
    for kernels in kernel_names:
        index, target = sample_classes(labels.to(DEVICE), 0, num_local, 0.1, key, kernels=kernels)
        assert index.device.type == torch.device(DEVICE).type
        assert torch.equal(index.cpu(), expected[0]) and torch.equal(target.cpu(), expected[1]), kernels
