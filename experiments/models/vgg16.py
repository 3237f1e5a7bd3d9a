"""Transfer learning: a small head trained on frozen ImageNet VGG16 features."""

from __future__ import annotations

import keras
from keras import layers

from experiments.errors import UserError
from experiments.models import DataSpec, register_model
from experiments.models.layers import classifier

# Caffe-style channel means that the ImageNet VGG16 weights expect, in RGB order.
VGG16_RGB_MEAN = (123.68, 116.779, 103.939)


def vgg16_features(data: DataSpec, weights: str | None = "imagenet") -> keras.Model:
    """uint8 RGB image -> frozen VGG16 convolutional features, preprocessing inside.

    `weights` is "imagenet" (Keras downloads it), None (random, for tests) or a path to a
    local `.h5` / `.weights.h5` file.
    """
    height, width, channels = data.image_shape
    if channels != 3:
        raise UserError(f"vgg16_head needs RGB images, got {channels} channel(s); use a colour dataset")
    base = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(height, width, 3)
    )
    if weights == "imagenet":
        base.load_weights(
            keras.utils.get_file(
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                cache_subdir="models",
                file_hash="6d6bbae143d832006294945121d1f1fc",
            )
        )
    elif weights:
        base.load_weights(weights)
    # The weights expect BGR input. Reversing the first kernel's input channels makes the
    # network take RGB directly, so preprocessing is a plain built-in Normalization layer.
    first = base.get_layer("block1_conv1")
    kernel, bias = first.get_weights()
    first.set_weights([kernel[:, :, ::-1, :], bias])
    base.trainable = False

    inputs = keras.Input(shape=data.image_shape, dtype="uint8", name="image")
    x = layers.Normalization(mean=VGG16_RGB_MEAN, variance=(1.0, 1.0, 1.0))(inputs)
    return keras.Model(inputs, base(x), name="vgg16_features")


def vgg16_head_layers(feature_shape: tuple, data: DataSpec) -> keras.Model:
    """The tutorial's small head on VGG16 features: Flatten, Dense 100, Dropout, BatchNorm."""
    features = keras.Input(shape=feature_shape, name="vgg16_features")
    x = layers.Flatten()(features)
    x = layers.Dense(100, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.BatchNormalization()(x)
    return keras.Model(features, classifier(x, data), name="head")


@register_model(optimizer="adam", features="vgg16")
def vgg16_head(data: DataSpec, weights: str | None = "imagenet") -> keras.Model:
    """Frozen VGG16 features + the tutorial's dense head, as one image-to-class model (94%+)."""
    extractor = vgg16_features(data, weights)
    head = vgg16_head_layers(extractor.output_shape[1:], data)
    return keras.Model(extractor.input, head(extractor.output), name="vgg16_head")
