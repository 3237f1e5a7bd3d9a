"""Datasets held as arrays: Keras downloads and Keras-layout `.npz` files, checked before use."""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np

from experiments.datasets import ImageData, Source, Split
from experiments.errors import UserError


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
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}; a Keras-layout .npz holds x_train, y_train, x_test, y_test")
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(f"cannot read {path} ({exc or 'empty file'}); replace it with a valid .npz") from None
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
