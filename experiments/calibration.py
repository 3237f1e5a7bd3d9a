"""Temperature scaling: confidences that can be believed, folded into the model that is logged and served.

One number T divides the logits before the softmax, fitted by log-loss on images the model did not
train on: the validation holdout (`validation_fraction`), else a seeded `calibration_fraction` (5%) of
the training split, held out of training for it (experiments/datasets/splits.py). Never the test split.
Dividing by T keeps each view's ranking of the classes, so a one-view model's accuracy is unchanged;
the test split only measures the result (`test_ece` after, `test_ece_uncalibrated` before).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# T is searched in [1/20, 20]: beyond that a model is broken, not over- or underconfident.
LOG_TEMPERATURE_BOUNDS = (float(np.log(1 / 20)), float(np.log(20)))


@dataclasses.dataclass(frozen=True)
class Served:
    """The test predictions of the model that is logged and served, and how it was calibrated."""

    probabilities: np.ndarray  # calibrated
    temperature: float = 1.0
    uncalibrated: np.ndarray | None = None  # the same model's before temperature scaling (None: not calibrated)
    note: str = ""  # why it was not calibrated
    fewer_views: dict = dataclasses.field(default_factory=dict)  # {level: probabilities} served with fewer views


def calibration_split(splits: tuple):
    """The split temperature is fitted on: a `calibration` or `validation` holdout, never `testing`."""
    held = [split for split, context in splits[1:] if context in ("calibration", "validation")]
    return held[-1] if held else None


def logits_model(model):
    """The model up to the input of its final softmax (every architecture ends on one named `probabilities`)."""
    import keras

    head = model.get_layer("probabilities")
    return keras.Model(model.input, head.input, name=f"{model.name}_logits")


def with_temperature(model, temperature: float):
    """`model` whose softmax takes its logits divided by `temperature` (stock layers: it saves and serves)."""
    import keras
    from keras import layers

    scaled = layers.Rescaling(1.0 / temperature, dtype="float32", name="temperature")(logits_model(model).output)
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(scaled)
    return keras.Model(model.input, probabilities, name=model.name)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the mean log-loss of softmax(logits / T) on `labels`."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = logits.astype(np.float64)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-np.mean(log_softmax(logits / np.exp(log_t), axis=1)[rows, labels]))

    best = minimize_scalar(loss, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x))


def served_model(model, config, data, splits: tuple) -> tuple:
    """(the model to log and serve: test-time views and the fitted temperature, its test predictions)."""
    from experiments.fit import image_batches
    from experiments.models import inference_model

    recipe, held = config.training_recipe(), calibration_split(splits)
    temperature, note = None, ""
    if held is None or len(held) == 0:
        note = "not calibrated: no held-out images (calibration_fraction=0 and no validation holdout)"
    else:
        logits = logits_model(model).predict(image_batches(held, config.batch_size), verbose=0)
        temperature = fit_temperature(logits, held.labels)
    served = inference_model(model if temperature is None else with_temperature(model, temperature), recipe, data.spec)
    outputs = evaluation_model(model, recipe, data.spec, temperature).predict(
        image_batches(data.test, config.batch_size), verbose=0)
    fewer = {name.removeprefix("tta_"): value for name, value in outputs.items() if name.startswith("tta_")}
    if temperature is None:
        return served, Served(outputs["served"], note=note, fewer_views=fewer)
    return served, Served(outputs["served"], temperature, outputs["uncalibrated"], fewer_views=fewer)


def evaluation_model(model, recipe, spec, temperature: float | None):
    """Every test figure in one pass over the images, each view's logits computed once: outputs `served`
    (what inference_model() serves, at `temperature` if not None), `uncalibrated` (with a temperature: the
    same at 1) and `tta_<level>` for each level of fewer views than served (registry.promote --tta), from
    the same layers in the same order as the models they stand for (a test checks)."""
    import keras
    from keras import layers

    from experiments.models import (TTA_LEVELS, Recipe, average_views, inference_views, portable, tta_level,
                                    view_images)

    model = portable(model)
    head = model.get_layer("probabilities")  # the model's own softmax: the uncalibrated models end on it
    net = logits_model(model)
    images = keras.Input(shape=model.input_shape[1:], dtype="uint8", name="image")
    logits = [net(view) for view in view_images(images, recipe, spec)]

    def probabilities(view_logits: list, temperature: float | None):
        softmax = head
        if temperature is not None:  # as with_temperature()
            scale = layers.Rescaling(1.0 / temperature, dtype="float32")
            view_logits, softmax = [scale(x) for x in view_logits], layers.Activation("softmax", dtype="float32")
        if recipe.test_time_logits and len(view_logits) > 1:  # one softmax of the averaged logits
            return layers.Activation("softmax", dtype="float32")(average_views(view_logits))
        return average_views([softmax(x) for x in view_logits])

    outputs = {"served": probabilities(logits, temperature)}
    if temperature is not None:
        outputs["uncalibrated"] = probabilities(logits, None)
    levels = list(TTA_LEVELS)
    for level in levels[: levels.index(tta_level(recipe, spec))]:  # a level's views lead view_images' order
        flip, shifts = TTA_LEVELS[level]
        views = inference_views(Recipe(test_time_flip=flip, test_time_shift=shifts), spec)
        outputs[f"tta_{level}"] = probabilities(logits[:views], temperature)
    return keras.Model(images, outputs, name=f"{model.name}_evaluation")
