"""Dataset registry: every dataset by name, as uint8 images with class names.

Each dataset resolves in this order:
1. a local data directory (`data_dir`, else the environment variable CNN_DATA_DIR) holding a
   Keras-layout `.npz`, class folders (`<name>/train/<class>/*` with `test/` or `val/`), or a
   `.tar.gz`/`.tgz`/`.zip` of those, extracted once into a cache;
2. otherwise the real download from the official source.

Adding a dataset is one decorated function in catalog.py, taking the load request and returning an
`ImageData`:

    @register_dataset(hflip=True)
    def my_data(source: Source) -> ImageData:
        return source.load("my_data", local_names=("my_data",), download=..., url=..., class_names=[...])

This module holds the types and the registry; the work is done by
- catalog.py: the registered datasets, their class names and URLs;
- local.py: finding a local copy, unpacking archives safely, reading class-folder trees;
- decode.py: decoding image files once into a tf.data cache, skipping (and counting) bad ones;
- arrays.py: in-memory arrays and Keras-layout `.npz` files;
- splits.py: stratified sampling, train/test and holdout splits, reading images back out of a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from experiments.errors import UserError


@dataclasses.dataclass
class Split:
    """One split: a tf.data pipeline of (uint8 image, int label) pairs, unbatched and in a fixed order."""

    images: object  # tf.data.Dataset of (image, label) pairs
    labels: np.ndarray
    digest: str
    skipped: int = 0  # unreadable files dropped from this split

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class ImageData:
    name: str
    class_names: list[str]
    image_shape: tuple
    train: Split
    test: Split
    source: str  # a local path or the download URL
    hflip: bool = True
    info: dict = dataclasses.field(default_factory=dict)  # how it was split/limited; logged as params

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.train.digest + self.test.digest).encode()).hexdigest()[:16]

    @property
    def spec(self):
        """What a model builder needs to know of this data: an `experiments.models.DataSpec`."""
        from experiments.models import DataSpec

        return DataSpec(self.image_shape, self.num_classes, self.hflip)


@dataclasses.dataclass
class Source:
    """A load request, handed to each registered loader: where to look locally, and how the user wants
    the images shaped (not to be confused with `ImageData.source`, the path or URL they came from)."""

    data_dir: Path | None
    image_size: int
    limit: int
    seed: int
    test_fraction: float
    hflip: bool
    channels: int = 3

    def load(
        self,
        name: str,
        local_names: tuple[str, ...],
        download: Callable[[], "ImageData | Path"],
        url: str,
        class_names: list[str] | dict | None = None,
        exclude: tuple[str, ...] = (),
    ) -> ImageData:
        """The local copy if data_dir has one, else the official download."""
        local = find_local(self.data_dir, local_names) if self.data_dir else None
        origin = str(local)
        if local is None:
            try:
                local = download()
            except UserError:
                raise
            except Exception as exc:  # network errors come in many types
                looked = f" (no {'/'.join(local_names)} in {self.data_dir})" if self.data_dir else ""
                reason = (str(exc).splitlines() or [""])[0][:160]
                raise UserError(
                    f"could not download {name} from {url} ({type(exc).__name__}: {reason}){looked}; "
                    "put a local copy in a folder and pass -P data_dir=<folder> or set CNN_DATA_DIR"
                ) from None
            origin = url
            if isinstance(local, ImageData):
                return local
        if local.suffix == ".npz":
            return from_npz(local, name, class_names, self)
        return from_folder(unpack(local), self, name, class_names, origin, exclude)

    def arrays(self, name, x_train, y_train, x_test, y_test, class_names, origin) -> ImageData:
        """An in-memory dataset, its training split capped at `limit` (stratified, seeded)."""
        info = {}
        y_train = np.asarray(y_train).reshape(-1).astype(np.int64)
        if self.limit and len(y_train) > self.limit:
            keep = stratified_indices(y_train, self.limit, self.seed)
            x_train, y_train = x_train[keep], y_train[keep]
            info["limit"] = self.limit
        data = from_arrays(name, x_train, y_train, x_test, y_test, class_names, origin, self.hflip)
        data.info.update(info)
        return data


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    load: Callable[[Source], ImageData]
    hflip: bool  # False where a mirror image changes the class (digits)
    native_size: int | None  # fixed-size datasets keep it, even from a folder copy; others take image_size
    channels: int
    default_arch: str  # what `python -m experiments.train` and the MLproject entry point train without --arch


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(hflip: bool = True, native_size: int | None = None, channels: int = 3,
                     default_arch: str = "cnn_basic"):
    def decorate(fn):
        DATASETS[fn.__name__] = DatasetEntry(fn, hflip, native_size, channels, default_arch)
        return fn

    return decorate


def dataset_entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    return DATASETS[name]


def default_arch(name: str) -> str:
    """The tutorial's architecture for a dataset."""
    return dataset_entry(name).default_arch


