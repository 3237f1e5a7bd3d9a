"""The dataset registry on small files the tests make themselves."""

from __future__ import annotations

import tarfile
import zipfile

import numpy as np
import pytest
from conftest import make_image_tree, make_npz

from experiments import datasets
from experiments.cache import cache_dir
from experiments.datasets import Source, list_datasets, load_dataset, stratified_indices
from experiments.errors import UserError


def test_registry_names_every_dataset_the_issue_asks_for():
    assert list_datasets() == sorted(
        ["mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette", "imagewoof", "caltech101", "folder"]
    )


def test_npz_loads_as_uint8_images_with_a_channel_axis(tiny_npz_dir):
    data = load_dataset("mnist", data_dir=tiny_npz_dir)
    assert data.image_shape == (28, 28, 1)
    assert data.class_names == [str(i) for i in range(10)]
    assert (len(data.train), len(data.test)) == (60, 20)
    image, label = next(iter(data.train.images))
    assert image.dtype.name == "uint8" and image.shape == (28, 28, 1)
    assert int(label) == data.train.labels[0]
    assert data.source == str(tiny_npz_dir / "mnist.npz")


def test_data_dir_falls_back_to_the_environment_variable(tiny_npz_dir, monkeypatch):
    monkeypatch.setenv("CNN_DATA_DIR", str(tiny_npz_dir))
    assert len(load_dataset("mnist").train) == 60


