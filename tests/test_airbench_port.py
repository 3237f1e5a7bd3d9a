"""The pieces of airbench94 the port can switch on (issue 19): its schedule, shifts, lookahead, whitening
bias, norm epsilon, initialisation and logit averaging. Each is checked against its definition."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from experiments.errors import UserError
from experiments.fit import Lookahead, Triangular
from experiments.models import DataSpec, EpochGatedBias, RandomShift, Recipe, create_model, inference_model, portable

SPEC = DataSpec((32, 32, 3), 10)


def test_the_triangular_schedule_is_airbench_s():
    schedule = Triangular(peak=1.0, total_steps=100, warmup_steps=23)
    rates = [float(schedule(step)) for step in (0, 11.5, 23, 61.5, 100, 120)]
    expected = [0.2, 0.6, 1.0, 1.0 + (0.07 - 1.0) * 38.5 / 77, 0.07, 0.07]
    np.testing.assert_allclose(rates, expected, rtol=1e-5)
    again = Triangular.from_config(schedule.get_config())  # a checkpoint's optimizer restores it
    assert float(again(50)) == pytest.approx(float(schedule(50)))


def test_uniform_shifts_are_whole_pixel_reflected_crops_in_every_position():
    images = np.random.default_rng(0).random((500, 8, 8, 1)).astype("float32")
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    shifted = np.asarray(RandomShift(2, seed=1)(images, training=True))
    seen = []
    for image, source in zip(shifted, padded):
        offsets = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(image, source[dy:dy + 8, dx:dx + 8])]
        assert offsets, "not a whole-pixel crop of the reflected image"
        seen.append(offsets[0])
    counts = np.bincount([dy * 5 + dx for dy, dx in seen], minlength=25)
    assert counts.min() > 5 and counts.max() < 40  # all 25 offsets, about 20 each
    np.testing.assert_array_equal(RandomShift(2)(images, training=False), images)  # inference: the image


def test_the_gated_bias_trains_for_its_epochs_only_and_saves_as_a_stock_layer():
    layer = EpochGatedBias(epochs=3)
    x = keras.ops.ones((2, 4, 4, 6))
    layer.build(x.shape)
    import tensorflow as tf

    def gradient():
        with tf.GradientTape() as tape:
            loss = keras.ops.sum(layer(x))
        return tape.gradient(loss, layer.bias.value)

    assert float(keras.ops.sum(gradient())) == 2 * 4 * 4 * 6
    layer.epoch.assign(3)
    grad = gradient()
    assert grad is None or float(keras.ops.sum(keras.ops.abs(grad))) == 0.0

    model = create_model("airbench", SPEC, widths=[8, 8, 8], whiten_bias_epochs=3)
    model.get_layer("whitening_bias").bias.assign(np.arange(24, dtype="float32") / 10)
    stock = portable(model)
    assert isinstance(stock.get_layer("whitening_bias"), keras.layers.Rescaling)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(stock.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_lookahead_ends_training_on_its_average():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 4)).astype("float32"), keras.utils.to_categorical(rng.integers(0, 3, 64), 3)
    lookahead = Lookahead(every=2, total_steps=16)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[lookahead], verbose=0)
    assert lookahead.step == 16
    for weight, average in zip(model.weights, lookahead.average):
        np.testing.assert_allclose(weight.numpy(), average, rtol=1e-6)


def test_airbench_options_change_what_they_name_and_refuse_unknown_values():
    plain = create_model("airbench", SPEC, widths=[8, 8, 8])
    port = create_model("airbench", SPEC, widths=[8, 8, 8], shift="uniform", norm_eps=1e-12, init="torch")
    assert not any(isinstance(layer, RandomShift) for layer in plain.layers)
    assert any(isinstance(layer, RandomShift) for layer in port.layers)
    norms = [layer for layer in port.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and {norm.epsilon for norm in norms} == {1e-12}
    dense = port.get_layer(index=-3)  # Dense, then the logit scale, then the softmax
    assert isinstance(dense, keras.layers.Dense) and dense.kernel_initializer.scale == pytest.approx(1 / 3)
    with pytest.raises(UserError, match="unknown shift 'crop'; choose uniform or translate"):
        create_model("airbench", SPEC, widths=[8, 8, 8], shift="crop")
    with pytest.raises(UserError, match="unknown init 'he'; choose one of: glorot, torch"):
        create_model("airbench", SPEC, widths=[8, 8, 8], init="he")


def test_test_time_views_can_average_logits():
    model = create_model("airbench", SPEC, widths=[8, 8, 8])
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    logits = keras.Model(model.input, model.get_layer("probabilities").input)
    mirrored = images[:, :, ::-1]
    recipe = Recipe(test_time_flip=True, test_time_logits=True)
    served = inference_model(model, recipe, SPEC).predict(images, verbose=0)
    average = (logits.predict(images, verbose=0) + logits.predict(mirrored, verbose=0)) / 2
    np.testing.assert_allclose(served, keras.ops.convert_to_numpy(keras.ops.softmax(average)), atol=1e-5)
    by_probabilities = inference_model(model, Recipe(test_time_flip=True), SPEC).predict(images, verbose=0)
    assert not np.allclose(served, by_probabilities, atol=1e-6)  # a different average
    inference_model(create_model("cnn_simple", SPEC), recipe, SPEC)  # every architecture ends on one now
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    fused = keras.layers.Dense(10, activation="softmax", name="probabilities")(keras.layers.Flatten()(inputs))
    with pytest.raises(UserError, match="test_time_logits needs a model ending on a softmax Activation"):
        inference_model(keras.Model(inputs, fused), recipe, SPEC)
