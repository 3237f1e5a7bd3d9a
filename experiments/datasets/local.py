"""Local copies: finding one in data_dir, unpacking archives safely, and reading class-folder trees."""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from experiments.cache import cache_dir, file_key
from experiments.datasets import ImageData, Source
from experiments.datasets.decode import image_split
from experiments.datasets.splits import split_train_test, stratified_indices
from experiments.errors import UserError

# The image files read from folders, for training here and by registry.predict. Serving decodes with Pillow;
# training's tf.io.decode_image reads RGB WebP but not WebP with alpha or animation (TF 2.21), which are
# skipped and counted like any unreadable file.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPLIT_TEST_NAMES = ("test", "val")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def find_local(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    """The first `<name>.npz`, `<name>/` or `<name>.<archive>` in data_dir, or data_dir itself if it is the tree."""
    for name in names:
        for candidate in [data_dir / f"{name}.npz", data_dir / name] + [data_dir / f"{name}{s}" for s in ARCHIVE_SUFFIXES]:
            if candidate.exists():
                return candidate
    if (data_dir / "train").is_dir():
        return data_dir
    return None


def unpack(path: Path) -> Path:
    """A folder path as is; an archive extracted once into the cache (atomically), then that folder."""
    if path.is_dir():
        return path
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{path} is neither a folder, an .npz nor a .tar.gz/.tgz/.zip archive")
    target = cache_dir() / "extracted" / f"{path.name.split('.')[0]}-{file_key(path)}"
    if target.is_dir():
        return target
    # Not cache.atomic_path: it would delete a target that another process (a tuning worker) extracted
    # meanwhile and may be reading; here that race fails in os.replace instead.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    print(f"extracting {path} into {target} (once)", flush=True)
    try:
        _extract(path, staging)
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


def _extract(path: Path, folder: Path) -> None:
    """Extract a .zip or tar archive into `folder`, refusing entries that would land outside it."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise UserError(f"{path} holds an unsafe path {member!r}; refusing to extract it")
            archive.extractall(folder)
    else:
        with tarfile.open(path) as archive:
            archive.extractall(folder, filter="data")  # refuses absolute paths, '..' and links out


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
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file())


def _list_class_files(split_dir: Path, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        for file in sorted(folder.rglob("*")):
            hidden = any(_hidden(part) for part in file.relative_to(folder).parts)  # .ipynb_checkpoints/ too
            if file.is_file() and not hidden and file.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(file))
                labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64)


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
    train = image_split(train_paths, train_labels, root, size, channels)
    test = image_split(test_paths, test_labels, root, size, channels)
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
