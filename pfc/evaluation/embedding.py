"""Features of any list of faces, extracted by every rank of a job and cached.

    items = [FaceItem("loose_crop/1.jpg", landmarks), FaceItem("aligned/2.jpg")]
    model = load_embedding_model("backbone.pt", "cuda")
    features = extract_features(model, items, flip=True, cache_dir="out/")   # float32 [len(items), D]

A feature is ``f(x) + f(flip(x))`` (``flip=True``, flip = horizontal) or ``f(x)``, **not**
normalised (insightface's IJB protocol weights and pools them before normalising), where ``x`` is
the face as RGB scaled to [−1, 1] (x/127.5 − 1, as pfc trains and verifies). A face with
``landmarks`` is aligned onto the ArcFace template at the model's input size the way insightface
does (:func:`pfc.evaluation.alignment.align_face_cv`); one without is taken as already aligned and,
when it is not of the model's size, resized to it (PIL bilinear, as
:mod:`pfc.evaluation.verification` does).

Decoding and alignment run in ``num_workers`` DataLoader workers (none for a share of one batch);
batches go to the model (on its device).
Under an initialised ``torch.distributed`` group each rank extracts a contiguous share of the
items (shares differ by at most one item) and every rank returns the whole array (an all-gather
of equal, padded shares). The group must carry CPU tensors: gloo, or ``"cpu:gloo,cuda:nccl"`` as
pfc's trainer and tools create it. After each batch the ranks agree on errors
(:func:`pfc.distributed.agree.agree_on_error`): an image that does not decode raises
:class:`pfc.errors.DataError` naming the file (and the line of the list that named it) on every
rank, never a hang.

With ``cache_dir`` the array is kept in ``cache_dir/features-KEY.npy``, KEY a digest of the model
file's sha256, the items (path, landmarks, encoded bytes or the image file's size and
modification time) and ``flip``; a later call with the
same key reads it instead of extracting (on every rank, when every rank finds it). Written
atomically by rank 0.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

from pfc.distributed.agree import agree_on_error, run_on_every_rank
from pfc.distributed.collectives import get_rank, get_world_size, is_distributed
from pfc.errors import ConfigError, DataError
from pfc.evaluation.alignment import RESAMPLINGS, Resampling, align_face_cv
from pfc.evaluation.embedding_model import EmbeddingModel, load_embedding_model
from pfc.files import write_atomic

__all__ = ["FaceItem", "EmbeddingModel", "load_embedding_model", "extract_features", "load_face"]


@dataclass
class FaceItem:
    """One face: the image at ``path`` (or its encoded bytes ``data``, e.g. a shard's sample, with
    ``path`` naming it), ``landmarks`` [5, 2] in the image's pixels (None: already aligned), and
    ``line``, the line of a list file that named it (for error messages)."""

    path: str
    landmarks: np.ndarray | None = None
    data: bytes | None = None
    line: int | None = None

    def describe(self) -> str:
        """The item as error messages name it: ``path`` or ``path (line N)``."""
        return self.path if self.line is None else f"{self.path} (line {self.line})"


def decode_image(item: FaceItem) -> np.ndarray:
    """The item's image as uint8 RGB [H, W, 3]: JPEG by simplejpeg (libjpeg-turbo, the pixels PIL
    gives), anything else by PIL. DataError naming the item when it cannot be read or decoded."""
    try:
        if item.data is not None:
            encoded = item.data
        else:
            with open(item.path, "rb") as stream:
                encoded = stream.read()
    except OSError as exc:
        raise DataError(f"{item.describe()}: cannot read the image ({exc.strerror or exc})") from exc
    if encoded[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(encoded, colorspace="RGB")
        except ValueError:
            pass   # a JPEG libjpeg-turbo refuses in RGB (e.g. CMYK): PIL's turn, and its error
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{item.describe()}: the image does not decode (not an image format PIL or "
                        f"libjpeg-turbo reads)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{item.describe()}: the image does not decode ({exc})") from exc


def load_face(item: FaceItem, image_size: int, resampling: Resampling = "float") -> np.ndarray:
    """The item's face as uint8 RGB ``[image_size, image_size, 3]``: aligned from its landmarks
    (:func:`pfc.evaluation.alignment.align_face_cv` with ``resampling``), else the decoded image
    (resized bilinearly when of another size). DataError naming the item."""
    image = decode_image(item)
    if item.landmarks is not None:
        try:
            return align_face_cv(image, item.landmarks, image_size, resampling=resampling)
        except DataError as exc:
            raise DataError(f"{item.describe()}: {exc}") from exc
    if image.shape[:2] != (image_size, image_size):
        image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
    return image


class FaceDataset(torch.utils.data.Dataset):
    """``items[i]`` as ``(i, uint8 face [S, S, 3] or None, error message or None)``: a face that
    cannot be loaded is reported to the rank, which makes every rank raise it."""

    def __init__(self, items: list[FaceItem], image_size: int, resampling: Resampling = "float"):
        self.items, self.image_size, self.resampling = items, image_size, resampling

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, load_face(self.items[index], self.image_size, self.resampling), None
        except DataError as exc:
            return index, None, str(exc)


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """(indices, uint8 [b, S, S, 3] or None, the first error's message or None)."""
    indices = torch.tensor([index for index, _, _ in samples], dtype=torch.int64)
    errors = [message for _, _, message in samples if message is not None]
    if errors:
        return indices, None, errors[0]
    return indices, torch.from_numpy(np.stack([face for _, face, _ in samples])), None


def _worker_init(worker_id: int, rank_pid: int) -> None:
    from pfc.data.loader import ignore_stop_signals

    torch.set_num_threads(1)   # the alignment's grid_sample: one core per worker
    ignore_stop_signals(worker_id, rank_pid)


def to_model_input(faces: torch.Tensor) -> torch.Tensor:
    """uint8 ``[b, S, S, 3]`` → float32 ``[b, 3, S, S]`` in [−1, 1] (x/127.5 − 1)."""
    return faces.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def share_bounds(count: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous share of ``count`` items; the first ``count % world``
    ranks take one more."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def items_key(items: list[FaceItem], model: EmbeddingModel, flip: bool, resampling: Resampling = "float") -> str:
    """sha256 (hex) of the model file's digest, ``flip``, ``resampling``, the input size and every
    item's path, landmarks and image: its encoded bytes when given, else the file's size and
    modification time (a file rewritten in place gets a new key without the cost of reading
    every image twice): what the features depend on."""
    digest = hashlib.sha256(f"{model.digest}\0{flip}\0{resampling}\0{model.image_size}\0{len(items)}\0".encode())
    for item in items:
        digest.update(item.path.encode() + b"\0")
        if item.landmarks is not None:
            digest.update(np.ascontiguousarray(item.landmarks, dtype=np.float64).tobytes())
        digest.update(_file_stamp(item.path) if item.data is None else hashlib.sha256(item.data).digest())
    return digest.hexdigest()


def _file_stamp(path: str) -> bytes:
    """``size:mtime_ns`` of the file at ``path`` (a missing file: a marker; extraction names it)."""
    try:
        stat = os.stat(path)
    except OSError:
        return b"\1missing"
    return f"\1{stat.st_size}:{stat.st_mtime_ns}".encode()


def _read_cache(path: str, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        cached = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return cached if cached.shape == shape and cached.dtype == np.float32 else None


def _write_cache(path: str, features: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    write_atomic(path, buffer.getvalue())


def extract_features(model: EmbeddingModel, items: list[FaceItem], *, batch_size: int = 128, flip: bool = True,
                     num_workers: int = 2, cache_dir: str | None = None, progress: bool = True,
                     group=None, resampling: Resampling = "float") -> np.ndarray:
    """float32 ``[len(items), D]`` features of ``items`` as the module docstring describes
    (collective under an initialised process group: every rank of ``group`` calls it with the same
    items and gets the same array). ``resampling``: how faces with landmarks are resampled
    (:func:`pfc.evaluation.alignment.warp_affine`: "float", or "opencv4" bit for bit as OpenCV ≤ 4)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if resampling not in RESAMPLINGS:
        raise ConfigError(f"resampling {resampling!r} is not one of {', '.join(RESAMPLINGS)}")
    if cache_dir is not None and model.digest is None:
        raise ConfigError("a feature cache needs a model read from a file (its digest keys the cache)")
    world_size = get_world_size(group) if is_distributed() else 1
    rank = get_rank(group) if is_distributed() else 0
    shape = (len(items), model.embedding_size)
    cache_file = None
    if cache_dir is not None:
        key = [items_key(items, model, flip, resampling) if rank == 0 else None]
        if world_size > 1:   # rank 0's key names the file on every rank (files stamped alike or not)
            dist.broadcast_object_list(key, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                       group=group)
        cache_file = os.path.join(cache_dir, f"features-{key[0][:24]}.npy")
        cached = _read_cache(cache_file, shape)
        missing = agree_on_error(None, "reading the feature cache", group, flags={"missing": int(cached is None)})
        if not missing["missing"]:
            return cached
    start, stop = share_bounds(len(items), world_size, rank)
    dataset = FaceDataset(items[start:stop], model.image_size, resampling)
    local = _extract_share(model, dataset, len(items), math.ceil(len(items) / world_size), batch_size,
                           flip, num_workers, progress and rank == 0, world_size, group)
    features = _gather_shares(local, len(items), world_size, group)
    if cache_file is not None:
        run_on_every_rank(lambda: _write_cache(cache_file, features) if rank == 0 else None,
                          "writing the feature cache", group)
    return features


def _extract_share(model: EmbeddingModel, share: FaceDataset, count: int, largest_share: int, batch_size: int,
                   flip: bool, num_workers: int, progress: bool, world_size: int, group) -> np.ndarray:
    """This rank's features; every rank runs the same number of steps (that of the largest share),
    each ending in one agreement on errors."""
    from tqdm import tqdm

    features = np.zeros((len(share), model.embedding_size), dtype=np.float32)
    if len(share) <= batch_size:
        num_workers = 0   # one batch: starting a worker process would cost more than decoding it here
    loader = torch.utils.data.DataLoader(
        share, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=functools.partial(_worker_init, rank_pid=os.getpid()) if num_workers else None)
    batches = iter(loader)
    bar = tqdm(total=count, desc="features", unit="img", disable=not progress, smoothing=0.05)
    try:
        for _ in range(math.ceil(largest_share / batch_size)):
            error = None
            try:   # a failure here (a worker that died, the model) is raised on every rank below
                batch = next(batches, None)
                if batch is not None:
                    indices, faces, message = batch
                    if message is not None:
                        error = DataError(message)
                    else:
                        x = to_model_input(faces)
                        output = model(x) + model(torch.flip(x, dims=[3])) if flip else model(x)
                        features[indices.numpy()] = output.numpy()
            except Exception as exc:
                error = exc
            agree_on_error(error, "extracting features", group)
            bar.update(min(batch_size * world_size, bar.total - bar.n))
    finally:
        bar.close()
        del batches   # shuts the workers down
    return features


def _gather_shares(local: np.ndarray, count: int, world_size: int, group) -> np.ndarray:
    """Every rank's share, in rank order, on every rank (an all-gather of shares padded to the
    largest)."""
    if world_size == 1:
        return local
    largest = math.ceil(count / world_size)
    padded = torch.zeros(largest, local.shape[1], dtype=torch.float32)
    padded[:len(local)] = torch.from_numpy(local)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    parts = [gathered[rank][:stop - start] for rank, (start, stop) in
             ((rank, share_bounds(count, world_size, rank)) for rank in range(world_size))]
    return torch.cat(parts).numpy()
