"""Grad-CAM finds where the class signal is (runs plot it: tests/test_report.py; the served model explains
on request: tests/test_gate.py)."""

from __future__ import annotations

import base64
import io

import keras
import numpy as np
from PIL import Image

from experiments import gradcam
from experiments.models import DataSpec, create_model
from experiments.models.layers import classifier, pixels


def quadrant_task(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of a plain grey level with light pixel noise, whose class is a bright bar somewhere inside
    the top-left quadrant: horizontal (0) or vertical (1). The background carries no oriented texture,
    so nothing outside the quadrant is evidence for either class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    grey = rng.integers(0, 120, (count, 1, 1, 1))
    images = (grey + rng.integers(0, 30, (count, 32, 32, 1))).astype(np.uint8)
    for image, label, (row, col) in zip(images, labels, rng.integers(2, 10, (count, 2))):
        if label == 0:
            image[row + 2 : row + 4, col : col + 6] = 255
        else:
            image[row : row + 6, col + 2 : col + 4] = 255
    return images, labels


def small_cnn(spec: DataSpec) -> keras.Model:
    """Three convolutions, two poolings and global average pooling, ending on the project's head."""
    inputs, x = pixels(spec)
    for width in (16, 32):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, classifier(x, spec))


def test_most_of_the_heatmap_falls_where_the_class_signal_is():
    keras.utils.set_random_seed(0)
    spec = DataSpec((32, 32, 1), 2, hflip=False)
    model = small_cnn(spec)
    images, labels = quadrant_task(600, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=8, batch_size=32, verbose=0)
    test_images, test_labels = quadrant_task(100, seed=1)
    assert model.evaluate(test_images, test_labels, verbose=0)[1] > 0.95

    layer = gradcam.feature_layer(model)
    assert layer == "features"  # the last convolution's map, not the pooled one after it
    heatmaps = gradcam.heatmaps(gradcam.explainer(model, layer), test_images)
    assert heatmaps.shape == (100, 32, 32) and heatmaps.min() >= 0 and heatmaps.max() <= 1
    in_quadrant = heatmaps[:, :16, :16].sum(axis=(1, 2)) / np.maximum(heatmaps.sum(axis=(1, 2)), 1e-12)
    assert in_quadrant.mean() > 0.5, in_quadrant.mean()  # a quarter of the image holds most of the mass


def test_a_network_without_convolutions_has_no_feature_map_to_explain():
    spec = DataSpec((28, 28, 1), 10, hflip=False)
    assert gradcam.feature_layer(create_model("mlp", spec)) is None
    assert gradcam.feature_layer(create_model("cnn_simple", spec)) is not None


def test_a_heatmap_is_a_png_of_the_images_size():
    heatmap = np.linspace(0, 1, 24 * 20, dtype=np.float32).reshape(24, 20)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(gradcam.png(heatmap)))))
    assert decoded.shape == (24, 20) and decoded.dtype == np.uint8 and (decoded[0, 0], decoded[-1, -1]) == (0, 255)
