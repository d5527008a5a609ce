"""The loader: equal batch counts for any shard layout, disjoint ranks, reshuffle, flips, corrupt
samples, manifest errors; the multi-rank checks run on real gloo ranks with 2 workers each."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from pfc.data import make_loader
from pfc.data.manifest import image_side, manifest_source, read_manifest
from pfc.data.plan import batches_per_rank, epoch_shard_order, shard_pieces, worker_range
from pfc.errors import DataError
from tests.data_fixtures import jpeg, random_image, unique_label_shards, write_shard_set
from tests.distributed import run_ranks


# ------------------------------------------------------------------------------------ the epoch plan

def test_shard_pieces_cover_ranges_cyclically():
    counts = [3, 0, 5, 2]
    assert shard_pieces(counts, 0, 10) == [(0, 0, 3), (2, 0, 5), (3, 0, 2)]
    assert shard_pieces(counts, 4, 3) == [(2, 1, 3)]
    assert shard_pieces(counts, 8, 5) == [(3, 0, 2), (0, 0, 3)]   # wraps around
    assert shard_pieces(counts, 7, 10) == [(2, 4, 1), (3, 0, 2), (0, 0, 3), (2, 0, 4)]


@pytest.mark.parametrize("total,world_size,num_workers,batch_size",
                         [(26, 2, 2, 3), (100, 3, 4, 7), (9, 2, 3, 2), (1000, 8, 3, 16), (5, 1, 4, 1)])
def test_worker_ranges_are_disjoint_whole_batches_and_equal_per_rank(total, world_size, num_workers, batch_size):
    batches = batches_per_rank(total, batch_size, world_size)
    seen = np.zeros(total, dtype=int)
    for rank in range(world_size):
        rank_samples = 0
        for worker in range(num_workers):
            start, count = worker_range(rank, worker, num_workers, batches, batch_size)
            assert count % batch_size == 0
            seen[start:start + count] += 1
            rank_samples += count
        assert rank_samples == batches * batch_size
    assert seen.max() == 1 and seen.sum() == world_size * batches * batch_size
    assert total - seen.sum() < world_size * batch_size


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_shard_order(50, 1, 2) == epoch_shard_order(50, 1, 2)
    assert epoch_shard_order(50, 1, 2) != epoch_shard_order(50, 1, 3)
    assert epoch_shard_order(50, 1, 2) != epoch_shard_order(50, 2, 2)
    assert sorted(epoch_shard_order(50, 1, 2)) == list(range(50))


# ------------------------------------------------------------------------------------ on real ranks

def _damaged_set(root):
    """4 shards, 24 samples in the manifest: a garbage JPEG, a non-integer label, a missing .cls,
    a wrong-size image, and a tar cut in the middle (its later samples are lost)."""
    rng = np.random.default_rng(1)
    good = jpeg(random_image(rng))
    shards = [[(f"{s}{i:03d}", {"jpg": good, "cls": str(i % 5).encode()}) for i in range(6)] for s in "abcd"]
    shards[0][1] = ("a001", {"jpg": b"\xff\xd8 garbage", "cls": b"1"})
    shards[1][2] = ("b002", {"jpg": good, "cls": b"seven"})
    shards[1][3] = ("b003", {"jpg": good})
    shards[2][4] = ("c004", {"jpg": jpeg(random_image(rng, 64, 64)), "cls": b"2"})
    names = write_shard_set(root, shards, num_classes=5)
    path = os.path.join(root, names[3])
    data = open(path, "rb").read()
    with open(path, "wb") as stream:
        stream.write(data[: len(data) // 2 + 100])


def _rank_epochs(rank, world_size, roots):
    import multiprocessing

    # tests/distributed.py starts ranks as daemonic *spawned* processes: daemons may not start
    # DataLoader workers, and spawned ones inherit the spawn start method (each worker would
    # re-import torch, seconds apiece). Under torchrun, ranks are ordinary processes that fork
    # their workers (the Linux default), which is what this restores. The harness still reaps us.
    multiprocessing.current_process()._config["daemon"] = False
    multiprocessing.set_start_method("fork", force=True)
    results = {}
    for name, root, batch_size in roots:
        per_epoch = []
        for epoch in (0, 1):
            loader = make_loader(root, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=2,
                                 seed=3, epoch=epoch, augment=False)
            labels, shapes = [], set()
            for images, batch_labels in loader:
                shapes.add((tuple(images.shape), images.dtype, tuple(batch_labels.shape), batch_labels.dtype))
                labels.append(batch_labels.tolist())
            per_epoch.append({"len": len(loader), "labels": labels, "shapes": shapes,
                              "skipped": loader.stats["skipped"]})
        # the same number of batches is what keeps collectives from hanging: prove it with one
        torch.distributed.all_reduce(torch.ones(1))
        results[name] = per_epoch
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    unique_label_shards(str(root / "five"), [7, 3, 9, 1, 6])      # 26 samples, 5 shards for 2x2 slots
    unique_label_shards(str(root / "three"), [4, 4, 4], seed=1)   # 3 shards for 4 slots (the webdataset trap)
    _damaged_set(str(root / "damaged"))
    roots = [("five", str(root / "five"), 3), ("three", str(root / "three"), 2),
             ("damaged", str(root / "damaged"), 4)]
    return run_ranks(_rank_epochs, 2, roots, timeout=120)


@pytest.mark.parametrize("name,total,batch_size", [("five", 26, 3), ("three", 12, 2)])
def test_ranks_get_equal_batches_and_disjoint_samples(rank_results, name, total, batch_size):
    batches = total // (2 * batch_size)
    epochs = [[rank_results[rank][name][epoch] for rank in range(2)] for epoch in range(2)]
    for per_rank in epochs:
        seen = []
        for result in per_rank:
            assert result["len"] == batches == len(result["labels"])
            assert result["shapes"] == {((batch_size, 3, 112, 112), torch.float32, (batch_size,), torch.int64)}
            seen += [label for batch in result["labels"] for label in batch]
        assert len(seen) == len(set(seen)) == 2 * batches * batch_size   # no sample on two ranks or twice
    order = [[rank_results[rank][name][epoch]["labels"] for rank in range(2)] for epoch in range(2)]
    assert order[0] != order[1]   # reshuffled between epochs


def test_corrupt_samples_are_skipped_counted_and_counts_stay_equal(rank_results):
    for epoch in range(2):
        per_rank = [rank_results[rank]["damaged"][epoch] for rank in range(2)]
        assert [r["len"] for r in per_rank] == [3, 3]   # 24 // (2 x 4)
        assert [len(r["labels"]) for r in per_rank] == [3, 3]
        assert all(0 <= label < 5 for r in per_rank for batch in r["labels"] for label in batch)
        # 4 bad samples and at least one tar error are met somewhere by some rank every epoch
        assert sum(r["skipped"] for r in per_rank) >= 4


# ------------------------------------------------------------------------------------ one process

@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """20 samples, each its own class, with asymmetric images (so flips can be seen), 3 shards."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(2)
    images = {}
    shards = [[], [], []]
    for index in range(20):
        pixels = random_image(rng).copy()
        pixels[:, :20] = 255   # bright left band: a flip moves it right
        encoded = jpeg(pixels)
        images[index] = encoded
        shards[index % 3].append((f"{index:04d}", {"jpg": encoded, "cls": str(index).encode()}))
    write_shard_set(str(root), shards, num_classes=20)
    return str(root), images


