"""Packing must never label wrongly: links, empty and unreadable classes, two packers, an output
folder inside the source. Black box through ``tools/pack_shards.py`` in subprocesses where the
behaviour is the tool's; tiny 16x16 images of one grey level per class, so a sample's label can be
checked against the class it came from."""
import errno
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import simplejpeg

from pfc.datasets import FolderSource, PackOptions, pack, verify_shards
from pfc.datasets import packing
from pfc.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "pack_shards.py")
SIZE = ["--image-size", "16", "--no-progress"]


def run_tool(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, TOOL, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_tool(*args):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, TOOL, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def grey_jpeg(level: int) -> bytes:
    return simplejpeg.encode_jpeg(np.full((16, 16, 3), level, np.uint8), quality=95, colorspace="RGB")


def write_images(folder, count: int, level: int, prefix="") -> None:
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        with open(os.path.join(folder, f"{prefix}{index}.jpg"), "wb") as stream:
            stream.write(grey_jpeg(level))


def packed_levels(out_dir) -> tuple[list[str], dict[int, set[int]]]:
    """(classes.txt lines, {label: grey levels of its samples}) of a packed set."""
    with open(os.path.join(out_dir, "dataset.json")) as stream:
        manifest = json.load(stream)
    levels: dict[int, set[int]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(out_dir, shard["name"])) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
        for name, data in members.items():
            if name.endswith(".cls"):
                pixels = simplejpeg.decode_jpeg(members[name[:-4] + ".jpg"])
                levels.setdefault(int(data), set()).add(int(round(pixels.mean() / 10)) * 10)
    with open(os.path.join(out_dir, "classes.txt")) as stream:
        classes = stream.read().splitlines()
    assert len(classes) == manifest["num_classes"]
    return classes, levels


def test_links_are_followed_only_out_of_the_source_tree_and_the_others_are_listed(tmp_path):
    src, ext = tmp_path / "src", tmp_path / "ext"
    write_images(src / "a", 2, 40)
    write_images(src / "b", 2, 200)
    write_images(ext / "carol", 2, 120)            # an identity folder kept elsewhere, linked in
    write_images(ext / "loose", 1, 200)
    os.symlink("../ext/carol", src / "carol")
    os.symlink(ext / "loose" / "0.jpg", src / "b" / "outside.jpg")   # an image linked in: followed
    os.symlink(".", src / "loop")
    os.symlink("..", src / "up")
    os.symlink("a", src / "alias")
    os.symlink("../b", src / "a" / "again")
    os.symlink("../a/0.jpg", src / "b" / "dup.jpg")
    result = run_tool("folder", src, tmp_path / "out", *SIZE)
    assert result.returncode == 0, result.stderr
    classes, levels = packed_levels(tmp_path / "out")
    assert classes == ["a", "b", "carol"]
    assert levels == {0: {40}, 1: {200}, 2: {120}}
    assert "packed 7 images of 3 classes" in result.stdout
    for path in ("loop", "up", "alias", "a/again", "b/dup.jpg"):
        assert f"ignored {path}: link to " in result.stdout, path
    assert "(a loop)" in result.stdout and "did not follow 5 links" in result.stdout


def test_empty_and_unreadable_classes_are_left_out_of_a_contiguous_label_space(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src / "a", 2, 40)
    write_images(src / "c", 3, 200)
    (src / "c" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    os.makedirs(src / "b_dead")
    for index in range(2):
        (src / "b_dead" / f"{index}.jpg").write_bytes(b"\xff\xd8 not a jpeg either")
    os.makedirs(src / "empty")
    (src / "empty" / "notes.txt").write_text("no image here")
    command = ("folder", src, out, "--shard-size", "2", "--workers", "2", *SIZE)   # relabelled in parallel
    result = run_tool(*command)
    assert result.returncode == 0, result.stderr
    assert "left out class b_dead: all its 2 images were skipped" in result.stdout
    assert "left out class empty: no images" in result.stdout
    assert "packed 5 images of 2 classes" in result.stdout
    classes, levels = packed_levels(out)
    assert classes == ["a", "c"] and levels == {0: {40}, 1: {200}}   # c relabelled from 2 to 1
    assert verify_shards(str(out)).ok
    again = run_tool(*command)   # a re-run keeps every shard and their final labels
    assert again.returncode == 0 and "(0 written, 4 kept" in again.stdout, again.stdout
    assert packed_levels(out) == (classes, levels)


def test_a_run_killed_while_relabelling_is_finished_by_the_next(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src / "a", 3, 40)
    (src / "b" / "x.jpg").parent.mkdir(parents=True)
    (src / "b" / "x.jpg").write_bytes(b"unreadable")
    write_images(src / "c", 3, 200)
    options = PackOptions(shard_size=2, image_size=16, progress=False)
    relabel_one = packing._relabel_shard
    calls = []

    def killed_after_one_shard(task):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return relabel_one(task)

    monkeypatch.setattr(packing, "_relabel_shard", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        pack(FolderSource(str(src)), str(out), options)
    assert not (out / "dataset.json").exists()
    monkeypatch.setattr(packing, "_relabel_shard", relabel_one)
    summary = pack(FolderSource(str(src)), str(out), options)
    assert summary.shards_kept == 4 and summary.left_out == [("b", "its only image was skipped")]
    assert packed_levels(out) == (["a", "c"], {0: {40}, 1: {200}})


def test_folder_source_claims_every_class_folder_before_following_links(tmp_path):
    src, ext = tmp_path / "src", tmp_path / "ext"
    write_images(ext / "alice", 1, 40)
    write_images(ext / "bob", 1, 120)
    write_images(ext / "more", 1, 40)
    src.mkdir()
    os.symlink(ext / "alice", src / "alice")
    os.symlink(ext / "bob", src / "bob")
    os.symlink(ext / "alice", src / "twin")                 # a second class name for alice's folder
    os.symlink(ext / "bob", ext / "alice" / "friend")       # inside alice: bob's class folder
    os.symlink(ext / "more", ext / "alice" / "more")        # inside alice: a folder of its own
    os.symlink(ext, ext / "bob" / "parent")                 # contains every class folder
    source = FolderSource(str(src))
    assert source.classes == ["alice", "bob"]
    assert sorted(ref for ref, _ in source.items) == ["alice/0.jpg", "alice/more/0.jpg", "bob/0.jpg"]
    ignored = dict(source.ignored)
    assert set(ignored) == {"twin", "alice/friend", "bob/parent"}
    assert "which is class alice" in ignored["twin"] and "which is class bob" in ignored["alice/friend"]
    assert f"link to {ext}, which contains a folder read already" in ignored["bob/parent"]


def test_output_folder_inside_the_source_is_refused_before_anything_is_written(tmp_path):
    src, ext = tmp_path / "src", tmp_path / "ext"
    write_images(src / "a", 1, 40)
    write_images(ext / "carol", 1, 120)
    os.symlink(ext / "carol", src / "carol")
    for out in (src / "shards", src, ext / "carol" / "shards"):
        result = run_tool("folder", src, out, *SIZE)
        assert result.returncode == 2, (out, result.stdout)
        assert result.stderr.startswith(f"error: output folder {out} lies inside the source folder")
        assert "Traceback" not in result.stderr
    assert sorted(os.listdir(src)) == ["a", "carol"] and os.listdir(ext / "carol") == ["0.jpg"]


def test_a_second_packer_fails_at_once_and_a_killed_packer_does_not_block_the_next(tmp_path):
    """Packer 1 holds the output folder while it blocks reading a FIFO image; packer 2 fails at
    once naming packer 1's PID; after ``kill -9`` of packer 1, packer 3 packs (the FIFO fed)."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_images(src / "a", 2, 40)
    write_images(src / "b", 2, 200)
    os.mkfifo(src / "b" / "slow.jpg")
    command = ("folder", src, out, "--shard-size", "2", *SIZE)
    first = start_tool(*command)
    try:
        lock = out / ".pack" / "lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "packer 1 never took the lock"
            time.sleep(0.05)
        started = time.monotonic()
        second = run_tool(*command, timeout=60)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"{out} is being written by another packer (PID {first.pid}" in second.stderr
        assert time.monotonic() - started < 30
    finally:
        first.kill()
        first.wait()
    third = start_tool(*command)
    try:
        _feed_fifo(src / "b" / "slow.jpg", grey_jpeg(200), third)
        stdout, stderr = third.communicate(timeout=120)
    finally:
        third.kill()
    assert third.returncode == 0, stderr
    assert "packed 5 images of 2 classes" in stdout
    assert packed_levels(out) == (["a", "b"], {0: {40}, 1: {200}})


def _feed_fifo(path, data: bytes, reader: subprocess.Popen, timeout=60) -> None:
    """Write ``data`` into the FIFO ``path`` once ``reader`` opens it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:   # ENXIO: no reader yet
                raise
        assert reader.poll() is None, reader.communicate()
        assert time.monotonic() < deadline, "the packer never read the FIFO"
        time.sleep(0.05)
    try:
        os.set_blocking(descriptor, True)
        os.write(descriptor, data)
    finally:
        os.close(descriptor)


def test_pack_refuses_an_output_folder_locked_by_this_or_another_process(tmp_path):
    from pfc.datasets.outdir import output_lock

    write_images(tmp_path / "src" / "a", 1, 40)
    with output_lock(str(tmp_path / "out")):
        with pytest.raises(DataError, match=f"being written by another packer \\(PID {os.getpid()}"):
            pack(FolderSource(str(tmp_path / "src")), str(tmp_path / "out"),
                 PackOptions(image_size=16, progress=False))
    pack(FolderSource(str(tmp_path / "src")), str(tmp_path / "out"), PackOptions(image_size=16, progress=False))


def test_verify_reports_a_class_without_samples(tmp_path):
    """A set packed before empty classes were left out fails verification, naming the class."""
    from tests.data_fixtures import write_shard_set

    sample = {"jpg": grey_jpeg(40)}
    write_shard_set(str(tmp_path), [[("000000000", {**sample, "cls": b"0"}), ("000000001", {**sample, "cls": b"2"})]],
                    num_classes=3, size=(16, 16))
    report = verify_shards(str(tmp_path))
    assert not report.ok and report.problems == [
        "class 1 (c1) has no good sample; repack with tools/pack_shards.py, which leaves empty classes out"]
    result = run_tool("verify", tmp_path)
    assert result.returncode == 1 and "class 1 (c1) has no good sample" in result.stdout
