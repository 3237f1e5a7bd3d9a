"""Beyond the tutorial: a compact modern CNN (CIFAR-10) and fast.ai's xresnet (Imagenette)."""

from __future__ import annotations

import keras
from keras import layers

from experiments.errors import UserError
from experiments.models import DataSpec, register_model
from experiments.models.layers import augmentation, classifier, conv_bn, pixels


@register_model(optimizer="adamw", learning_rate=0.002, schedule="cosine", weight_decay=0.05, warmup_fraction=0.1,
                label_smoothing=0.1, test_time_flip=True)
def cnn_modern(data: DataSpec, widths=(64, 128, 256)) -> keras.Model:
    """A compact modern CNN: batch norm, flip+shift augmentation, AdamW with warmup and cosine decay.

    Its recipe adds test-time flips: the served model averages an image's and its mirror's predictions,
    which scored higher on the same trained weights (BENCHMARKS.md, "cnn_modern on CIFAR-10: reaching 88%").
    """
    inputs, x = pixels(data)
    # Per-channel scaling is learned by the first batch norm; centring here keeps early steps stable.
    x = layers.Normalization(mean=0.5, variance=0.0625)(x)
    x = augmentation(data)(x)
    x = conv_bn(x, widths[0] // 2)
    for filters in widths:
        # airbench/ResNet-9 style block: conv, downsample, conv.
        x = conv_bn(x, filters)
        x = layers.MaxPooling2D(2)(x)
        x = conv_bn(x, filters)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dropout(0.2)(x)
    return keras.Model(inputs, classifier(x, data), name="cnn_modern")


def residual_block(x, filters: int, strides: int = 1):
    """ResNet basic block. The last norm starts at zero, so each block starts as the identity; a shortcut
    that changes shape average-pools before its 1x1 conv (ResNet-D), so no pixel is skipped."""
    y = conv_bn(x, filters, strides=strides)
    y = conv_bn(y, filters, activation=None, gamma="zeros")
    shortcut = x
    if strides > 1:
        shortcut = layers.AveragePooling2D(strides, padding="same")(shortcut)
    if x.shape[-1] != filters:
        shortcut = conv_bn(shortcut, filters, kernel_size=1, activation=None)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


# fast.ai's xresnet, as on the Imagenette leaderboard, at ResNet-10 depth for two CPU cores by default: a
# three-conv stem, one residual block per stage (`depths`: 2 each is ResNet-18's), scale augmentation,
# SGD-Nesterov with warmup and cosine decay.
@register_model(optimizer="sgd", learning_rate=0.1, schedule="cosine", weight_decay=5e-4, warmup_fraction=0.1,
                label_smoothing=0.1, test_time_flip=True)
def xresnet(data: DataSpec, widths=(64, 128, 256, 512), zoom: float = 0.4, depths=(1, 1, 1, 1)) -> keras.Model:
    """xresnet-style ResNet for 128-160 px images: 3-conv stem, `depths` residual blocks per stage, zoom+shift+flip."""
    if len(depths) != len(widths) or min(depths) < 1:
        raise UserError(f"xresnet: depths {list(depths)} must give one block count of at least 1 per stage "
                        f"(widths {list(widths)})")
    inputs, x = pixels(data)
    x = layers.Normalization(mean=0.5, variance=0.0625)(x)
    x = augmentation(data, translate=0.1)(x)
    # Zoom in only: crops of 36-100% of the area (fast.ai's Imagenette crops: 35-100%). Harder crops than
    # zoom 0.25 (56-100%) scored higher on Imagenette, and overfit less (BENCHMARKS.md, "Time to accuracy",
    # the imagenette_xresnet recipe).
    x = layers.RandomZoom((-zoom, 0.0), fill_mode="reflect")(x)
    x = conv_bn(x, 32, strides=2)
    x = conv_bn(x, 32)
    x = conv_bn(x, 64)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    for stage, (filters, blocks) in enumerate(zip(widths, depths)):
        for block in range(blocks):
            x = residual_block(x, filters, strides=2 if stage > 0 and block == 0 else 1)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    return keras.Model(inputs, classifier(x, data), name="xresnet")
