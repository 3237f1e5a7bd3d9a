"""Datasets held as arrays: Keras downloads and Keras-layout `.npz` files, checked before use."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from experiments.cache import cache_dir
from experiments.datasets import ImageData, Source, Split
from experiments.errors import UserError

KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")


def from_arrays(name, x_train, y_train, x_test, y_test, class_names, source, hflip=True) -> ImageData:
    def split(x, y):
        if x.ndim == 3:  # greyscale (N, H, W) -> (N, H, W, 1)
            x = x[..., None]
        y = np.asarray(y).reshape(-1).astype(np.int64)
        return x, y

    x_train, y_train = split(x_train, y_train)
    x_test, y_test = split(x_test, y_test)
    return ImageData(
        name=name,
        class_names=list(class_names),
        image_shape=tuple(x_train.shape[1:]),
        train=array_split(x_train, y_train),
        test=array_split(x_test, y_test),
        source=source,
        hflip=hflip,
        info={"skipped_images": 0},  # every run logs the same params, whatever the source
    )


def array_split(x: np.ndarray, y: np.ndarray) -> Split:
    """A split over in-memory images `x` and labels `y`, in their order."""
    import tensorflow as tf

    return Split(images=tf.data.Dataset.from_tensor_slices((x, y)), labels=y, digest=_arrays_digest(x, y))


def _arrays_digest(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(x.shape).encode())
    h.update(np.ascontiguousarray(x).data)
    h.update(np.ascontiguousarray(y).data)
    return h.hexdigest()[:16]


def from_npz(path: Path, name: str, class_names: list[str] | None, source: Source) -> ImageData:
    try:
        arrays = read_npz(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, LookupError) as exc:
        raise UserError(f"cannot read {path} ({exc or 'empty file'}); replace it with a valid .npz") from None
    missing = [k for k in KERAS_KEYS if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; a Keras-layout .npz holds x_train, y_train, x_test, y_test")
    arrays = {k: arrays[k] for k in KERAS_KEYS}
    for key in ("x_train", "x_test"):
        if arrays[key].dtype != np.uint8 or arrays[key].ndim not in (3, 4):
            raise UserError(
                f"{path}: {key} is {arrays[key].dtype} with shape {arrays[key].shape}; expected uint8 (N, H, W[, C])"
            )
    for key in ("y_train", "y_test"):
        labels = arrays[key]
        if len(labels) != len(arrays["x" + key[1:]]) or not len(labels) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{path}: {key} has {len(labels)} {labels.dtype} labels for {len(arrays['x' + key[1:]])} "
                            "images; expected one integer label per image")
        if labels.min() < 0 or (class_names and labels.max() >= len(class_names)):
            raise UserError(f"{path}: {key} holds labels {labels.min()}..{labels.max()}; expected 0.."
                            f"{len(class_names) - 1 if class_names else 'N-1'}")
    n_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    names = class_names or [str(i) for i in range(n_classes)]
    return source.arrays(name, *arrays.values(), names, str(path))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz`, by name.

    Compressed members are decoded once, into the cache folder, keyed by the file's content digest:
    the lossless CIFAR-10 copy's LZMA members take about 11 s to decode, a memory-mapped read of the
    decoded arrays well under 1 s (BENCHMARKS.md, "Data loading"). A stored (uncompressed) `.npz` is
    read as it is.
    """
    with zipfile.ZipFile(path) as archive:
        compressed = any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    if not compressed:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    folder = decoded_npz_folder(path)
    if not folder.is_dir():
        _decode_npz(path, folder)
    return {member.stem: np.load(member, mmap_mode="r", allow_pickle=False) for member in sorted(folder.glob("*.npy"))}


def decoded_npz_folder(path: Path) -> Path:
    """Where the decoded arrays of `path` are kept: named after its content, so a replaced file decodes anew."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return cache_dir() / "decoded" / f"{path.name.split('.')[0]}-{digest.hexdigest()[:16]}"


def _decode_npz(path: Path, folder: Path) -> None:
    """Decode every member into a temporary sibling folder, then rename it: a kill leaves no half copy."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                np.save(staging / f"{key}.npy", npz[key], allow_pickle=False)
        os.replace(staging, folder)
    except OSError:
        if not folder.is_dir():  # another process may have renamed its own copy in first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
