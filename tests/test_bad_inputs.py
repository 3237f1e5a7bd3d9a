"""The bad-input catalogue: odd image files, broken archives and labels, bad settings, an unusable cache,
an unreachable tracking server. Each is skipped and counted, or refused in one line naming the fix.

(More cases live beside the code they test: test_datasets, test_train, test_tuning, test_registry.)
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import PROJECT_ROOT, free_port, make_image_tree, make_npz, python_env
from PIL import Image

from experiments.errors import UserError
from experiments.train import TrainConfig, load_data, train


def save(path: Path, image: Image.Image, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def no_runs() -> bool:
    return mlflow.search_runs(search_all_experiments=True).empty


# --- Odd image files in a class-folder tree --------------------------------------------------------


def test_odd_image_files_are_kept_converted_or_skipped_and_counted(tmp_path):
    root = make_image_tree(tmp_path / "tree", classes=("cat", "dog"), per_class=(4, 2), size=(24, 24))
    cat = root / "train" / "cat"
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
    kept = {  # converted to 3-channel uint8, as the serving wrapper does
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((24, 24), 128, np.uint8)])),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),  # 16-bit greyscale
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    for name, image in kept.items():
        save(cat / name, image, "JPEG" if name.endswith(".jpg") else "PNG")
    good = rgb.copy()
    good_png = io.BytesIO()
    Image.fromarray(good).save(good_png, format="PNG")
    skipped = {
        "tiny.png": lambda p: save(p, Image.fromarray(rgb[:1, :1]), "PNG"),  # 1x1: no class in it
        "huge.png": lambda p: save(p, Image.new("1", (9000, 8000)), "PNG"),  # 72M pixels, over the cap
        "corrupt.jpg": lambda p: p.write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes()),
        "truncated.png": lambda p: p.write_bytes(good_png.getvalue()[:60]),
        "empty.png": lambda p: p.write_bytes(b""),
        "notes.jpg": lambda p: p.write_text("not an image, whatever the extension says"),
    }
    for name, write in skipped.items():
        write(cat / name)
    # Hidden files are not images of the class: never read, never counted.
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    save(cat / ".ipynb_checkpoints" / "grey-checkpoint.png", Image.fromarray(rgb), "PNG")
    save(root / "__MACOSX" / "train" / "cat" / "._grey.png", Image.fromarray(rgb), "PNG")

    data = load_data(TrainConfig(dataset="folder", arch="cnn_basic", data_dir=str(root), image_size=24))
    assert data.info["skipped_images"] == len(skipped)
    assert len(data.train) == 4 + 4 + len(kept)  # make_image_tree's 4 cats and 4 dogs, plus the converted ones
    assert data.image_shape == (24, 24, 3)
    # In file order: cat_0..cat_3, cmyk, deep, grey, rgba. The 16-bit file keeps its picture (the high
    # byte, as served), not clipped to white; RGBA loses only its alpha.
    images = [image for image, _ in data.train.images.as_numpy_iterator()]
    deep, grey, rgba = images[5], images[6], images[7]
    np.testing.assert_array_equal(deep, grey)
    np.testing.assert_array_equal(grey[..., 0], rgb[..., 0])
    np.testing.assert_array_equal(rgba, rgb)


def test_an_empty_class_folder_is_refused_before_training(tmp_path):
    root = make_image_tree(tmp_path / "tree", classes=("cat", "dog", "fox"), per_class=(4, 2))
    for file in (root / "train" / "fox").iterdir():
        file.unlink()
    with pytest.raises(UserError, match=r"class folder\(s\) fox under .* hold no training images; add images or remove"):
        train(dataset="folder", arch="cnn_basic", epochs=1, data_dir=str(root), image_size=20)
    assert no_runs()


# --- Broken archives and arrays ----------------------------------------------------------------------


def broken_npz(kind: str, path: Path) -> Path:
    make_npz(path)
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "corrupt stream":
        arrays = dict(np.load(path))
        np.savez_compressed(path, **arrays)
        raw = bytearray(path.read_bytes())
        middle = len(raw) // 2
        raw[middle:middle + 64] = bytes(64)
        path.write_bytes(bytes(raw))
    elif kind == "float labels":
        arrays = dict(np.load(path))
        np.savez(path, **{**arrays, "y_train": arrays["y_train"].astype(np.float32)})
    elif kind == "labels past the classes":
        arrays = dict(np.load(path))
        arrays["y_test"][0] = 10
        np.savez(path, **arrays)
    elif kind == "fewer labels than images":
        arrays = dict(np.load(path))
        np.savez(path, **{**arrays, "y_train": arrays["y_train"][:-5]})
    return path


@pytest.mark.parametrize("kind, message", [
    ("zero bytes", r"cannot read .*mnist.npz \(.*\); replace it with a valid .npz"),
    ("corrupt stream", r"cannot read .*mnist.npz \(.*\); replace it with a valid .npz"),
    ("float labels", r"y_train has 60 float32 labels for 60 images; expected one integer label per image"),
    ("labels past the classes", r"y_test holds labels 0..10; expected 0..9"),
    ("fewer labels than images", r"y_train has 55 \w+ labels for 60 images"),
])
def test_a_broken_npz_is_refused_in_one_line(kind, message, tmp_path):
    broken_npz(kind, tmp_path / "mnist.npz")
    with pytest.raises(UserError, match=message):
        train(dataset="mnist", arch="mlp", epochs=1, data_dir=str(tmp_path))
    assert no_runs()


def broken_archive(kind: str, folder: Path) -> Path:
    tree = make_image_tree(folder / "src" / "pets", per_class=(2, 1))
    if kind == "garbage zip":
        path = folder / "pets.zip"
        path.write_bytes(b"PK\x03\x04" + bytes(200))
    elif kind == "truncated tar.gz":
        path = folder / "pets.tar.gz"
        with tarfile.open(path, "w:gz") as archive:
            archive.add(tree, arcname="pets")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "zip with ../":
        path = folder / "pets.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("pets/train/cat/a.png", b"x")
            archive.writestr("../../outside.png", b"x")
    elif kind == "tar with ../":
        path = folder / "pets.tar"
        with tarfile.open(path, "w") as archive:
            info = tarfile.TarInfo("../outside.png")
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
    return path


@pytest.mark.parametrize("kind, message", [
    ("garbage zip", r"cannot extract .*pets.zip .*; replace the archive with a complete copy"),
    ("truncated tar.gz", r"cannot extract .*pets.tar.gz .*; replace the archive with a complete copy"),
    ("zip with ../", r"pets.zip holds an unsafe path '../../outside.png'; refusing to extract it"),
    ("tar with ../", r"pets.tar holds an unsafe entry .*; refusing to extract it"),
])
def test_a_broken_or_unsafe_archive_is_refused_and_leaves_nothing_behind(kind, message, tmp_path):
    from experiments.cache import cache_dir

    path = broken_archive(kind, tmp_path)
    with pytest.raises(UserError, match=message):
        train(dataset="folder", arch="cnn_basic", epochs=1, data_dir=str(path), image_size=20)
    assert not (tmp_path.parent / "outside.png").exists() and not (tmp_path / "outside.png").exists()
    assert not list((cache_dir() / "extracted").glob("*"))  # no half-extracted folder
    assert no_runs()


def test_a_macos_zip_with_its_resource_forks_is_read(tmp_path):
    tree = make_image_tree(tmp_path / "src" / "pets", per_class=(3, 2))
    path = tmp_path / "pets.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(tree.rglob("*.*")):
            archive.write(file, f"pets/{file.relative_to(tree)}")
            archive.writestr(f"__MACOSX/pets/{file.relative_to(tree).parent}/._{file.name}", b"\0\5\26\7")
    data = load_data(TrainConfig(dataset="folder", arch="cnn_basic", data_dir=str(path), image_size=20))
    assert data.class_names == ["cat", "dog"] and len(data.train) == 6 and data.info["skipped_images"] == 0


# --- Bad settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"seed": -1}, "seed must be 0 or a positive integer, got -1"),
    ({"options": {"widht": 3}}, r"bad options for cnn_modern \(got an unexpected keyword argument 'widht'\)"),
    ({"options": {"widths": [8]}, "arch": "mlp"}, r"bad options for mlp"),
])
def test_bad_settings_fail_before_any_run(overrides, message, tiny_cifar):
    settings = {"dataset": "cifar10", "arch": "cnn_modern", "epochs": 1, "data_dir": str(tiny_cifar), **overrides}
    with pytest.raises(UserError, match=message):
        train(**settings)
    assert no_runs()


def test_unknown_registered_models_fail_in_one_line(capsys, image_tree):
    from registry import predict, promote

    assert promote.main(["--rollback", "nope"]) == 2
    assert "error: nope has no champion to roll back; run promote first" in capsys.readouterr().err
    assert predict.main([str(image_tree), "--model", "models:/nope@champion"]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "models:/nope@champion" in line
    assert predict.main([str(image_tree), "--batch-size", "0"]) == 2
    assert "error: --batch-size must be at least 1, got 0" in capsys.readouterr().err


# --- The cache directory -------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real small (or read-only) filesystem: what a full or read-only disk does, without mocks."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_cache_directory_is_refused_before_any_run(tmp_path, monkeypatch, tiny_npz_dir):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as cache:
        monkeypatch.setenv("CNN_CACHE_DIR", str(cache))
        with pytest.raises(UserError, match=rf"cache directory {cache} is not writable \(Read-only file system\); "
                                            "set CNN_CACHE_DIR to a writable folder"):
            train(dataset="mnist", arch="mlp", epochs=1, data_dir=str(tiny_npz_dir))
    assert no_runs()


def fill(folder: Path) -> None:
    """Take every free byte of the filesystem under `folder`."""
    import os

    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(descriptor)


@pytest.mark.slow
def test_a_full_cache_costs_checkpoints_and_caches_never_the_run(tmp_path, monkeypatch, tiny_npz_dir, capsys):
    from experiments import cache as caches, precision

    monkeypatch.setattr(precision, "cache_dir", caches.cache_dir)  # its timings too go into the full cache
    with tmpfs(tmp_path / "full", "96k") as cache:
        monkeypatch.setenv("CNN_CACHE_DIR", str(cache))
        result = train(dataset="mnist", arch="cnn_simple", epochs=2, batch_size=16, data_dir=str(tiny_npz_dir))
        out = capsys.readouterr().out
        assert "epoch 1 not checkpointed (No space left on device)" in out
        assert mlflow.get_run(result.run_id).info.status == "FINISHED"
        assert not list(cache.rglob("*.partial")) and not list(cache.rglob(".staging-*"))

        fill(cache)
        root = make_image_tree(tmp_path / "tree", per_class=(4, 2), size=(40, 40))
        vgg = train(dataset="folder", arch="vgg16_head", epochs=1, batch_size=4, data_dir=str(root), image_size=32,
                    weights="none")
        out = capsys.readouterr().out
        assert "VGG16 features not cached (No space left on device)" in out
        assert "precision timings not cached (No space left on device)" in out  # auto measured, and went on
        assert mlflow.get_run(vgg.run_id).info.status == "FINISHED"
        assert not list(cache.rglob("*.partial"))

        archive = tmp_path / "big.tar"
        with tarfile.open(archive, "w") as tar:
            big = tmp_path / "big" / "train" / "cat" / "noise.png"
            save(big, Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)), "PNG")
            tar.add(tmp_path / "big", arcname="big")
        with pytest.raises(UserError, match=r"cannot extract .*big.tar into .* \(No space left on device\); free space"):
            load_data(TrainConfig(dataset="folder", arch="cnn_basic", data_dir=str(archive)))


# --- The tracking server ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_unreachable_tracking_server_fails_fast_in_one_line(tiny_cifar, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    message = f"tracking server {uri} is unreachable"
    with pytest.raises(UserError, match=message):
        train(dataset="cifar10", arch="cnn_simple", epochs=1, data_dir=str(tiny_cifar))

    from registry import promote
    from tuning.search import main as search

    assert search(["--dataset", "cifar10", "--data-dir", str(tiny_cifar), "--max-trials", "1"]) == 2
    assert promote.main(["--dataset", "cifar10"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(message in line for line in errors)
    out = subprocess.run(["python", "-m", "experiments.train", "--dataset", "cifar10", "--arch", "cnn_simple",
                          "--data-dir", str(tiny_cifar)], cwd=PROJECT_ROOT, env=python_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {message} (Connection refused); start it, or unset MLFLOW_TRACKING_URI to use ./mlflow.db"
    ]