def test_loader_values_determinism_and_flips(small_set):
    import simplejpeg

    root, images = small_set
    plain = list(make_loader(root, 4, 0, 1, 0, seed=0, epoch=0, augment=False, device="cpu"))
    assert len(plain) == 5
    assert plain[0][0].shape == (4, 3, 112, 112) and plain[0][0].is_contiguous(memory_format=torch.channels_last)
    for batch, labels in plain:
        assert batch.min() >= -1 and batch.max() <= 1
        for image, label in zip(batch, labels):
            expected = torch.from_numpy(simplejpeg.decode_jpeg(images[int(label)])).permute(2, 0, 1) / 127.5 - 1
            assert torch.allclose(image, expected, atol=1e-6)
    again = list(make_loader(root, 4, 0, 1, 0, seed=0, epoch=0, augment=False))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, again))
    flipped = list(make_loader(root, 4, 0, 1, 2, seed=0, epoch=0, augment=True))
    left_bright = torch.cat([batch[:, :, :, :20].mean((1, 2, 3)) > 0.9 for batch, _ in flipped])
    right_bright = torch.cat([batch[:, :, :, -20:].mean((1, 2, 3)) > 0.9 for batch, _ in flipped])
    assert bool((left_bright ^ right_bright).all()) and 0 < int(right_bright.sum()) < 20


def test_damaged_data_still_fills_every_batch_and_all_bad_is_an_error(tmp_path):
    _damaged_set(str(tmp_path / "damaged"))   # 24 in the manifest, only 17 readable
    loader = make_loader(str(tmp_path / "damaged"), 4, 0, 1, 0, seed=0, epoch=0)
    assert len(loader) == 6 and sum(len(labels) for _, labels in loader) == 24
    assert loader.stats["skipped"] >= 5
    write_shard_set(str(tmp_path / "bad"), [[(f"{i}", {"jpg": b"junk", "cls": b"0"}) for i in range(4)]],
                    num_classes=1)
    with pytest.raises(DataError, match="no readable sample in the whole dataset"):
        list(make_loader(str(tmp_path / "bad"), 2, 0, 1, 0, seed=0, epoch=0))