def test_digest_is_stable_and_changes_with_the_data(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_npz(a / "mnist.npz", seed=0)
    make_npz(b / "mnist.npz", seed=1)
    assert load_dataset("mnist", data_dir=a).digest == load_dataset("mnist", data_dir=a).digest
    assert load_dataset("mnist", data_dir=a).test.digest != load_dataset("mnist", data_dir=b).test.digest


def test_limit_is_an_exact_stratified_seeded_cap(tiny_npz_dir):
    data = load_dataset("mnist", data_dir=tiny_npz_dir, limit=30, seed=3)
    assert len(data.train) == 30
    assert np.bincount(data.train.labels).tolist() == [10, 10, 10]
    assert len(data.test) == 20  # the test split is never capped
    assert data.info["limit"] == 30
    again = load_dataset("mnist", data_dir=tiny_npz_dir, limit=30, seed=3)
    assert again.train.digest == data.train.digest


def test_stratified_indices_keep_class_proportions():
    labels = np.array([0] * 80 + [1] * 20)
    picked = stratified_indices(labels, 10, seed=0)
    assert len(picked) == 10 and len(set(picked)) == 10
    assert np.bincount(labels[picked]).tolist() == [8, 2]


def test_folder_tree_streams_resized_rgb_images(image_tree):
    data = load_dataset("folder", data_dir=image_tree, image_size=16)
    assert data.class_names == ["cat", "dog"]
    assert data.image_shape == (16, 16, 3)
    assert (len(data.train), len(data.test)) == (12, 6)
    images = np.stack([x for x, _ in data.train.images.as_numpy_iterator()])
    assert images.dtype == np.uint8 and images.shape == (12, 16, 16, 3)
    # cat is red, dog is blue: the labels travel with the right pixels.
    red = images[..., 0].mean(axis=(1, 2)) > images[..., 2].mean(axis=(1, 2))
    assert (red == (data.train.labels == 0)).all()
    assert data.info["test_split"] == "test"


def test_unreadable_images_are_skipped_and_counted(image_tree):
    (image_tree / "train" / "cat" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (image_tree / "train" / "dog" / "empty.png").write_bytes(b"")
    (image_tree / "train" / "dog" / ".hidden.png").write_bytes(b"\x89PNG")  # hidden: never listed
    data = load_dataset("folder", data_dir=image_tree, image_size=16)
    assert len(data.train) == 12
    assert data.train.skipped == 2
    assert data.info["skipped_images"] == 2


def test_tree_without_a_split_gets_a_seeded_stratified_one(tmp_path):
    root = make_image_tree(tmp_path / "flat", classes=("a", "b", "c"), per_class=(10,), splits=())
    data = load_dataset("folder", data_dir=root, image_size=8, test_fraction=0.3, seed=1)
    assert np.bincount(data.test.labels).tolist() == [3, 3, 3]
    assert np.bincount(data.train.labels).tolist() == [7, 7, 7]
    assert data.info == {"test_split": "seeded_stratified", "test_fraction": 0.3, "split_seed": 1, "skipped_images": 0}
    same = load_dataset("folder", data_dir=root, image_size=8, test_fraction=0.3, seed=1)
    other = load_dataset("folder", data_dir=root, image_size=8, test_fraction=0.3, seed=2)
    assert same.test.digest == data.test.digest != other.test.digest


def test_archives_are_extracted_once_into_the_cache(image_tree, tmp_path):
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_tree, arcname="pets")
    first = load_dataset("folder", data_dir=archive, image_size=8)
    extracted = list((cache_dir() / "extracted").iterdir())
    second = load_dataset("folder", data_dir=archive, image_size=8)
    assert extracted == list((cache_dir() / "extracted").iterdir()) and len(extracted) == 1
    assert first.class_names == ["cat", "dog"] and first.digest == second.digest


def test_named_dataset_found_as_an_archive_in_data_dir_with_readable_class_names(tmp_path):
    wnids = ("n01440764", "n02102040")
    tree = make_image_tree(tmp_path / "src" / "imagenette2-160", classes=wnids, splits=("train", "val"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "imagenette2-160.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="imagenette2-160")
    data = load_dataset("imagenette", data_dir=data_dir, image_size=16)
    assert data.class_names == ["tench", "English springer"]
    assert data.info["test_split"] == "val"


def test_archive_with_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(payload, arcname="../escaped.txt")
    with pytest.raises(UserError, match="unsafe"):
        load_dataset("folder", data_dir=archive)
    assert not (cache_dir() / "escaped.txt").exists()


def test_failed_download_names_the_url_and_the_local_option(tmp_path):
    source = Source(data_dir=tmp_path, image_size=16, limit=0, seed=0, test_fraction=0.2, hflip=True)
    url = "http://127.0.0.1:9/imagewoof2-160.tgz"  # nothing listens on the discard port
    with pytest.raises(UserError) as err:
        source.load("imagewoof", ("imagewoof",), datasets.archive_download("nowhere.tgz", url, None), url)
    message = str(err.value)
    assert url in message and "data_dir" in message and "CNN_DATA_DIR" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "svhn"}, "unknown dataset 'svhn'; choose one of: caltech101, cifar10"),
        ({"name": "mnist", "limit": -5}, "limit must be 0"),
        ({"name": "mnist", "data_dir": "/no/such/dir"}, "data_dir /no/such/dir does not exist"),
        ({"name": "folder"}, "needs -P data_dir"),
        ({"name": "folder", "test_fraction": 1.5}, "test_fraction must be between 0 and 1"),
    ],
)
def test_bad_dataset_arguments_give_one_line_errors(kwargs, fragment, monkeypatch):
    monkeypatch.delenv("CNN_DATA_DIR", raising=False)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")) as err:
        load_dataset(**kwargs)
    assert "\n" not in str(err.value)


def test_folder_with_one_class_is_refused(tmp_path):
    root = make_image_tree(tmp_path / "one", classes=("only",))
    with pytest.raises(UserError, match="at least 2"):
        load_dataset("folder", data_dir=root)


def test_train_and_test_with_different_classes_are_refused(image_tree):
    (image_tree / "test" / "dog").rename(image_tree / "test" / "wolf")
    with pytest.raises(UserError, match="different class folders"):
        load_dataset("folder", data_dir=image_tree)


