"""A loader started at batch N of an epoch yields exactly the batches N, N+1, … of the loader
started at 0 (pixels, labels, flips), at world sizes 1 and 2, with 0, 2 and 3 workers, with and
without corrupt data, and decodes nothing before N."""
import os

import numpy as np
import pytest
import simplejpeg
import torch
import webdataset

from pfc.data import make_loader
from pfc.data import tarstream
from pfc.data.plan import epoch_shard_order, resumed_role, window_batches, worker_range
from tests.data_fixtures import jpeg, write_shard_set

SHARD_SIZES = [13, 7, 20, 1, 20]     # 61 samples: no shard size divides the windows evenly
BATCH, WINDOW = 3, 6                 # shuffle windows of 2 batches: several per worker
SEED, EPOCH = 5, 1


def _write(root: str, damaged: bool) -> str:
    """16x16 noise images, one class per sample (labels name samples); ``damaged``: a garbage
    JPEG, a non-integer label, a missing label and the largest shard cut in its middle."""
    rng = np.random.default_rng(7)
    shards, label = [], 0
    for size in SHARD_SIZES:
        samples = []
        for _ in range(size):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            samples.append((f"{label:05d}", {"jpg": jpeg(pixels), "cls": str(label).encode()}))
            label += 1
        shards.append(samples)
    if damaged:
        shards[0][3] = ("00003", {"jpg": b"\xff\xd8 garbage", "cls": b"3"})
        shards[2][5] = ("00025", {"jpg": shards[2][5][1]["jpg"], "cls": b"five"})
        shards[4][0] = ("00041", {"jpg": shards[4][0][1]["jpg"]})
    names = write_shard_set(root, shards, num_classes=label, size=(16, 16))
    if damaged:
        path = os.path.join(root, names[2])
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2 + 100])
    return root


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"clean": _write(str(root / "clean"), False), "damaged": _write(str(root / "damaged"), True)}


def _batches(root, world_size, rank, workers, start_batch=0):
    loader = make_loader(root, BATCH, rank, world_size, workers, seed=SEED, epoch=EPOCH, augment=True,
                         shuffle_buffer_size=WINDOW, start_batch=start_batch)
    batches = [(images.clone(), labels.clone()) for images, labels in loader]
    assert len(batches) == len(loader) == loader.epoch_batches - start_batch
    return batches, loader.stats["skipped"]


def _window_starts_at_shard_boundary(start_batch, world_size, rank):
    """Whether a one-worker loader resumed at ``start_batch`` starts reading at a shard's first sample."""
    batches = sum(SHARD_SIZES) // (world_size * BATCH)
    start, _ = worker_range(rank, 0, 1, batches, BATCH)
    per_window = window_batches(WINDOW, BATCH)
    position = start + start_batch // per_window * per_window * BATCH
    order = epoch_shard_order(len(SHARD_SIZES), SEED, EPOCH)
    return position in np.cumsum([0] + [SHARD_SIZES[i] for i in order]).tolist()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")   # 3 workers on a 2-core machine
@pytest.mark.parametrize("data", ["clean", "damaged"])
@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 0), (1, 2), (2, 2), (1, 3)])
def test_resumed_loader_yields_exactly_the_tail_of_the_epoch(shard_sets, data, world_size, workers):
    root = shard_sets[data]
    boundaries = set()
    for rank in range(world_size):
        full, skipped = _batches(root, world_size, rank, workers)
        count = len(full)
        assert (skipped > 0) == (data == "damaged")
        if workers == 0:   # one worker role: every start position, shard boundaries included
            starts = range(count + 1)
            boundaries |= {n for n in starts if 0 < n < count and _window_starts_at_shard_boundary(n, world_size, rank)}
        else:              # 0, each worker's first batch (a rotation of the roles), a window boundary, the end
            starts = sorted({0, 1, workers - 1, workers * window_batches(WINDOW, BATCH) + 1, count // 2,
                             count - 1, count})
        for start in starts:
            resumed, _ = _batches(root, world_size, rank, workers, start)
            assert len(resumed) == count - start
            for (images, labels), (want_images, want_labels) in zip(resumed, full[start:]):
                assert torch.equal(labels, want_labels), (rank, start)
                assert torch.equal(images, want_images), (rank, start)
    assert workers or boundaries, "no start position where the resumed read begins at a shard boundary"


def test_resume_roles_keep_the_dataloader_order():
    # the rank's batch i is local batch i // W of worker i % W; resumed at N, DataLoader worker k
    # (served k-th in every round) plays the worker of batch N + k
    for num_workers in (1, 2, 3):
        for start in range(10):
            roles = [resumed_role(start, num_workers, k) for k in range(num_workers)]
            assert [worker + first * num_workers for worker, first in roles] == list(range(start, start + num_workers))


def test_resume_decodes_nothing_and_opens_no_shard_before_its_position(shard_sets, monkeypatch):
    root = shard_sets["clean"]
    decoded, opened, read = [], [], []
    decode, gopen, samples = simplejpeg.decode_jpeg, webdataset.gopen, tarstream.iter_indexed_samples

    def counting_samples(*args, **kwargs):
        for item in samples(*args, **kwargs):
            read.append(item[1]["__key__"])
            yield item

    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    monkeypatch.setattr(webdataset, "gopen", lambda url, *a, **k: opened.append(os.path.basename(url)) or gopen(url, *a, **k))
    monkeypatch.setattr(tarstream, "iter_indexed_samples", counting_samples)
    full, _ = _batches(root, 1, 0, 0)
    assert len(decoded) == len(read) == 20 * BATCH and len(opened) == 5
    per_window = window_batches(WINDOW, BATCH)
    order = epoch_shard_order(len(SHARD_SIZES), SEED, EPOCH)
    offsets = np.cumsum([0] + [SHARD_SIZES[i] for i in order]).tolist()
    for start in (13, 17, 19):   # inside a window of a later shard (the second batch of its window)
        decoded.clear(), opened.clear(), read.clear()
        resumed, _ = _batches(root, 1, 0, 0, start)
        assert len(decoded) == len(read) == (20 - start) * BATCH   # not one sample of an earlier batch read
        first_read = start // per_window * per_window * BATCH
        shards_before = [f"shard-{order[k]:06d}.tar" for k in range(len(order)) if offsets[k + 1] <= first_read]
        assert shards_before and not set(opened) & set(shards_before)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[start:]))


def test_start_batch_outside_the_epoch_is_refused(shard_sets):
    loader = make_loader(shard_sets["clean"], BATCH, 1, 2, 0, seed=SEED, epoch=EPOCH, start_batch=10)
    assert len(loader) == 0 and loader.epoch_batches == 10 and list(loader) == []
    with pytest.raises(ValueError, match=r"start_batch 11 outside \[0, 10\]"):
        make_loader(shard_sets["clean"], BATCH, 1, 2, 0, seed=SEED, epoch=EPOCH, start_batch=11)
