"""The per-sample index (OUT/index/): the packer writes it, ``pack_shards.py index OUT`` builds it
for an existing shard set, every row points at its sample's JPEG bytes, and ``verify`` (and the
P×K loader) detect an index that is wrong or stale."""
import json
import os
import tarfile

import numpy as np
import pytest

from pfc.data import make_loader
from pfc.data.manifest import read_manifest, shard_urls
from pfc.data.sample_index import open_index
from pfc.datasets import FolderSource, PackOptions, pack, verify_shards
from pfc.errors import DataError
from tests.data_fixtures import jpeg, random_image, write_shard_set
from tools import pack_shards


def _samples(out: str) -> list[tuple[bytes, int]]:
    """(JPEG bytes, label) of every sample of the shard set, read with tarfile."""
    found = []
    for url in shard_urls(out, read_manifest(out)):
        members = {}
        with tarfile.open(url) as archive:
            for member in archive:
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = archive.extractfile(member).read()
        found += [(files["jpg"], int(files["cls"])) for files in members.values()]
    return found


def test_pack_writes_an_index_whose_rows_point_at_each_sample_once(tmp_path):
    rng = np.random.default_rng(0)
    for label in range(4):
        os.makedirs(tmp_path / "src" / f"person_{label}")
        for index in range(label + 2):
            (tmp_path / "src" / f"person_{label}" / f"{index}.jpg").write_bytes(jpeg(random_image(rng)))
    out = str(tmp_path / "out")
    pack(FolderSource(str(tmp_path / "src")), out, PackOptions(shard_size=4, workers=2, seed=1, progress=False))
    manifest = read_manifest(out)
    urls = shard_urls(out, manifest)
    index = open_index(out, manifest, urls)
    rows = [(open(urls[shard], "rb").read()[offset:offset + size], int(label))
            for shard, offset, size, label in zip(index.shard, index.offset, index.size, index.label)]
    assert sorted(rows) == sorted(_samples(out))                       # each sample once, with its label
    assert list(index.class_start) == [0, 2, 5, 9, 14]                  # label c owns rows [start_c, start_c+1)
    assert list(index.label) == sorted(index.label)
    report = verify_shards(out)
    assert report.ok and "per-sample index matches the shards" in report.describe()


def _unindexed_set(root: str) -> str:
    rng = np.random.default_rng(1)
    shards = [[(f"{shard}{n:03d}", {"jpg": jpeg(random_image(rng, 16, 16)), "cls": str(n % 3).encode()})
               for n in range(size)] for shard, size in enumerate([5, 2, 4])]
    write_shard_set(root, shards, num_classes=3, size=(16, 16))
    return root


def test_index_command_builds_the_index_of_an_existing_shard_set(tmp_path, capsys):
    out = _unindexed_set(str(tmp_path / "old"))
    assert "no per-sample index" in verify_shards(out).describe()     # absent: not a problem
    os.makedirs(os.path.join(out, "index.tmp999"))                     # left by a killed build
    assert pack_shards.main(["index", out, "--workers", "2"]) == 0
    assert "index.tmp999" not in os.listdir(out)
    assert "indexed 11 samples" in capsys.readouterr().out
    assert pack_shards.main(["verify", out]) == 0
    assert "per-sample index matches the shards" in capsys.readouterr().out
    assert pack_shards.main(["index", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err and not os.path.exists(tmp_path / "nothing")


def _rewrite_array(out: str, name: str, values: np.ndarray, fix_checksum: bool) -> None:
    path = os.path.join(out, "index", f"{name}.npy")
    np.save(path, values)
    if fix_checksum:
        from pfc.data.sample_index import file_sha256
        info_path = os.path.join(out, "index", "index.json")
        info = json.load(open(info_path))
        info["arrays"][name].update(sha256=file_sha256(path), bytes=os.path.getsize(path))
        json.dump(info, open(info_path, "w"))


def test_verify_and_the_pk_loader_detect_a_wrong_or_stale_index(tmp_path):
    out = _unindexed_set(str(tmp_path / "set"))
    assert pack_shards.main(["index", out]) == 0
    offsets = np.load(os.path.join(out, "index", "offset.npy"))
    _rewrite_array(out, "offset", offsets + 512, fix_checksum=False)
    assert any("offset.npy does not match its checksum" in p for p in verify_shards(out).problems)
    _rewrite_array(out, "offset", offsets + 512, fix_checksum=True)   # consistent, but wrong
    assert any("offset.npy does not match the shards" in p for p in verify_shards(out).problems)

    assert pack_shards.main(["index", out]) == 0                       # rebuilt: right again
    assert verify_shards(out).ok
    with open(os.path.join(out, "shard-000001.tar"), "ab") as stream:  # a shard changed after indexing
        stream.write(bytes(10240))
    report = verify_shards(out)
    assert any("index" in p and "is stale" in p and "shard-000001.tar" in p for p in report.problems)
    with pytest.raises(DataError, match="is stale: shard .*shard-000001.tar.*pack_shards.py index"):
        make_loader(out, 3, 0, 1, 0, seed=0, epoch=0, sampler="pk", pk_k=1)
    assert pack_shards.main(["index", out]) == 0
    manifest = json.load(open(os.path.join(out, "dataset.json")))
    manifest["source"] = "edited"
    json.dump(manifest, open(os.path.join(out, "dataset.json"), "w"))
    with pytest.raises(DataError, match="is stale: dataset.json changed"):
        make_loader(out, 3, 0, 1, 0, seed=0, epoch=0, sampler="pk", pk_k=1)
