"""The tutorial's seed architectures, layer for layer, and the CNN family the tuner searches."""

from __future__ import annotations

import keras
from keras import layers

from experiments.models import DataSpec, register_model
from experiments.models.layers import augmentation, classifier, conv_bn, pixels


@register_model(optimizer="adam")
def mlp(data: DataSpec) -> keras.Model:
    """Tutorial dense net: flatten, Dense 100, softmax (MNIST, about 97%)."""
    inputs, x = pixels(data)
    x = layers.Flatten()(x)
    x = layers.Dense(100, activation="relu")(x)
    return keras.Model(inputs, classifier(x, data), name="mlp")


@register_model(optimizer="adam")
def cnn_simple(data: DataSpec) -> keras.Model:
    """Tutorial one-conv CNN: Conv 25, MaxPool 1x1, Dense 100 (MNIST, 98%+)."""
    inputs, x = pixels(data)
    x = layers.Conv2D(25, 3, strides=1, padding="valid", activation="relu")(x)
    x = layers.MaxPooling2D(pool_size=1)(x)  # a no-op, kept from the tutorial
    x = layers.Flatten()(x)
    x = layers.Dense(100, activation="relu")(x)
    return keras.Model(inputs, classifier(x, data), name="cnn_simple")


@register_model(optimizer="adam")
def cnn_deep(data: DataSpec) -> keras.Model:
    """Tutorial CIFAR-10 CNN: Conv 50-75-125, Dense 500-250 with dropout (78-80%)."""
    return convnet(data, blocks=[((50, 75), 0.25), ((125,), 0.25)], dense=[(500, 0.4), (250, 0.3)], name="cnn_deep")


@register_model(optimizer="adam")
def cnn_basic(data: DataSpec) -> keras.Model:
    """Tutorial Imagenette CNN: cnn_deep's Conv/Pool/Dropout/Dense pattern, five convs deep (40-50%)."""
    blocks = [((32,), 0.0), ((64,), 0.0), ((128,), 0.25), ((128,), 0.25), ((256,), 0.25)]
    return convnet(data, blocks=blocks, dense=[(256, 0.5)], name="cnn_basic")


@register_model(optimizer="adam")
def convnet(
    data: DataSpec,
    blocks=(((32,), 0.25), ((64,), 0.25)),
    dense=((128, 0.5),),
    kernel_size: int = 3,
    batch_norm: bool = False,
    augment: float = 0.0,
    name: str = "convnet",
) -> keras.Model:
    """The tutorial's CNN family: blocks of 3x3 convs + 2x2 max-pool + dropout, then dense layers.

    `blocks` is a list of (conv widths, dropout); `dense` a list of (units, dropout). `augment` > 0
    adds flips and shifts of that fraction of the image. The tuner searches this space, and
    `cnn_deep` and `cnn_basic` are points in it.
    """
    inputs, x = pixels(data)
    if augment:
        x = augmentation(data, augment)(x)
    for widths, dropout in blocks:
        for filters in widths:
            if batch_norm:
                x = conv_bn(x, filters, kernel_size)
            else:
                x = layers.Conv2D(filters, kernel_size, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    for units, dropout in dense:
        x = layers.Dense(units, activation="relu")(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, classifier(x, data), name=name)
