"""Grad-CAM: where a convolutional network looks when it picks a class (Selvaraju et al., 2017).

The heatmap of an image for a class is the last convolutional feature map, its channels weighted by the
mean gradient of the class's logit over each channel, clipped at 0, scaled to [0, 1] and resized to the
image. Used by a run's `plots/gradcam.png` and by the served model's `explain` (registry/classifier.py,
which ships this file with the model): so it imports nothing from the project.
"""

from __future__ import annotations

import base64
import io
import weakref

import numpy as np

CONVOLUTIONS = ("Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose")
# Layers that only coarsen or mask a feature map: Grad-CAM takes the map before them, at the finer grid.
COARSENING = ("MaxPooling2D", "AveragePooling2D", "Dropout", "SpatialDropout2D")


def has_convolutions(model) -> bool:
    """Whether `model`, or a model nested in it, has a convolution layer."""
    return any(type(layer).__name__ in CONVOLUTIONS or (hasattr(layer, "layers") and has_convolutions(layer))
               for layer in model.layers)


def feature_layer(net) -> str | None:
    """The name of the last layer of `net` with a spatial (N, H, W, C) output after its first convolution,
    pooling and dropout aside: the feature map Grad-CAM weighs. None for a network without convolutions."""
    if not has_convolutions(net):
        return None
    found = None
    seen_convolution = False
    for layer in net.layers:
        seen_convolution = seen_convolution or type(layer).__name__ in CONVOLUTIONS or (
            hasattr(layer, "layers") and has_convolutions(layer))
        if seen_convolution and len(layer.output.shape) == 4 and type(layer).__name__ not in COARSENING:
            found = layer.name
    return found


def explainer(net, layer: str):
    """A model from `net`'s images to (its feature map at `layer`, its class logits). The logits are the
    input of the softmax layer `probabilities`, in `net` or in a head model nested in it (the VGG16
    head's), else `net`'s output."""
    import keras

    def called(model, tensors: str):
        # A nested model's .input/.output are its own graph's; its call inside `net` is its first node.
        return getattr(model._inbound_nodes[0], tensors)[0]

    target = net.get_layer(layer)
    features = called(target, "output_tensors") if isinstance(target, keras.Model) else target.output
    heads = [sub for sub in net.layers if isinstance(sub, keras.Model) and "probabilities" in {x.name for x in sub.layers}]
    if "probabilities" in {x.name for x in net.layers}:
        logits = net.get_layer("probabilities").input
    elif heads:
        head = heads[-1]
        logits = keras.Model(head.input, head.get_layer("probabilities").input)(called(head, "input_tensors"))
    else:
        logits = net.output
    return keras.Model(net.input, [features, logits], name="gradcam")


def heatmaps(model, images: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM of each image for its class in `classes` (default: the predicted one), float32 in [0, 1],
    shaped (N, H, W) like the images. `model`: an explainer()."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images)
    if classes is None:
        classes = tf.argmax(model(images, training=False)[1], axis=1)
    if model not in _GRAPHS:
        # Traced once per explainer: eager, the tape cost a served image ~50 ms more than the graph does.
        _GRAPHS[model] = tf.function(lambda x, c: _normalised_cam(model, x, c), reduce_retracing=True)
    return _GRAPHS[model](images, tf.cast(classes, tf.int32)).numpy().astype(np.float32)


_GRAPHS = weakref.WeakKeyDictionary()  # explainer -> its traced heatmaps function


def _normalised_cam(model, images, classes):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        features, logits = model(images, training=False)
        tape.watch(features)
        score = tf.reduce_sum(tf.gather(tf.cast(logits, tf.float32), classes, axis=1, batch_dims=1))
    gradients = tf.cast(tape.gradient(score, features), tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # one weight per channel and image
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))[..., None]
    cam = tf.image.resize(cam, tf.shape(images)[1:3], method="bilinear")[..., 0]
    return cam / tf.maximum(tf.reduce_max(cam, axis=(1, 2), keepdims=True), 1e-12)


def png(heatmap: np.ndarray) -> str:
    """A heatmap as a base64 8-bit greyscale PNG of its own size (white: where the class was seen)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")  # 2-D uint8: L
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def serving_settings(model, net) -> dict:
    """The served model's `explain` config: its one-view network `net` (a layer of `model`, or `model`),
    the feature layer to weigh, and why explain is refused when there is none."""
    layer = feature_layer(net)
    refusal = "" if layer else f"{model.name} has no convolutions to take a Grad-CAM heatmap from; serve a convolutional architecture"
    return {"net": "" if net is model else net.name, "layer": layer or "", "refusal": refusal}
