"""Dataset registry: every dataset by name, as uint8 images with class names.

Each dataset resolves in this order:
1. a local data directory (`data_dir`, else the environment variable CNN_DATA_DIR) holding a
   Keras-layout `.npz`, class folders (`<name>/train/<class>/*` with `test/` or `val/`), or a
   `.tar.gz`/`.tgz`/`.zip` of those, extracted once into a cache;
2. otherwise the real download from the official source.

Adding a dataset is one decorated function returning an `ImageData`:

    @register_dataset(hflip=True)
    def my_data(source: Source) -> ImageData:
        return source.load(local_names=("my_data",), download=..., class_names=[...])
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from experiments.errors import UserError

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow at module load
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPLIT_TEST_NAMES = ("test", "val")
MIN_IMAGE_SIDE = 8  # smaller files (icons, 1x1 tracking pixels) carry no class: skipped and counted
# Larger files are skipped and counted before decoding (a decompression bomb would exhaust memory).
MAX_IMAGE_PIXELS = int(os.environ.get("CNN_MAX_IMAGE_PIXELS", 2**26))
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


@dataclasses.dataclass
class Split:
    """One split: a tf.data pipeline of (uint8 image, int label), unbatched and in a fixed order."""

    images: object  # tf.data.Dataset
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


@dataclasses.dataclass
class Source:
    """What a loader needs: where to look locally, and how the user wants it shaped."""

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


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(hflip: bool = True, native_size: int | None = None, channels: int = 3):
    def decorate(fn):
        DATASETS[fn.__name__] = DatasetEntry(fn, hflip, native_size, channels)
        return fn

    return decorate


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
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
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


# --- Local files --------------------------------------------------------------------------------


def find_local(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    """The first `<name>.npz`, `<name>/` or `<name>.<archive>` in data_dir, or data_dir itself if it is the tree."""
    for name in names:
        for candidate in [data_dir / f"{name}.npz", data_dir / name] + [data_dir / f"{name}{s}" for s in ARCHIVE_SUFFIXES]:
            if candidate.exists():
                return candidate
    if (data_dir / "train").is_dir():
        return data_dir
    return None


def cache_dir() -> Path:
    """Where extracted archives, VGG16 features and checkpoints go (CNN_CACHE_DIR, else ~/.cache/cnn-mlflow)."""
    root = Path(os.environ.get("CNN_CACHE_DIR") or Path.home() / ".cache" / "cnn-mlflow")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create cache directory {root} ({exc.strerror}); "
                        "set CNN_CACHE_DIR to a writable folder") from None
    return root


def check_cache_writable() -> Path:
    """The cache directory, after proving it takes a file: called once, before any run starts."""
    root = cache_dir()
    try:
        tempfile.TemporaryFile(dir=root).close()
    except OSError as exc:
        raise UserError(f"cache directory {root} is not writable ({exc.strerror}); "
                        "set CNN_CACHE_DIR to a writable folder") from None
    return root


def file_key(path: Path) -> str:
    """A cache key for a local file: changes when the file is replaced or edited."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def unpack(path: Path) -> Path:
    """A folder path as is; an archive extracted once into the cache (atomically), then that folder."""
    if path.is_dir():
        return path
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{path} is neither a folder, an .npz nor a .tar.gz/.tgz/.zip archive")
    target = cache_dir() / "extracted" / f"{path.name.split('.')[0]}-{file_key(path)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    print(f"extracting {path} into {target} (once)", flush=True)
    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise UserError(f"{path} holds an unsafe path {member!r}; refusing to extract it")
                archive.extractall(staging)
        else:
            with tarfile.open(path) as archive:
                archive.extractall(staging, filter="data")  # refuses absolute paths, '..' and links out
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, tarfile.FilterError):
            raise UserError(f"{path} holds an unsafe entry ({exc}); refusing to extract it") from None
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise UserError(f"cannot extract {path} into {target.parent} ({exc.strerror}); free space there "
                            "or set CNN_CACHE_DIR to a folder with room") from None
        raise UserError(f"cannot extract {path} ({exc}); replace the archive with a complete copy") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, target)  # a kill leaves a .partial- folder, never a half-filled target
    return target


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # dot files, and the resource forks of macOS zips


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not _hidden(p.name))