def test_label_outside_num_classes_is_an_error(tmp_path):
    encoded = jpeg(random_image(np.random.default_rng(0)))
    write_shard_set(str(tmp_path), [[(f"{i}", {"jpg": encoded, "cls": str(i).encode()}) for i in range(4)]],
                    num_classes=3)
    with pytest.raises(DataError, match=r"label 3 outside \[0, 3\)"):
        list(make_loader(str(tmp_path), 2, 0, 1, 0, seed=0, epoch=0))


def test_manifest_and_argument_errors(tmp_path, small_set):
    root, _ = small_set
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(str(tmp_path / "bad.json"))
    manifest = read_manifest(root)
    assert manifest["num_samples"] == 20 and read_manifest(os.path.join(root, "dataset.json")) == manifest

    def broken(**change):
        path = tmp_path / "m.json"
        path.write_text(json.dumps({**manifest, **change}))
        return str(path)

    with pytest.raises(DataError, match="shard list is empty"):
        read_manifest(broken(shards=[]))
    with pytest.raises(DataError, match="shards hold 20 samples but num_samples is 21"):
        read_manifest(broken(num_samples=21))
    with pytest.raises(DataError, match="format"):
        read_manifest(broken(format="other"))
    with pytest.raises(DataError, match="shard .*missing.tar listed in the manifest does not exist"):
        make_loader(broken(shards=[{"name": "missing.tar", "num_samples": 20}]), 2, 0, 1, 0, 0, 0)
    with pytest.raises(DataError, match="allow_pipe=True"):
        make_loader(broken(shards=[{"name": "pipe:cat x.tar", "num_samples": 20}]), 2, 0, 1, 0, 0, 0)
    with pytest.raises(DataError, match="fewer than one batch"):
        make_loader(root, 11, 0, 2, 0, 0, 0)
    # a caller's bad arguments are a plain ValueError (a bug, with its traceback), not a DataError
    for arguments, message in (((2, 2, 2), r"rank 2 outside \[0, 2\)"), ((0, 0, 1), "batch_size must be an integer >= 1")):
        with pytest.raises(ValueError, match=message) as caught:
            make_loader(root, *arguments, 0, 0, 0)
        assert not isinstance(caught.value, DataError)


def test_manifest_tells_image_side_and_where_it_is(tmp_path, small_set):
    root, _ = small_set
    manifest = read_manifest(root)
    assert image_side(manifest) == 112
    with pytest.raises(DataError, match=r"image_size \[112, 96\] is not square"):
        image_side({**manifest, "image_size": [112, 96]})
    assert manifest_source(root) == os.path.join(root, "dataset.json")
    assert manifest_source(os.path.join(root, "dataset.json")) == os.path.join(root, "dataset.json")
    assert manifest_source("https://host/shards/") == "https://host/shards/dataset.json"
    assert manifest_source("s3://bucket/set/other.json") == "s3://bucket/set/other.json"


def test_pipe_urls_run_only_when_allowed(tmp_path, small_set):
    root, _ = small_set
    manifest = read_manifest(root)
    manifest["shards"] = [{"name": f"pipe:cat {os.path.join(root, s['name'])}", "num_samples": s["num_samples"]}
                          for s in manifest["shards"]]
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    loader = make_loader(str(tmp_path), 4, 0, 1, 0, seed=0, epoch=0, allow_pipe=True)
    assert sum(1 for _ in loader) == 5 == len(loader) and loader.stats["skipped"] == 0


# ------------------------------------------------------------------------------------ tar reader

def test_tar_reader_matches_tarfile_including_pax_and_long_names(tmp_path):
    from pfc.data.tarstream import TarDamage, iter_samples

    assert issubclass(TarDamage, DataError)   # a damaged shard is the user's data, printed as one line
    path = str(tmp_path / "mixed.tar")
    members = [("a/k1.jpg", b"x" * 700), ("a/k1.cls", b"3"), ("k2.jpg", b""), ("k2.cls", b"4"),
               ("d" * 120 + "/k3.jpg", b"long name"), ("k4.seg.png", "ünï".encode()), ("k4.cls", b"5")]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        with tarfile.open(path, "w", format=fmt) as archive:
            folder = tarfile.TarInfo("a")
            folder.type = tarfile.DIRTYPE   # a non-file entry, skipped
            archive.addfile(folder)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 1.5   # float mtime: PAX writes a pax header per member
                archive.addfile(info, io.BytesIO(data))
        with open(path, "rb") as stream:
            samples = list(iter_samples(stream, "u"))
        assert [s["__key__"] for s in samples] == ["a/k1", "k2", "d" * 120 + "/k3", "k4"]
        assert samples[0]["jpg"] == b"x" * 700 and samples[1] == {"__key__": "k2", "__url__": "u", "jpg": b"", "cls": b"4"}
        assert samples[3]["seg.png"] == "ünï".encode()
        with open(path, "rb") as stream:
            assert [s["__key__"] for s in iter_samples(stream, "u", skip=2)] == ["d" * 120 + "/k3", "k4"]
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 700):
        with pytest.raises(TarDamage):
            list(iter_samples(io.BytesIO(data[:cut]), "u"))
    damaged = bytearray(data)
    damaged[257] ^= 1   # the magic
    with pytest.raises(TarDamage, match="checksum"):
        list(iter_samples(io.BytesIO(bytes(damaged)), "u"))
    damaged = bytearray(data)
    header = next(o for o in range(0, len(data), 512) if data[o:o + 9] == b"a/k1.jpg\0")
    damaged[header + 124:header + 136] = b"00000000077\0"   # a wrong size: the next header is off
    with pytest.raises(TarDamage):
        list(iter_samples(io.BytesIO(bytes(damaged)), "u"))


