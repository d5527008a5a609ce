"""Small on-disk inputs for the data tests: RecordIO files written from the published layout,
image folders, and hand-made shard sets (including damaged ones)."""
from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import simplejpeg
import webdataset as wds
from PIL import Image

MAGIC = 0xCED7230A


def encode_record_parts(payload: bytes) -> bytes:
    """dmlc RecordIO framing of one record: split where the magic word sits at a 4-byte aligned
    offset (the magic itself is dropped), cflag 0 for a single part, 1/2/3 for first/middle/last."""
    magic = struct.pack("<I", MAGIC)
    cuts, start = [], 0
    for offset in range(0, len(payload) - len(payload) % 4, 4):
        if payload[offset:offset + 4] == magic:
            cuts.append((start, offset))
            start = offset + 4
    cuts.append((start, len(payload)))
    out = bytearray()
    for number, (begin, end) in enumerate(cuts):
        if len(cuts) == 1:
            flag = 0
        else:
            flag = 1 if number == 0 else 3 if number == len(cuts) - 1 else 2
        length = end - begin
        out += struct.pack("<II", MAGIC, (flag << 29) | length) + payload[begin:end]
        out += b"\0" * ((4 - length % 4) % 4)
    return bytes(out)


def record_payload(label, data: bytes, extra_labels=None, record_id: int = 0) -> bytes:
    """IfQQ header (flag = number of extra labels) + the extra float32 labels + data."""
    extra = list(extra_labels or [])
    head = struct.pack("<IfQQ", len(extra), 0.0 if extra else float(label), record_id, 0)
    return head + struct.pack(f"<{len(extra)}f", *extra) + data


def write_rec(prefix: str, payloads: dict[int, bytes]) -> None:
    """Write PREFIX.rec and PREFIX.idx holding ``payloads`` {key: record payload} in key order."""
    offsets = {}
    with open(prefix + ".rec", "wb") as rec:
        for key in sorted(payloads):
            offsets[key] = rec.tell()
            rec.write(encode_record_parts(payloads[key]))
    with open(prefix + ".idx", "w") as idx:
        idx.writelines(f"{key}\t{offset}\n" for key, offset in offsets.items())


def random_image(rng, height=112, width=112) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly, so round trips are near-lossless)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def jpeg(pixels: np.ndarray, quality=95) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard_set(root: str, shard_samples: list[list[tuple]], num_classes: int, size=(112, 112),
                    manifest_counts: list[int] | None = None) -> list[str]:
    """Write shards of (key, {"jpg": bytes, "cls": bytes, ...}) samples and a manifest."""
    os.makedirs(root, exist_ok=True)
    names = []
    for index, samples in enumerate(shard_samples):
        name = f"shard-{index:06d}.tar"
        with wds.TarWriter(os.path.join(root, name), encoder=False) as writer:
            for key, members in samples:
                writer.write({"__key__": key, **members})
        names.append(name)
    counts = manifest_counts or [len(s) for s in shard_samples]
    manifest = {"format": "pfc-shards-1", "num_classes": num_classes, "num_samples": sum(counts),
                "image_size": list(size), "shards": [{"name": n, "num_samples": c} for n, c in zip(names, counts)],
                "source": "test"}
    with open(os.path.join(root, "dataset.json"), "w") as stream:
        json.dump(manifest, stream)
    with open(os.path.join(root, "classes.txt"), "w") as stream:
        stream.writelines(f"c{k}\n" for k in range(num_classes))
    return names


def unique_label_shards(root: str, shard_sizes: list[int], seed=0, pixels_cache=None) -> int:
    """Shards whose every sample has its own label (so labels identify samples); returns the total."""
    rng = np.random.default_rng(seed)
    total = sum(shard_sizes)
    encoded = jpeg(random_image(rng))
    shards, label = [], 0
    for size in shard_sizes:
        samples = []
        for _ in range(size):
            samples.append((f"{label:09d}", {"jpg": encoded, "cls": str(label).encode()}))
            label += 1
        shards.append(samples)
    write_shard_set(root, shards, num_classes=total)
    return total