def dataset_root(path: Path) -> Path:
    """Walk down wrapper folders (an archive's top folder) and nested archives to the class tree."""
    for _ in range(5):
        entries = _visible(path)
        dirs = [p for p in entries if p.is_dir()]
        if any(d.name in ("train", *SPLIT_TEST_NAMES) for d in dirs):
            return path
        archives = [p for p in entries if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES)]
        if len(dirs) == 1 and not _has_images(path):
            path = dirs[0]
        elif not dirs and archives:  # e.g. caltech-101.zip holds 101_ObjectCategories.tar.gz
            path = unpack(max(archives, key=lambda p: p.stat().st_size))
        else:
            return path
    return path


def _has_images(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir() if p.is_file())


def _list_class_files(split_dir: Path, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        for file in sorted(folder.rglob("*")):
            hidden = any(_hidden(part) for part in file.relative_to(folder).parts)  # .ipynb_checkpoints/ too
            if file.is_file() and not hidden and file.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(str(file))
                labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64)


def _files_digest(paths: list[str], labels: np.ndarray, root: Path) -> str:
    """Content-addressed enough to tell data sets apart: relative path, size and label of every file."""
    h = hashlib.sha256()
    for path, label in zip(paths, labels):
        h.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}:{label}\n".encode())
    return h.hexdigest()[:16]


def _arrays_digest(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(x.shape).encode())
    h.update(np.ascontiguousarray(x).data)
    h.update(np.ascontiguousarray(y).data)
    return h.hexdigest()[:16]


