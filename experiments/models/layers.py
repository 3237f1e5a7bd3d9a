"""The project's layers and layer helpers, shared by the architectures.

Custom layers train fast and `portable()` swaps stock Keras layers in before a model is saved, so
saved models need no custom code. The helpers build with stock layers only.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import layers

from experiments.models import DataSpec


def pixels(data: DataSpec, alternating_flip: bool = False) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """uint8 image input, rescaled to [0, 1] floats; optionally mirrored first by an AlternatingFlip,
    which needs the raw pixels (their sum picks which images start mirrored)."""
    inputs = keras.Input(shape=data.image_shape, dtype="uint8", name="image")
    x = AlternatingFlip()(inputs) if alternating_flip and data.hflip else inputs
    return inputs, layers.Rescaling(1.0 / 255)(x)


def classifier(x, data: DataSpec):
    """The softmax head every architecture ends on, in float32 under any dtype policy: the logits, then a
    softmax layer of their own, which temperature scaling and logit-averaged views build on."""
    logits = layers.Dense(data.num_classes, dtype="float32", name="logits")(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


def augmentation(data: DataSpec, translate: float = 0.125, random_flip: bool = True,
                 interpolation: str = "bilinear") -> keras.Sequential:
    """Random flips and shifts; active only while training, so serving sees the raw image."""
    steps = [layers.RandomFlip("horizontal")] if data.hflip and random_flip else []
    steps.append(layers.RandomTranslation(translate, translate, fill_mode="reflect", interpolation=interpolation))
    return keras.Sequential(steps, name="augmentation")


class AlternatingFlip(layers.Layer):
    """Training-only mirror that alternates: each image is seen mirrored every other epoch, not at random,
    so every pair of epochs shows both orientations (airbench's ablations: 10.8 -> 9.9 epochs to 94%).

    Which images start mirrored comes from the parity of their pixel sum, so the choice sticks to the
    image without an index. The callback from `flip_epoch_callbacks()` (a model entry's `callbacks` hook)
    sets `epoch` at the start of each epoch. Inference is the identity, and `portable()` swaps in a stock
    Identity layer before a model is saved.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.epoch = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False, name="epoch")

    def call(self, images, training=None):
        if not training:
            return images
        pixel_sum = keras.ops.sum(keras.ops.cast(images, "int32"), axis=(1, 2, 3))
        mirrored = keras.ops.equal((pixel_sum + self.epoch) % 2, 1)
        return keras.ops.where(mirrored[:, None, None, None], keras.ops.flip(images, axis=2), images)

    def compute_output_shape(self, input_shape):
        return input_shape


def flip_epoch_callbacks(model: keras.Model) -> list:
    """The callback that tells `model`'s epoch-aware layers (AlternatingFlip, EpochGatedBias) the epoch as each
    epoch begins (on resume too: the layers are looked up on the model given, which may come from a
    checkpoint); none if it has none."""
    flips = [layer for layer in model.layers if isinstance(layer, (AlternatingFlip, EpochGatedBias))]
    if not flips:  # they act by epoch: tell them the epoch
        return []
    return [keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs=None: [layer.epoch.assign(epoch) for layer in flips])]


class EpochGatedBias(layers.Layer):
    """A per-channel bias that trains for the first `epochs` epochs only, then stays (airbench trains its
    whitening layer's bias for 3 epochs). `portable()` swaps in a stock Rescaling with this offset."""

    def __init__(self, epochs: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.epochs = epochs

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")
        self.epoch = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False, name="epoch")

    def get_config(self):
        return {**super().get_config(), "epochs": self.epochs}

    def call(self, x, training=None):
        bias = keras.ops.cast(self.bias, x.dtype)
        frozen = keras.ops.stop_gradient(bias)
        return x + keras.ops.where(keras.ops.less(self.epoch, self.epochs), bias, frozen)

    def compute_output_shape(self, input_shape):
        return input_shape


class RandomShift(layers.Layer):
    """Training-only shifts by whole pixels, uniform in -`pixels`..`pixels` on each axis, the border reflected:
    airbench's crops of reflection-padded images. (`RandomTranslation` draws a fraction of the side and
    repeats edge pixels.) `portable()` swaps in a stock Identity layer before a model is saved."""

    def __init__(self, pixels: int = 2, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pixels = pixels
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self):
        return {**super().get_config(), "pixels": self.pixels}

    def call(self, images, training=None):
        if not training or not self.pixels:
            return images
        import tensorflow as tf

        p = self.pixels
        height, width = images.shape[1], images.shape[2]
        padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT")
        offsets = keras.random.randint((tf.shape(images)[0], 2), 0, 2 * p + 1, seed=self.seed_generator)
        rows = offsets[:, :1] + tf.range(height)[None]  # (batch, height): the source row of each output row
        cols = offsets[:, 1:] + tf.range(width)[None]
        return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)

    def compute_output_shape(self, input_shape):
        return input_shape


