"""Smoke tests on the real datasets in CNN_DATA_DIR (../shared/data); skipped when it is absent."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import SHARED_DATA, needs_shared_data

from experiments.datasets import CIFAR10_CLASSES, FASHION_MNIST_CLASSES, IMAGENETTE_CLASSES, load_dataset
from experiments.train import train

pytestmark = needs_shared_data


@pytest.mark.slow
def test_mnist_cnn_simple_learns_from_a_slice():
    result = train(dataset="mnist", arch="cnn_simple", epochs=1, limit=3000, data_dir=str(SHARED_DATA))
    run = mlflow.get_run(result.run_id)
    assert run.data.params["num_train"] == "3000" and run.data.params["num_test"] == "10000"
    assert result.test_accuracy > 0.85  # real learning on real digits


def test_fashion_mnist_loads_with_its_class_names():
    data = load_dataset("fashion_mnist", data_dir=SHARED_DATA)
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.image_shape == (28, 28, 1) and data.class_names == FASHION_MNIST_CLASSES


@pytest.mark.slow
def test_cifar10_npz_copy_trains_at_native_size_in_keras_label_order():
    # About 170 steps of 16: enough to leave chance well behind (8 steps of 128 may not). Each epoch validates on
    # 100 held-out training images, not on the 10,000 test images (30 s a pass on a slow CPU); the test
    # split is still predicted in full, once, at the end.
    result = train(dataset="cifar10", arch="cnn_deep", epochs=3, limit=1000, batch_size=16, validation_fraction=0.1,
                   data_dir=str(SHARED_DATA))
    run = mlflow.get_run(result.run_id)
    assert run.data.params["num_test"] == "10000" and run.data.params["skipped_images"] == "0"
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    assert model.metadata.signature.inputs.inputs[0].shape == (-1, 32, 32, 3)
    assert model.metadata.metadata["class_names"] == CIFAR10_CLASSES
    assert result.test_accuracy > 0.15  # above chance: the labels are in Keras' order


def test_imagenette_streams_from_class_folders_with_readable_names():
    data = load_dataset("imagenette", data_dir=SHARED_DATA, image_size=64, limit=200)
    assert (len(data.train), len(data.test)) == (200, 3925)
    assert data.class_names == list(IMAGENETTE_CLASSES.values())
    assert data.info["test_split"] == "val"
    assert np.bincount(data.train.labels).min() >= 18  # stratified: every class has its share
    image, _ = next(iter(data.test.images))
    assert image.shape == (64, 64, 3) and image.dtype.name == "uint8"
