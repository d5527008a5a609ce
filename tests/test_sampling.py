"""The Partial-FC sampler: exact count, every positive, uniform without replacement, O(S), the
same bits from the torch ops and the Triton kernel, no host sync."""
import math
import sys

import pytest
import torch

import pfc.head.sampling as sampling
from pfc.head.margins import ArcFace
from pfc.head.sampling import permutation_key, sample_classes, sample_size, swap_or_not
from pfc.head.softmax import sharded_margin_softmax
from pfc.host_syncs import HostSyncCounter
from tests.triton_interpret import triton_interpreter  # noqa: F401  (a fixture)

# the statistical tests' false-alarm rate per statistic (their keys are fixed: they pass or fail
# deterministically; a correct sampler fails one of the six statistics with probability < 6e-4)
FALSE_ALARM = 1e-4


def _check_sample(labels, class_start, num_local, rate, key):
    index, target = sample_classes(labels, class_start, num_local, rate, key)
    local = labels - class_start
    owned = (local >= 0) & (local < num_local)
    assert index.dtype == torch.int64 and index.numel() == sample_size(rate, num_local, labels.numel())
    assert torch.equal(index, index.unique()), "sorted and distinct"
    assert 0 <= int(index.min()) and int(index.max()) < num_local
    assert torch.equal(index[target[owned]], local[owned]), "every positive kept, its target is its position"
    assert bool((target[~owned] == -1).all())
    return index


@pytest.mark.parametrize("num_local, rate, labels", [
    (1_000, 0.1, [3, 3, 7, 950, 12, 400_000]),          # duplicates, a label owned elsewhere
    (20, 0.1, [3, 3, 10, 12, 40]),                       # the sample is B = 5 > ⌈ρ·C_r⌉ = 2
    (20, 0.1, list(range(2, 7))),                        # only positives: S = P
    (100, 0.5, [150, 151]),                              # no positive at all
    (50, 0.3, [2, 51, 2, 51, 2]),                        # the shard's first and last class
    (3, 0.5, [2]),                                       # a tiny shard
])
def test_sample_has_the_static_size_every_positive_and_distinct_sorted_rows(num_local, rate, labels):
    for key in (0, 1, 2**63 - 1, 2**64 - 1):
        _check_sample(torch.tensor(labels), 2, num_local, rate, key)


def test_int32_labels_and_an_empty_batch():
    index = _check_sample(torch.tensor([5, 9, 9], dtype=torch.int32), 0, 200, 0.1, 3)
    assert index.numel() == 20
    index, target = sample_classes(torch.empty(0, dtype=torch.int64), 0, 200, 0.1, 3)
    assert index.numel() == 20 and torch.equal(index, index.unique()) and target.numel() == 0


def test_swap_or_not_is_a_permutation_of_any_domain_size():
    for domain in (1, 2, 3, 17, 256, 1_009, 4_096):
        for key in (0, 12_345, 2**63 - 1):
            values = swap_or_not(domain, domain, key, "cpu")
            assert torch.equal(values.sort().values, torch.arange(domain, dtype=torch.int32)), (domain, key)
    with pytest.raises(ValueError, match="key 9223372036854775808 outside"):
        swap_or_not(3, 10, 2**63, "cpu")
    with pytest.raises(ValueError, match="count 11 outside"):
        swap_or_not(11, 10, 1, "cpu")
    with pytest.raises(ValueError, match="kernels='auto' is not 'torch' or 'triton'"):
        swap_or_not(3, 10, 1, "cpu", kernels="auto")
    with pytest.raises(ValueError, match=r"domain 2147483648 outside \[1, 2\^31\)"):
        swap_or_not(10, 2**31, 1, "cpu")


def test_sample_is_a_function_of_the_key_and_differs_between_keys_and_ranks():
    labels = torch.tensor([4, 100, 100, 333, 870])
    first = sample_classes(labels, 0, 500, 0.1, key=77)[0]
    assert torch.equal(first, sample_classes(labels.clone(), 0, 500, 0.1, key=77)[0])
    assert not torch.equal(first, sample_classes(labels, 0, 500, 0.1, key=78)[0])
    # two ranks with equal shard sizes (classes [0, 500) and [500, 1000)) draw different local rows
    second = sample_classes(labels, 500, 500, 0.1, key=77)[0]
    assert not torch.equal(first, second)
    assert permutation_key(77, 0) != permutation_key(77, 500)


def test_a_shard_draws_the_same_rows_whatever_labels_the_other_ranks_own():
    """What a rank draws depends on its shard, the key and its own positives only (the labels'
    count fixes S), whatever the other shards hold."""
    elsewhere_a = torch.tensor([510, 777, 3, 999, 1_500])
    elsewhere_b = torch.tensor([510, 777, 400, 999, 2_000])
    a = sample_classes(elsewhere_a, 500, 500, 0.1, key=5)[0]
    assert torch.equal(a, sample_classes(elsewhere_b, 500, 500, 0.1, key=5)[0])


def test_the_sample_on_the_meta_device_has_the_same_shapes():
    labels = torch.tensor([3, 3, 7, 950, 12, 400_000])
    index, target = sample_classes(labels, 0, 1_000, 0.1, key=9)
    meta_index, meta_target = sample_classes(labels.to("meta"), 0, 1_000, 0.1, key=9)
    assert meta_index.device.type == "meta"
    assert (meta_index.shape, meta_index.dtype, meta_target.shape) == (index.shape, index.dtype, target.shape)