def test_shared_batch_buffers_are_sent_once_and_reused_only_after_release():
    from pfc.data.handoff import BatchBuffers, ReceivedBatches, release

    buffers, received = BatchBuffers((2, 4, 4, 3), shared=True, worker=1, keep=2), ReceivedBatches()
    first, handle = buffers.acquire()
    assert first.is_shared() and first.shape == (2, 4, 4, 3) and len(handle.new) == 1
    pixels, first_busy = received.open(handle)
    assert pixels.data_ptr() == first.data_ptr() and first_busy.item() == 1
    second, handle = buffers.acquire()   # the first is still busy: a new one
    assert second.data_ptr() != first.data_ptr()
    received.open(handle)
    release(first_busy)
    again, handle = buffers.acquire()   # reused, and named by its id only
    assert again.data_ptr() == first.data_ptr() and handle.new == [] and handle.buffer_id == 0
    assert received.open(handle)[0].data_ptr() == first.data_ptr() and first_busy.item() == 1
    # never released: after `keep` buffers the oldest is dropped (not overwritten), and the
    # consumer is told to forget it
    third, handle = buffers.acquire()
    assert third.data_ptr() not in (first.data_ptr(), second.data_ptr()) and handle.dropped == [0]
    received.open(handle)
    assert sorted(received.buffers) == [(1, 1), (1, 2)] and len(buffers.pool) == 2
    plain, handle = BatchBuffers((2, 4, 4, 3), shared=False).acquire()
    assert handle is plain and not plain.is_shared() and received.open(handle) == (plain, None)


def test_flips_are_applied_where_the_batch_is_consumed():
    from pfc.data.loader import to_float_images

    pixels = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    flips = torch.tensor([True, False, True])
    images = to_float_images(pixels, flips=flips)
    expected = pixels.float().div(127.5).sub(1).permute(0, 3, 1, 2)
    expected[flips] = expected[flips].flip(3)
    assert torch.allclose(images, expected, atol=1e-6)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(to_float_images(pixels), pixels.float().div(127.5).sub(1).permute(0, 3, 1, 2), atol=1e-6)


def test_tar_reader_mapped_and_streamed_agree_across_chunk_boundaries(tmp_path):
    """Members straddling the 1 MiB read buffer, one larger than it, through both paths: a mapped
    regular file (zero-copy views) and a stream without a file descriptor (copies)."""
    from pfc.data.tarstream import iter_indexed_samples, iter_samples

    rng = np.random.default_rng(0)
    sizes = [300_000] * 7 + [1_500_000, 17, 0, 5000]
    path = str(tmp_path / "big.tar")
    expected = []
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for index, size in enumerate(sizes):
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            for name, payload in ((f"s{index:03d}.jpg", data), (f"s{index:03d}.cls", str(index).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            expected.append({"__key__": f"s{index:03d}", "__url__": "u", "jpg": data, "cls": str(index).encode()})
    with open(path, "rb") as stream:
        mapped = list(iter_samples(stream, "u"))
    streamed = list(iter_samples(io.BytesIO(open(path, "rb").read()), "u"))
    assert isinstance(mapped[0]["jpg"], memoryview) and isinstance(streamed[0]["jpg"], bytes)
    assert mapped == expected and streamed == expected
    with open(path, "rb") as stream:
        assert [s["__key__"] for s in iter_samples(stream, "u", skip=8)] == ["s008", "s009", "s010"]
    # only the wanted samples, with their index in the shard (the others passed over from headers)
    for stream in (open(path, "rb"), io.BytesIO(open(path, "rb").read())):
        with stream:
            picked = list(iter_indexed_samples(stream, "u", skip=2, wanted=lambda index: index % 3 == 0))
        assert [(index, sample) for index, sample in picked] == [(i, expected[i]) for i in (3, 6, 9)]