def test_npz_with_missing_keys_or_wrong_dtype_is_refused(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(UserError, match="lacks y_train, x_test, y_test"):
        load_dataset("mnist", data_dir=tmp_path)
    zeros = np.zeros((2, 4, 4), np.float64)
    np.savez(tmp_path / "mnist.npz", x_train=zeros, y_train=[0, 1], x_test=zeros, y_test=[0, 1])
    with pytest.raises(UserError, match="x_train is float64"):
        load_dataset("mnist", data_dir=tmp_path)


def test_a_compressed_npz_is_decoded_once_into_the_cache_then_memory_mapped(tmp_path):
    # The lossless CIFAR-10 copy's members are LZMA-compressed: about 11 s per load if decoded every time.
    plain = make_npz(tmp_path / "plain.npz")
    with np.load(plain) as npz:
        arrays = {k: npz[k] for k in npz.files}
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    first = load_dataset("mnist", data_dir=tmp_path)
    decoded = list((cache_dir() / "decoded").iterdir())
    assert [folder.name.split("-")[0] for folder in decoded] == ["mnist"]
    assert sorted(p.name for p in decoded[0].iterdir()) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    again = datasets.arrays.read_npz(tmp_path / "mnist.npz")
    assert isinstance(again["x_train"], np.memmap)  # read from the cache, not decoded again
    np.testing.assert_array_equal(again["x_train"], arrays["x_train"])
    assert load_dataset("mnist", data_dir=tmp_path).train.digest == first.train.digest
    # A replaced file has another digest: it is decoded anew, never served from the old copy.
    arrays["y_test"] = (arrays["y_test"] + 1) % 3
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    np.testing.assert_array_equal(load_dataset("mnist", data_dir=tmp_path).test.labels, arrays["y_test"])
    assert len(list((cache_dir() / "decoded").iterdir())) == 2
    assert not list((cache_dir() / "decoded").glob(".partial-*"))  # staging folders never stay behind


def test_a_stored_npz_is_read_as_it_is_without_a_cached_copy(tiny_npz_dir):
    load_dataset("mnist", data_dir=tiny_npz_dir)
    assert not (cache_dir() / "decoded").exists()


def test_a_corrupt_compressed_npz_is_refused_in_one_line(tmp_path):
    np.savez_compressed(tmp_path / "mnist.npz", x_train=np.zeros((200, 8, 8), np.uint8))
    data = bytearray((tmp_path / "mnist.npz").read_bytes())
    data[60:90] = b"\xff" * 30  # inside the member's compressed stream
    (tmp_path / "mnist.npz").write_bytes(bytes(data))
    with pytest.raises(UserError, match="cannot read .*mnist.npz .*replace it with a valid .npz"):
        load_dataset("mnist", data_dir=tmp_path)


def test_fixed_size_datasets_keep_their_native_size_from_a_folder_copy(tmp_path):
    # A CIFAR-10 folder copy must not be resized to image_size: that would be 16x the compute.
    make_image_tree(tmp_path / "cifar10", classes=("airplane", "automobile"), size=(32, 32))
    data = load_dataset("cifar10", data_dir=tmp_path, image_size=128)
    assert data.image_shape == (32, 32, 3)
    make_image_tree(tmp_path / "mnist", classes=("0", "1"), size=(28, 28))
    assert load_dataset("mnist", data_dir=tmp_path, image_size=128).image_shape == (28, 28, 1)


def test_caltech101_layout_nested_archive_unsplit_tree_without_background_class(tmp_path):
    # As shipped: caltech-101.zip > caltech-101/101_ObjectCategories.tar.gz > 101_ObjectCategories/<class>/
    tree = make_image_tree(tmp_path / "src" / "101_ObjectCategories", classes=("accordion", "BACKGROUND_Google",
                                                                                 "camera"), per_class=(5,), splits=())
    inner = tmp_path / "101_ObjectCategories.tar.gz"
    with tarfile.open(inner, "w:gz") as tar:
        tar.add(tree, arcname="101_ObjectCategories")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with zipfile.ZipFile(data_dir / "caltech-101.zip", "w") as archive:
        archive.write(inner, "caltech-101/101_ObjectCategories.tar.gz")
        archive.writestr("caltech-101/show_annotation.m", "% not data")
    data = load_dataset("caltech101", data_dir=data_dir, image_size=16, test_fraction=0.4)
    assert data.class_names == ["accordion", "camera"]
    assert (len(data.train), len(data.test)) == (6, 4)
    assert data.info["test_split"] == "seeded_stratified"


def test_missing_cnn_data_dir_is_named(monkeypatch):
    monkeypatch.setenv("CNN_DATA_DIR", "/no/such/data")
    with pytest.raises(UserError, match="CNN_DATA_DIR=/no/such/data does not exist"):
        load_dataset("mnist")
