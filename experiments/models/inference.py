"""The model that is evaluated, logged and served: stock layers, plus the recipe's test-time views."""

from __future__ import annotations

import keras
from keras import layers

from experiments.errors import UserError
from experiments.models import DataSpec, Recipe
from experiments.models.layers import mirror, portable, shift


# Test-time views a served model may average, by name: (mirror, shifts).
TTA_LEVELS = {"none": (False, False), "flip": (True, False), "full": (True, True)}


def tta_level(recipe: Recipe, data: DataSpec) -> str:
    """The views `recipe` trains a model to serve, by name (a key of TTA_LEVELS)."""
    return {1: "none", 2: "flip", 6: "full"}[inference_views(recipe, data)]


def one_view_net(model: keras.Model) -> keras.Model:
    """The network every test-time view of `model` runs (nested in it), or `model` itself if it has no views.
    Its output is the views' logits, or their probabilities when the recipe averages those."""
    names = {layer.name for layer in model.layers}
    last = "logits" if "logits" in names else "probabilities"  # where the views are averaged
    if last not in names or not isinstance(model.get_layer(last), layers.Average):
        return model  # no views (the VGG16 head's softmax, say, is inside its own head)
    (net,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]  # every view runs this one
    return net


def without_views(model: keras.Model) -> keras.Model:
    """The one-view model inside a model that inference_model() gave test-time views (itself if it has none)."""
    net = one_view_net(model)
    if net is model or not net.name.endswith("_logits"):
        return net
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(net.output)
    return keras.Model(net.input, probabilities, name=model.name)


def with_views(model: keras.Model, level: str, recipe: Recipe, data: DataSpec) -> keras.Model:
    """`model` (with or without views) re-served with the views of `level`, averaged as `recipe` averages them."""
    flip, shifts = TTA_LEVELS[level]
    if flip and not data.hflip:
        raise UserError(f"test-time views {level!r} mirror images, which changes their class here; use none")
    return inference_model(without_views(model), Recipe(test_time_flip=flip, test_time_shift=shifts,
                                                        test_time_logits=recipe.test_time_logits), data)


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
    head = model.get_layer("probabilities") if recipe.test_time_logits else None
    if head is not None and not (isinstance(head, layers.Activation) and head.get_config()["activation"] == "softmax"):
        raise UserError(f"test_time_logits needs a model ending on a softmax Activation; {model.name} has none")
    # The views pass through the whole model, or up to its logits (then one softmax of their average).
    net = keras.Model(model.input, head.input, name=f"{model.name}_logits") if head is not None else model
    averaged = average_views([net(view) for view in view_images(images, recipe, data)],
                             name="logits" if head is not None else "probabilities")
    if head is not None:
        averaged = layers.Activation("softmax", dtype="float32", name="probabilities")(averaged)
    return keras.Model(images, averaged, name=model.name)


def view_images(images, recipe: Recipe, data: DataSpec) -> list:
    """The views of `images` a model served with `recipe` averages, in this order: the images, their mirror,
    then (with shifts) the images moved up-left and their mirror, moved down-right and their mirror."""
    if inference_views(recipe, data) == 1:
        return [images]
    views = [images, mirror(images, name="mirror")]
    if recipe.test_time_shift:
        for step, name in ((-1, "up_left"), (1, "down_right")):
            moved = shift(images, step, step)
            views += [moved, mirror(moved, name=f"mirror_{name}")]
    return views


def average_views(outputs: list, name: str | None = None):
    """The views' outputs (view_images' order) averaged as served: an image and its mirror count equally;
    with shifts, that pair and the average of the two shifted pairs count equally."""
    if len(outputs) == 1:
        return outputs[0]
    if len(outputs) == 2:
        return layers.Average(name=name)(outputs)
    pairs = [layers.Average()(outputs[i:i + 2]) for i in (0, 2, 4)]
    return layers.Average(name=name)([pairs[0], layers.Average()(pairs[1:])])