def test_sampling_reads_no_tensor_value_on_the_host():
    labels = torch.randint(0, 10_000, (256,), generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as counter:
        sample_classes(labels, 2_500, 2_500, 0.1, key=11)
    assert counter.count == 0, counter.report()


def _uniformity(num_local, rate, positives, keys):
    """p-values of three statistics over ``keys`` independent keys: the chi-square of every
    non-positive class's inclusion count against (S − P)/(C_r − P), and two-sided z-tests of the
    number of included pairs (c, c+1) (neighbours) and (c, C−1−c) (mirror images) per sample
    against the without-replacement value."""
    labels = torch.tensor(positives)
    num_positives = labels.unique().numel()
    count = sample_size(rate, num_local, labels.numel())
    included = torch.zeros(keys, num_local, dtype=torch.bool)
    for key in range(keys):
        included[key, sample_classes(labels, 0, num_local, rate, key=1_000 + key)[0]] = True
    negatives = torch.ones(num_local, dtype=torch.bool)
    negatives[labels] = False
    assert bool(included[:, ~negatives].all())
    x = included[:, negatives].double()
    m = x.shape[1]
    f = (count - num_positives) / m
    # Cov(counts) = keys·f(1−f)·m/(m−1)·(I − 11ᵀ/m): the scaled statistic is χ² with m − 1 dof
    statistic = ((x.sum(0) - keys * f) ** 2).sum() / (keys * f * (1 - f)) * (m - 1) / m
    p_values = {"inclusion": float(torch.special.gammaincc(torch.tensor((m - 1) / 2, dtype=torch.float64),
                                                           statistic / 2))}
    both = f * (count - num_positives - 1) / (m - 1)
    for name, pairs in (("neighbours", x[:, :-1] * x[:, 1:]), ("mirror", x * x.flip(1))):
        per_sample = pairs.sum(1)
        z = (per_sample.mean() - pairs.shape[1] * both) / (per_sample.std() / math.sqrt(keys))
        p_values[name] = math.erfc(abs(float(z)) / math.sqrt(2))
    return p_values


UNIFORMITY_CASES = [(1_000, 0.1, [5, 5, 17, 999, 600], 500), (300, 0.5, [1, 2, 3], 250)]


@pytest.mark.parametrize("num_local, rate, positives, keys", UNIFORMITY_CASES)
def test_inclusion_is_uniform_and_neighbours_uncorrelated(num_local, rate, positives, keys):
    p_values = _uniformity(num_local, rate, positives, keys)
    assert min(p_values.values()) > FALSE_ALARM, p_values


def test_the_uniformity_statistics_catch_a_shuffle_with_too_few_rounds(monkeypatch):
    monkeypatch.setattr(sampling, "swap_or_not_rounds", lambda domain: 4)
    p_values = _uniformity(*UNIFORMITY_CASES[0])
    assert p_values["inclusion"] < FALSE_ALARM and p_values["neighbours"] < FALSE_ALARM, p_values


def test_the_triton_kernel_gives_the_torch_bits_in_the_interpreter(triton_interpreter):
    # a full permutation at the largest key, and the largest domain (int32 arithmetic at its edge)
    for domain, count, key in ((20, 7, 5), (1_009, 1_009, 2**63 - 1), (2**31 - 1, 1_000, 2**62 + 7)):
        torch_values = swap_or_not(count, domain, key, "cpu")
        assert torch.equal(torch_values, swap_or_not(count, domain, key, "cpu", kernels="triton")), (domain, key)
    labels = torch.tensor([3, 3, 7, 950, 12, 400_000])
    by_torch = sample_classes(labels, 0, 1_000, 0.1, 2**64 - 1)
    by_triton = sample_classes(labels, 0, 1_000, 0.1, 2**64 - 1, kernels="triton")
    assert all(torch.equal(a, b) for a, b in zip(by_torch, by_triton))


def test_the_triton_kernel_compiles_for_an_h100_without_one(monkeypatch):
    """The compiler's front end checks what the interpreter does not (globals must be constexpr,
    the types of scalars): compile the kernel for sm_90 ahead of time, no GPU needed."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")   # its default, without the warning (no floats here)
    monkeypatch.delitem(sys.modules, "pfc.head.kernels.permutation_triton", raising=False)
    try:
        from pfc.head.kernels.permutation_triton import _swap_or_not_kernel

        for key_type in ("i32", "i64"):
            signature = {"out_ptr": "*i32", "count": "i32", "domain": "i32", "key": key_type, "rounds": "i32",
                         "BLOCK": "constexpr"}
            compiled = triton.compile(ASTSource(fn=_swap_or_not_kernel, signature=signature,
                                                constexprs={"BLOCK": 1024}), target=GPUTarget("cuda", 90, 32))
            assert "nsw" not in compiled.asm["ttir"]   # wrapping integer arithmetic, as torch's
    finally:
        sys.modules.pop("pfc.head.kernels.permutation_triton", None)


def test_an_empty_sample_is_refused_by_name():
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match="no class centers"):
        sharded_margin_softmax(features, torch.empty(0, 8), torch.empty(0, dtype=torch.int64),
                               torch.full((4,), -1), ArcFace())