def stratified_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` indices drawn at random with each class in proportion to its size (sorted)."""
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * count / len(labels)
    quota = np.floor(exact).astype(int)
    # Largest remainders get the leftover slots, so the total is exactly `count`.
    quota[np.argsort(quota - exact)[: count - quota.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def split_train_test(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split for trees that ship without train/test folders (Caltech-101)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(members) * test_fraction)) if len(members) > 1 else 0
        test.extend(members[:n_test])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded stratified (rest, held-out) parts of a split: validation data that is not the test split."""
    import tensorflow as tf

    rest, held = split_train_test(split.labels, fraction, seed)

    def part(indices: np.ndarray, role: str) -> Split:
        keep = np.zeros(len(split), bool)
        keep[indices] = True
        mask = tf.constant(keep)

        def kept(index, example):
            return mask[index]

        def drop_index(index, example):
            return example

        images = split.images.enumerate().filter(kept).map(drop_index)
        images = images.apply(tf.data.experimental.assert_cardinality(len(indices)))
        digest = hashlib.sha256(f"{split.digest}:{role}:{fraction}:{seed}".encode()).hexdigest()[:16]
        return Split(images=images, labels=split.labels[indices], digest=digest)

    return part(rest, "rest"), part(held, "holdout")


def from_folder(
    path: Path,
    source: Source,
    name: str = "folder",
    class_names: dict | None = None,
    origin: str | None = None,
    exclude: tuple[str, ...] = (),
) -> ImageData:
    """Class folders, split into train/(test|val), or split here when the tree has no split.

    `class_names` maps folder names (e.g. ImageNet wnids) to readable names, when given as a dict.
    """
    root = dataset_root(path)
    test_dir = next((root / s for s in SPLIT_TEST_NAMES if (root / s).is_dir()), None)
    info: dict = {}
    if (root / "train").is_dir() and test_dir is not None:
        folders = sorted(d.name for d in _visible(root / "train") if d.is_dir() and d.name not in exclude)
        test_folders = sorted(d.name for d in _visible(test_dir) if d.is_dir() and d.name not in exclude)
        if folders != test_folders:
            only = sorted(set(folders) ^ set(test_folders))
            raise UserError(
                f"train/ and {test_dir.name}/ under {root} have different class folders ({', '.join(only[:5])}); "
                "give both splits the same classes"
            )
        train_paths, train_labels = _list_class_files(root / "train", folders)
        test_paths, test_labels = _list_class_files(test_dir, folders)
        info["test_split"] = test_dir.name
    elif (root / "train").is_dir():
        raise UserError(f"{root} has train/ but no test/ or val/ folder; add one, or remove train/ to split by test_fraction")
    else:
        folders = sorted(d.name for d in _visible(root) if d.is_dir() and d.name not in exclude)
        paths, labels = _list_class_files(root, folders)
        train_idx, test_idx = split_train_test(labels, source.test_fraction, source.seed)
        train_paths, train_labels = [paths[i] for i in train_idx], labels[train_idx]
        test_paths, test_labels = [paths[i] for i in test_idx], labels[test_idx]
        info.update(test_split="seeded_stratified", test_fraction=source.test_fraction, split_seed=source.seed)
    non_empty = sorted(set(train_labels.tolist()))
    empty = [folder for label, folder in enumerate(folders) if label not in non_empty]
    if empty and len(non_empty) >= 2:
        raise UserError(f"class folder(s) {', '.join(empty[:5])} under {root} hold no training images; "
                        "add images or remove the folder(s)")
    if len(non_empty) < 2:
        raise UserError(
            f"{root} has {len(non_empty)} class folder(s) with images; a classifier needs at least 2 "
            "(layout: <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg)"
        )
    if len(test_paths) == 0:
        raise UserError(f"{root} has no test images; add test/ (or val/) class folders")
    if isinstance(class_names, dict):
        names = [class_names.get(f, f) for f in folders]
    else:
        names = folders
    if source.limit and len(train_paths) > source.limit:
        keep = stratified_indices(train_labels, source.limit, source.seed)
        train_paths, train_labels = [train_paths[i] for i in keep], train_labels[keep]
        info["limit"] = source.limit
    size, channels = source.image_size, source.channels
    train = _image_split(train_paths, train_labels, root, size, channels)
    test = _image_split(test_paths, test_labels, root, size, channels)
    info["skipped_images"] = train.skipped + test.skipped
    return ImageData(
        name=name,
        class_names=names,
        image_shape=(size, size, channels),
        train=train,
        test=test,
        source=origin or str(path),
        hflip=source.hflip,
        info=info,
    )


def _image_split(paths: list[str], labels: np.ndarray, root: Path, size: int, channels: int) -> Split:
    """Decode every file once into a tf.data cache, dropping (and counting) unreadable ones."""
    import tensorflow as tf

    def decode(path, label):
        contents = tf.io.read_file(path)
        tf.debugging.assert_less_equal(_declared_pixels(contents), tf.constant(MAX_IMAGE_PIXELS, tf.int64))
        # BMP and GIF decode to 3 channels only; greyscale datasets convert after.
        image = tf.io.decode_image(contents, channels=3 if channels == 1 else channels, expand_animations=False)
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        tf.debugging.assert_greater_equal(tf.reduce_min(tf.shape(image)[:2]), MIN_IMAGE_SIDE)
        image = tf.image.resize(image, (size, size))
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

    images = (
        tf.data.Dataset.from_tensor_slices((paths, labels))
        .map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
        .ignore_errors()
        .cache()
    )
    # One pass fills the cache (the first epoch would do it anyway) and tells which files decoded.
    kept = _fill_cache(images, len(paths), f"decoding {len(paths)} images from {root}")
    # ignore_errors() hides the length from Keras; we know it now.
    images = images.apply(tf.data.experimental.assert_cardinality(len(kept)))
    return Split(images=images, labels=kept, digest=_files_digest(paths, labels, root), skipped=len(paths) - len(kept))


def _declared_pixels(contents):
    """Width x height from a JPEG's or PNG's header, without decoding (0 for other formats)."""
    import tensorflow as tf

    def png():
        header = tf.cast(tf.io.decode_raw(tf.strings.substr(contents, 16, 8), tf.uint8), tf.int64)
        width = header[0] * 2**24 + header[1] * 2**16 + header[2] * 2**8 + header[3]
        height = header[4] * 2**24 + header[5] * 2**16 + header[6] * 2**8 + header[7]
        return width * height

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
        return shape[0] * shape[1]

    is_png = tf.logical_and(tf.strings.length(contents) >= 24,
                            tf.equal(tf.strings.substr(contents, 0, 8), b"\x89PNG\r\n\x1a\n"))
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 2), b"\xff\xd8")
    return tf.case([(is_png, png), (is_jpeg, jpeg)], default=lambda: tf.constant(0, tf.int64))


def _fill_cache(images, total: int, title: str) -> np.ndarray:
    import keras

    print(title, flush=True)
    # A live bar on a terminal; in logs (mlflow run, CI) just the closing line.
    bar = keras.utils.Progbar(total, verbose=1 if sys.stdout.isatty() else 2)
    labels = []
    for _, batch_labels in images.batch(512):
        labels.append(batch_labels.numpy())
        bar.add(len(labels[-1]))
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)


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
        train=_array_split(x_train, y_train),
        test=_array_split(x_test, y_test),
        source=source,
        hflip=hflip,
        info={"skipped_images": 0},  # every run logs the same params, whatever the source
    )


def _array_split(x: np.ndarray, y: np.ndarray) -> Split:
    import tensorflow as tf

    return Split(images=tf.data.Dataset.from_tensor_slices((x, y)), labels=y, digest=_arrays_digest(x, y))


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


# --- The registry -------------------------------------------------------------------------------

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
IMAGENETTE_CLASSES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}
IMAGEWOOF_CLASSES = {
    "n02086240": "Shih-Tzu", "n02087394": "Rhodesian ridgeback", "n02088364": "beagle",
    "n02089973": "English foxhound", "n02093754": "Border terrier", "n02096294": "Australian terrier",
    "n02099601": "golden retriever", "n02105641": "Old English sheepdog", "n02111889": "Samoyed",
    "n02115641": "dingo",
}
FASTAI_URL = "https://s3.amazonaws.com/fast-ai-imageclas/"


def _archive_download(fname: str, url: str, md5: str | None) -> Callable[[], Path]:
    def download() -> Path:
        import keras

        return Path(keras.utils.get_file(fname, url, file_hash=md5, cache_subdir="datasets"))

    return download


def _keras_dataset(source: Source, name: str, classes: list[str], url: str, local=()) -> ImageData:
    def download() -> ImageData:
        import keras

        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
        return source.arrays(name, x_train, y_train, x_test, y_test, classes, url)

    return source.load(name, (name, *local), download, url, classes)


@register_dataset(hflip=False, native_size=28, channels=1)
def mnist(source: Source) -> ImageData:
    url = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    return _keras_dataset(source, "mnist", MNIST_CLASSES, url)


@register_dataset(hflip=True, native_size=28, channels=1)
def fashion_mnist(source: Source) -> ImageData:
    url = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
    return _keras_dataset(source, "fashion_mnist", FASHION_MNIST_CLASSES, url, ("fashion-mnist",))


@register_dataset(hflip=True, native_size=32)
def cifar10(source: Source) -> ImageData:
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    return _keras_dataset(source, "cifar10", CIFAR10_CLASSES, url, ("cifar-10",))


@register_dataset(hflip=True, native_size=32)
def cifar100(source: Source) -> ImageData:
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    return _keras_dataset(source, "cifar100", CIFAR100_CLASSES, url, ("cifar-100",))


def _fastai(source: Source, name: str, archive: str, md5: str, classes: dict) -> ImageData:
    url = FASTAI_URL + archive + ".tgz"
    local = (archive, archive.replace("-160", ""), archive.replace("-160", "-320"), name)
    return source.load(name, local, _archive_download(archive + ".tgz", url, md5), url, classes)


@register_dataset(hflip=True)
def imagenette(source: Source) -> ImageData:
    return _fastai(source, "imagenette", "imagenette2-160", "e793b78cc4c9e9a4ccc0c1155377a412", IMAGENETTE_CLASSES)


@register_dataset(hflip=True)
def imagewoof(source: Source) -> ImageData:
    return _fastai(source, "imagewoof", "imagewoof2-160", "3d200a7be99704a0d7509be2a9fbfe15", IMAGEWOOF_CLASSES)


@register_dataset(hflip=True)
def caltech101(source: Source) -> ImageData:
    url = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
    # BACKGROUND_Google is clutter, not a category; the usual 101-class benchmark leaves it out.
    local = ("caltech101", "caltech-101", "101_ObjectCategories")
    download = _archive_download("caltech-101.zip", url, None)
    return source.load("caltech101", local, download, url, exclude=("BACKGROUND_Google",))


@register_dataset(hflip=True)
def folder(source: Source) -> ImageData:
    """Any class-folder tree (or archive of one) at data_dir."""
    if source.data_dir is None:
        raise UserError("the folder dataset needs -P data_dir=<path to class folders or an archive of them>")
    path = source.data_dir
    if path.is_file() and path.suffix == ".npz":
        return from_npz(path, "folder", None, source)
    return from_folder(unpack(path), source, name="folder")