class FastBatchNorm(layers.BatchNormalization):
    """BatchNormalization whose training step is TensorFlow's fused kernel.

    Keras 3 normalises with separate moments and arithmetic ops. On this CPU in bfloat16 those
    cost three times the convolutions; the fused op lets oneDNN fuse conv + norm + ReLU (measured
    for cnn_modern: BENCHMARKS.md, "Speed notes measured while building this"). Inference is the
    stock layer's, and `portable()` swaps the stock layer back in before a model is saved, so saved
    models need no custom code.
    """

    def __init__(self, bias_scale: float = 1.0, **kwargs):
        # The offset is `bias_scale * beta`: with SGD that multiplies beta's learning rate by
        # bias_scale**2 (airbench: 64x, so 8). `portable()` folds it into a stock layer's beta.
        super().__init__(**kwargs)
        self.bias_scale = bias_scale

    def get_config(self):
        return {**super().get_config(), "bias_scale": self.bias_scale}

    def call(self, inputs, training=None, mask=None):
        fused = training and keras.backend.backend() == "tensorflow" and self.axis == len(inputs.shape) - 1
        if not fused:
            outputs = super().call(inputs, training=training, mask=mask)  # its offset is beta
            if self.bias_scale == 1.0 or not self.center:
                return outputs
            return outputs + keras.ops.cast(self.beta * (self.bias_scale - 1.0), outputs.dtype)
        import tensorflow as tf

        empty = tf.constant([], tf.float32)
        scale = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        offset = self.beta * self.bias_scale if self.center else tf.zeros_like(self.moving_mean)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=scale, offset=offset, mean=empty, variance=empty,
            epsilon=self.epsilon, data_format="NHWC", is_training=True,
        )
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1 - self.momentum))
        return outputs


def portable(model: keras.Model) -> keras.Model:
    """A copy of `model` with stock Keras layers only: same weights, same inference."""

    def clone(layer):
        if isinstance(layer, FastBatchNorm):
            config = layer.get_config()
            del config["bias_scale"]
            return layers.BatchNormalization.from_config(config)
        if isinstance(layer, (AlternatingFlip, RandomShift)):
            return layers.Identity(name=layer.name)
        if isinstance(layer, EpochGatedBias):
            return layers.Rescaling(1.0, offset=layer.bias.numpy().tolist(), name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    custom = (FastBatchNorm, AlternatingFlip, RandomShift, EpochGatedBias)
    if not any(isinstance(layer, custom) for layer in model.layers):
        return model
    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if not isinstance(layer, custom[1:]):  # their stock stand-ins hold no weights
            copy.get_layer(layer.name).set_weights(layer.get_weights())
    for layer in model.layers:
        if isinstance(layer, FastBatchNorm) and layer.center and layer.bias_scale != 1.0:
            copy.get_layer(layer.name).beta.assign(layer.beta * layer.bias_scale)
    return copy


@contextlib.contextmanager
def dtype_policy(name: str):
    """Build layers under a dtype policy, e.g. "mixed_bfloat16" (saved with each layer)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def conv_bn(x, filters: int, kernel_size: int = 3, momentum: float = 0.9, pool: bool = False, scale: bool = True,
            strides: int = 1, activation: str | None = "relu", gamma: str = "ones", bias_scale: float = 1.0,
            epsilon: float = 1e-3, kernel_initializer="glorot_uniform"):
    """Conv, then (optionally a 2x2 max-pool: a quarter of the normalising work), batch norm, then the
    activation (none if None)."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                      kernel_initializer=kernel_initializer)(x)
    if pool:
        x = layers.MaxPooling2D(2)(x)
    # Momentum 0.9 (Keras: 0.99) so inference statistics settle within a short run.
    x = FastBatchNorm(momentum=momentum, scale=scale, gamma_initializer=gamma, bias_scale=bias_scale,
                      epsilon=epsilon)(x)
    # ReLU by default, not GELU: oneDNN fuses conv + norm + ReLU; GELU in bfloat16 runs several times slower
    # here (BENCHMARKS.md, "Speed notes measured while building this").
    return layers.Activation(activation)(x) if activation else x


def dirac_init(model: keras.Model) -> None:
    """Start each trainable 3x3 conv as the identity on its first input channels (airbench's dirac init,
    21 -> 18 epochs to 94% in its ablations); the other filters keep their random init."""
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer.trainable and layer.kernel_size == (3, 3):
            kernel = np.array(layer.kernel.numpy())
            channels = min(kernel.shape[2], kernel.shape[3])
            kernel[:, :, :, :channels] = 0.0
            kernel[1, 1, np.arange(channels), np.arange(channels)] = 1.0
            layer.kernel.assign(kernel)


def mirror(images, name: str = "mirror"):
    """Left-right mirror images with stock layers (a fixed permutation matrix), so saved models need no custom code."""
    width = images.shape[2]
    x = layers.Permute((1, 3, 2))(images)  # (batch, height, channels, width)
    reverse = keras.initializers.Constant(np.eye(width, dtype="float32")[::-1])
    x = layers.Dense(width, use_bias=False, kernel_initializer=reverse, trainable=False, dtype="float32",
                     name=name)(x)
    return layers.Permute((1, 3, 2))(x)


def crop(images, axis: int, start: int, stop: int):
    """Rows (axis 1) or columns (axis 2) [start, stop) of a batch of images, as a stock layer."""
    cut = (start, images.shape[axis] - stop)
    return layers.Cropping2D((cut, (0, 0)) if axis == 1 else ((0, 0), cut))(images)


def shift(images, rows: int, cols: int):
    """Images moved by one pixel (rows, cols in -1, 0, 1), the border reflected, with stock layers."""
    for axis, step in ((1, rows), (2, cols)):
        size = images.shape[axis]
        if step > 0:  # down/right: the new first row is the second row, reflected
            parts = [crop(images, axis, 1, 2), crop(images, axis, 0, size - 1)]
        elif step < 0:  # up/left: the new last row is the second-to-last, reflected
            parts = [crop(images, axis, 1, size), crop(images, axis, size - 2, size - 1)]
        else:
            continue
        images = layers.Concatenate(axis=axis)(parts)
    return images
