"""Training-test fixtures: a tiny webdataset shard set and a small trainer config for it."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import simplejpeg


def write_shards(root: str, num_classes: int = 12, per_class: int = 8, image_size: int = 16,
                 samples_per_shard: int = 20, seed: int = 0) -> str:
    """Write ``num_classes × per_class`` JPEG samples into tar shards under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    shards = []
    for start in range(0, len(labels), samples_per_shard):
        name = f"shard-{len(shards):06d}.tar"
        chunk = labels[start:start + samples_per_shard]
        with tarfile.open(os.path.join(root, name), "w") as tar:
            for offset, label in enumerate(chunk):
                base = np.full((image_size, image_size, 3), 20 * (label % 12), dtype=np.uint8)
                noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
                members = {"jpg": simplejpeg.encode_jpeg(np.ascontiguousarray(base + noise), quality=95),
                           "cls": str(int(label)).encode()}
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{start + offset:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append({"name": name, "num_samples": int(len(chunk))})
    manifest = {"format": "pfc-shards-1", "num_classes": num_classes, "num_samples": int(len(labels)),
                "image_size": [image_size, image_size], "shards": shards, "source": "tests"}
    with open(os.path.join(root, "dataset.json"), "w") as handle:
        json.dump(manifest, handle)
    return root


def make_config(data: str, output: str, **overrides):
    """A TrainConfig for the tiny network on :func:`write_shards` data (2 ranks: 6 steps per epoch)."""
    from pfc.config import MarginConfig, TrainConfig

    fields = dict(data=data, output=output, num_workers=0, network="tiny", embedding_size=16,
                  margin=MarginConfig(s=16.0, m2=0.3), sample_rate=0.5, batch_size=4, grad_accumulation=2,
                  lr=0.1, max_steps=10, warmup_steps=2, log_every=1, save_every=100, seed=3)
    fields.update(overrides)
    return TrainConfig(**fields)
