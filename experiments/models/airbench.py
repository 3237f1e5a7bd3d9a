"""airbench (Keller Jordan's CIFAR-10 speed runs), ported, and its patch whitening.

SGD-Nesterov at a high rate with label smoothing 0.2, weight decay and a warmup, alternating flips and
2-pixel shifts, a weight average, and a six-view test-time average. As in airbench, the hyperparameters
sit together in one dict, AIRBENCH: the registered recipe and the builders' defaults come from it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from experiments.datasets import Split, sample_images
from experiments.errors import UserError
from experiments.models import DataSpec, register_model
from experiments.models.layers import (
    EpochGatedBias,
    RandomShift,
    augmentation,
    conv_bn,
    dirac_init,
    flip_epoch_callbacks,
    pixels,
)

AIRBENCH = dict(
    # How it trains: Recipe fields, logged as each run's recipe.* params. For batch 128 (airbench: 1024 at
    # momentum 0.85) the rate is scaled linearly; the decoupled decay per step matches airbench's coupled
    # 0.0153 per 1024 images.
    recipe=dict(optimizer="sgd", learning_rate=0.125, schedule="cosine", weight_decay=0.0133, warmup_fraction=0.23,
                label_smoothing=0.2, test_time_flip=True, test_time_shift=True, ema=0.99),
    # The net. The builders' defaults, which a run's options override:
    net=dict(widths=(64, 256, 256), translate_pixels=2, norm_momentum=0.6, activation="relu",
             # Where the port differed from airbench94 (issue 19's line-by-line read), each an option to ablate:
             # "uniform" whole-pixel shifts with reflection (airbench's) or "translate" (RandomTranslation,
             # nearest); the norms' epsilon (airbench: 1e-12); "torch" initialisation (PyTorch's default
             # uniform, variance 1/(3 fan_in)) or Keras' "glorot"; epochs the whitening bias trains (airbench: 3).
             shift="translate", norm_eps=1e-3, init="glorot", whiten_bias_epochs=0,
             # and what no option changes: norm biases learn bias_scale**2 = 64x faster (airbench's ablations:
             # 18 -> 13.5 epochs to 94%); airbench's logit scale gives softer outputs early in training.
             norm_bias_scale=8.0, logit_scale=1 / 9),
    # The fixed first layer: whitening of patch_size x patch_size patches, fitted on about `sample` training
    # images before training (fit_patch_whitening's eps regularises the small eigenvalues).
    whitening=dict(patch_size=2, sample=5000, eps=5e-4),
    # Named widths, so that the short recipes run as `-P arch=airbench_s`: same net, same training recipe.
    presets=dict(airbench_s=(32, 64, 128), airbench_m=(64, 128, 128)),
)
NET, WHITENING, PRESETS = AIRBENCH["net"], AIRBENCH["whitening"], AIRBENCH["presets"]

PATCH_WHITENING = "patch_whitening"
# PyTorch's default for convs and linear layers (kaiming_uniform with a=sqrt(5)): uniform, variance 1/(3 fan_in).
# Configs, not instances: each layer deserialises its own initialiser, so no two draw the same values.
INITIALISERS = {"glorot": "glorot_uniform",
                "torch": {"class_name": "VarianceScaling",
                          "config": {"scale": 1 / 3, "mode": "fan_in", "distribution": "uniform"}}}


def fit_patch_whitening(model: keras.Model, images: np.ndarray, eps: float = WHITENING["eps"]) -> bool:
    """Set the model's patch-whitening conv (if it has one) from uint8 training images; True if it did.

    Its filters are the eigenvectors of the covariance of the images' k x k patches (as the layer
    sees them, after rescaling), divided by the square root of their eigenvalues, and their negatives:
    the first layer then sees decorrelated, unit-variance patch features from the first step.
    """
    try:
        layer = model.get_layer(PATCH_WHITENING)
    except ValueError:
        return False
    upstream = keras.Model(model.input, layer.input)
    x = np.asarray(upstream.predict(images, batch_size=500, verbose=0), dtype=np.float64)
    kernel_height, kernel_width, channels, filters = layer.kernel.shape
    patches = np.lib.stride_tricks.sliding_window_view(x, (kernel_height, kernel_width), axis=(1, 2))
    # (N, H', W', C, kh, kw) -> rows of (kh, kw, C), the Conv2D kernel's layout
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, kernel_height * kernel_width * channels)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = eigenvalues.argsort()[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1).reshape(kernel_height, kernel_width, channels, filters)
    layer.set_weights([kernel.astype(np.float32), np.zeros(filters, np.float32)][: len(layer.get_weights())])
    return True


def prepare(model: keras.Model, train_split: Split) -> None:
    """Before training a new model (not one resumed from a checkpoint): fit its whitening on training images."""
    fit_patch_whitening(model, sample_images(train_split, WHITENING["sample"]))


HOOKS = dict(prepare=prepare, callbacks=flip_epoch_callbacks)  # alternating flips need the epoch


@register_model(**HOOKS, **AIRBENCH["recipe"])
def airbench(data: DataSpec, widths=NET["widths"], translate_pixels: int = NET["translate_pixels"],
             norm_momentum: float = NET["norm_momentum"], activation: str = NET["activation"],
             shift: str = NET["shift"], norm_eps: float = NET["norm_eps"], init: str = NET["init"],
             whiten_bias_epochs: int = NET["whiten_bias_epochs"]) -> keras.Model:
    """airbench-style fast CIFAR net: fixed patch-whitening conv, three conv-pool-norm blocks.

    Its accuracy and time: BENCHMARKS.md, "Time to accuracy" (cifar10_airbench).
    """
    height, width, channels = data.image_shape
    patch, bias_scale = WHITENING["patch_size"], NET["norm_bias_scale"]
    inputs, x = pixels(data, alternating_flip=True)
    x = layers.Normalization(mean=0.5, variance=0.0625)(x)
    # Whole-pixel shifts, as airbench's crops: bilinear shifts would blur training images only.
    if shift == "uniform":
        x = RandomShift(translate_pixels)(x)
    elif shift == "translate":
        x = augmentation(data, translate_pixels / height, random_flip=False, interpolation="nearest")(x)
    else:
        raise UserError(f"unknown shift {shift!r}; choose uniform or translate")
    if init not in INITIALISERS:
        raise UserError(f"unknown init {init!r}; choose one of: {', '.join(INITIALISERS)}")
    # Patches projected onto their covariance's eigenvectors (and their negatives), set from the
    # training images by fit_patch_whitening() before training and never trained; its bias may train.
    x = layers.Conv2D(2 * patch * patch * channels, patch, padding="valid", trainable=False,
                      use_bias=not whiten_bias_epochs, name=PATCH_WHITENING)(x)
    if whiten_bias_epochs:
        x = EpochGatedBias(whiten_bias_epochs, name="whitening_bias")(x)
    x = layers.Activation(activation)(x)
    block = dict(momentum=norm_momentum, scale=False, bias_scale=bias_scale, activation=activation, epsilon=norm_eps,
                 kernel_initializer=INITIALISERS[init])
    for filters in widths:
        x = conv_bn(x, filters, pool=True, **block)
        x = conv_bn(x, filters, **block)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(data.num_classes, use_bias=False, kernel_initializer=INITIALISERS[init])(x)
    x = layers.Rescaling(NET["logit_scale"])(x)  # airbench's logit scale: softer outputs early in training
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, probabilities, name="airbench")
    dirac_init(model)
    return model


@register_model(**HOOKS, **AIRBENCH["recipe"])
def airbench_s(data: DataSpec, translate_pixels: int = NET["translate_pixels"],
               norm_momentum: float = NET["norm_momentum"]) -> keras.Model:
    """airbench at half width (32/64/128), a quarter of the compute: the 3-minute CIFAR-10 and MNIST recipes."""
    return airbench(data, PRESETS["airbench_s"], translate_pixels, norm_momentum)


@register_model(**HOOKS, **AIRBENCH["recipe"])
def airbench_m(data: DataSpec, translate_pixels: int = NET["translate_pixels"],
               norm_momentum: float = NET["norm_momentum"]) -> keras.Model:
    """airbench at widths 64/128/128: the Fashion-MNIST recipe.

    Its accuracy and time: BENCHMARKS.md, "Time to accuracy" (fashion_mnist_airbench).
    """
    return airbench(data, PRESETS["airbench_m"], translate_pixels, norm_momentum)
