"""The model that is evaluated, logged and served: stock layers, plus the recipe's test-time views."""

from __future__ import annotations

import keras
from keras import layers

from experiments.models import DataSpec, Recipe
from experiments.models.layers import mirror, portable, shift


def inference_views(recipe: Recipe, data: DataSpec) -> int:
    """Forward passes per image of the model inference_model() builds."""
    if not (recipe.test_time_flip and data.hflip):
        return 1
    return 6 if recipe.test_time_shift else 2


def inference_model(model: keras.Model, recipe: Recipe, data: DataSpec) -> keras.Model:
    """The model that is evaluated, logged and served: stock layers, plus test-time flips (and shifts) if the
    recipe asks."""
    model = portable(model)
    if inference_views(recipe, data) == 1:
        return model
    images = keras.Input(shape=model.input_shape[1:], dtype="uint8", name="image")

    def with_mirror(x, view: str, name=None):
        return layers.Average(name=name)([model(x), model(mirror(x, name=f"mirror{view}"))])

    if not recipe.test_time_shift:
        return keras.Model(images, with_mirror(images, "", name="probabilities"), name=model.name)
    shifted = layers.Average()([with_mirror(shift(images, -1, -1), "_up_left"),
                                with_mirror(shift(images, 1, 1), "_down_right")])
    probabilities = layers.Average(name="probabilities")([with_mirror(images, ""), shifted])
    return keras.Model(images, probabilities, name=model.name)