def takes_image_size(name: str) -> bool:
    return DATASETS[name].native_size is None


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 128,
    limit: int = 0,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> ImageData:
    """Load a registered dataset. `limit` caps the training split (stratified, seeded); 0 = all."""
    check_dataset_args(name, data_dir, image_size, limit, test_fraction)
    data_dir = data_dir or os.environ.get("CNN_DATA_DIR") or None
    entry = DATASETS[name]
    source = Source(
        data_dir=Path(data_dir).expanduser() if data_dir else None,
        image_size=entry.native_size or image_size,
        limit=limit,
        seed=seed,
        test_fraction=test_fraction,
        hflip=entry.hflip,
        channels=entry.channels,
    )
    return entry.load(source)


def check_dataset_args(name, data_dir, image_size, limit, test_fraction) -> None:
    dataset_entry(name)
    if limit < 0:
        raise UserError(f"limit must be 0 (whole training split) or a positive count, got {limit}")
    if image_size < 8:
        raise UserError(f"image_size must be at least 8 pixels, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if data_dir and not Path(data_dir).expanduser().exists():
        raise UserError(f"data_dir {data_dir} does not exist; pass an existing folder or leave it empty to download")
    from_env = os.environ.get("CNN_DATA_DIR")
    if not data_dir and from_env and not Path(from_env).expanduser().exists():
        raise UserError(f"CNN_DATA_DIR={from_env} does not exist; point it at a data folder or unset it to download")


_LOADED: dict = {}


def load_data(config) -> ImageData:
    """The dataset of a TrainConfig, loaded once per process: tuner trials share it."""
    key = (config.dataset, config.data_dir, config.image_size, config.limit, config.seed, config.test_fraction,
           os.environ.get("CNN_DATA_DIR"))
    if key not in _LOADED:
        _LOADED.clear()  # one dataset at a time: they can be large
        _LOADED[key] = load_dataset(
            config.dataset, config.data_dir, config.image_size, config.limit, config.seed, config.test_fraction
        )
    return _LOADED[key]


# The parts come last: they build on the types above (importing them from this package), and importing
# the catalog registers every dataset. Each name below is also this package's public interface.
from experiments.datasets.arrays import array_split, from_arrays, from_npz  # noqa: E402
from experiments.datasets.local import IMAGE_SUFFIXES, dataset_root, find_local, from_folder, unpack  # noqa: E402
from experiments.datasets.splits import (  # noqa: E402
    fit_splits,
    holdout,
    sample_images,
    split_train_test,
    stratified_indices,
    take_images,
)
from experiments.datasets.catalog import (  # noqa: E402
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    FASHION_MNIST_CLASSES,
    IMAGENETTE_CLASSES,
    IMAGEWOOF_CLASSES,
    MNIST_CLASSES,
    archive_download,
)

__all__ = [
    "Split", "ImageData", "Source", "DatasetEntry", "DATASETS", "register_dataset", "takes_image_size",
    "list_datasets", "load_dataset", "load_data", "check_dataset_args", "dataset_entry", "default_arch",
    "array_split", "from_arrays", "from_npz",
    "IMAGE_SUFFIXES", "dataset_root", "find_local", "from_folder", "unpack",
    "holdout", "sample_images", "split_train_test", "stratified_indices", "take_images",
    "CIFAR10_CLASSES", "CIFAR100_CLASSES", "FASHION_MNIST_CLASSES", "IMAGENETTE_CLASSES", "IMAGEWOOF_CLASSES",
    "MNIST_CLASSES", "archive_download",
]

