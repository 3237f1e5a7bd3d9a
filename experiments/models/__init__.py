"""Model registry: every architecture by name, as a builder function.

Each builder takes a `DataSpec` (input shape, class count, whether horizontal
flips are label-preserving) and returns an uncompiled Keras model whose input
is raw uint8 pixels. Rescaling, normalisation and augmentation are layers inside
the model, so the model that is served is the model that was trained.

Adding an architecture is one decorated function, in a module of this package
(imported at the bottom of this file, so that it registers):

    from experiments.models import DataSpec, register_model
    from experiments.models.layers import classifier, pixels

    @register_model(optimizer="adam")
    def my_net(data: DataSpec, width: int = 64):
        inputs, x = pixels(data)
        ...
        return keras.Model(inputs, classifier(x, data), name="my_net")

Its keyword arguments are the options a run may set (`--options`). Precision is not one of them: the
builder makes its layers under whatever dtype policy `create_model` sets (`--precision`), and ends on
`layers.classifier`'s float32 softmax. `register_model` takes the
`Recipe` fields, and two optional hooks, so the fit loop never needs a model's name:
`prepare(model, train_split)`, called once on a newly built model before training (not on one
resumed from a checkpoint), and `callbacks(model) -> list` of Keras callbacks for its fit.

Modules: `layers` (the project's layers and layer helpers), `inference` (test-time views),
`tutorial`, `modern` (cnn_modern, xresnet), `airbench`, `vgg16`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras

from experiments.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataSpec:
    image_shape: tuple  # (height, width, channels)
    num_classes: int
    hflip: bool = True  # False where a mirror image changes the class (digits)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How an architecture is trained; `train()` turns it into an optimizer and loss."""

    optimizer: str = "adam"  # "adam", "adamw" or "sgd" (with Nesterov momentum)
    momentum: float = 0.9  # SGD only
    learning_rate: float = 0.001  # used unless the run sets learning_rate
    # "constant"; "cosine": linear warmup from 0, then cosine decay to 0; "triangular" (airbench's): linear
    # from 0.2 of the peak up to it over the warmup, then linear down to 0.07 of it
    schedule: str = "constant"
    weight_decay: float = 0.0  # decoupled (AdamW/SGD); ignored by plain Adam
    warmup_fraction: float = 0.0
    label_smoothing: float = 0.0
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights (this momentum) and end on it
    # > 0: airbench's lookahead every this many images: the weights (norm statistics too) move to their
    # running average, which itself follows them less and less: decay 0.95^5 x (progress)^3
    lookahead_images: int = 0
    cutmix: float = 0.0  # > 0: CutMix on every training batch (keras.layers.CutMix with this factor)
    test_time_flip: bool = False  # serve the average of the predictions for an image and its mirror image
    # With test_time_flip: also average over the image shifted a pixel up-left and down-right (each with
    # its mirror), weighted as airbench's multi-crop TTA: half on the image, half on the shifts.
    test_time_shift: bool = False
    # With test-time views: average their logits, then softmax (airbench's), not their probabilities. Needs
    # a model that ends on a softmax Activation named "probabilities" (airbench's logit scale needs it too).
    test_time_logits: bool = False
    features: str | None = None  # "vgg16": train a head on cached frozen features

    OPTIMIZERS = ("adam", "adamw", "sgd")
    SCHEDULES = ("constant", "cosine", "triangular")

    def updated(self, **changes) -> "Recipe":
        """A copy with `changes`; unknown names or values are a UserError (they come from users and tuners)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise UserError(f"unknown recipe option(s) {', '.join(unknown)}; choose from: {', '.join(sorted(fields))}")
        recipe = dataclasses.replace(self, **changes)
        if recipe.optimizer not in self.OPTIMIZERS:
            raise UserError(f"unknown optimizer {recipe.optimizer!r}; choose one of: {', '.join(self.OPTIMIZERS)}")
        if recipe.schedule not in self.SCHEDULES:
            raise UserError(f"unknown schedule {recipe.schedule!r}; choose one of: {', '.join(self.SCHEDULES)}")
        return recipe


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., keras.Model]
    recipe: Recipe
    description: str
    # Hooks for the fit loop, None where the model needs nothing:
    prepare: Callable[[keras.Model, object], None] | None = None  # (model, train Split), on a new model only
    callbacks: Callable[[keras.Model], list] | None = None  # (model) -> Keras callbacks for its fit


MODELS: dict[str, ModelEntry] = {}


def register_model(prepare=None, callbacks=None, **recipe):
    """Register the decorated builder under its name, with its `Recipe(**recipe)` and optional hooks."""

    def decorate(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        MODELS[fn.__name__] = ModelEntry(fn.__name__, fn, Recipe(**recipe), doc[0] if doc else "",
                                         prepare=prepare, callbacks=callbacks)
        return fn

    return decorate


def list_models() -> list[str]:
    return sorted(MODELS)


def get_model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise UserError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}")
    return MODELS[name]


def create_model(name: str, data: DataSpec, policy: str = "float32", **kwargs) -> keras.Model:
    """Build `name` with its options `kwargs`, its layers under a Keras dtype policy ("float32",
    "mixed_bfloat16", ...: experiments/precision.py chooses). The policy is saved with each layer."""
    from experiments.models.layers import dtype_policy

    with dtype_policy(policy):
        return get_model_entry(name).build(data, **kwargs)


# Each architecture registers as its module is imported. The builders are reached by name (create_model,
# get_model_entry), so the package's `airbench` stays the module, not its builder of the same name.
from experiments.models import airbench, modern, tutorial, vgg16  # noqa: E402,F401

# The layers, helpers and constants other modules use.
from experiments.models.layers import (  # noqa: E402
    AlternatingFlip,
    EpochGatedBias,
    FastBatchNorm,
    RandomShift,
    augmentation,
    classifier,
    conv_bn,
    dirac_init,
    dtype_policy,
    flip_epoch_callbacks,
    mirror,
    pixels,
    portable,
    shift,
)
from experiments.models.inference import (  # noqa: E402
    TTA_LEVELS,
    average_views,
    inference_model,
    inference_views,
    one_view_net,
    tta_level,
    view_images,
    with_views,
    without_views,
)
from experiments.models.modern import residual_block  # noqa: E402
from experiments.models.airbench import AIRBENCH, PATCH_WHITENING, fit_patch_whitening  # noqa: E402
from experiments.models.vgg16 import VGG16_RGB_MEAN, vgg16_features, vgg16_head_layers  # noqa: E402
