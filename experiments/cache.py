"""The cache folder (extracted archives, VGG16 features, checkpoints) and writes a kill cannot tear.

Everything written here appears whole under its real name or not at all: it is written under a
temporary name in the same folder, then renamed, which is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from experiments.errors import UserError


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


@contextlib.contextmanager
def atomic_path(target: Path):
    """Yield a temporary file path beside `target`; on success it is renamed to `target`, on any error
    (a kill included) it is removed and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".partial-", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
