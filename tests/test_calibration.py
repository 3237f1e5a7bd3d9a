"""Calibration: ECE, temperature scaling on a deliberately overconfident model, and the temperature folded
into the model a run logs (and so serves)."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest
from scipy.special import softmax

from experiments import calibration, scoring
from experiments.train import train


def test_ece_is_the_count_weighted_gap_between_confidence_and_accuracy_per_bin():
    labels = np.array([0, 0, 1, 1])
    # Two images at confidence 0.95 (one right), two at 0.55 (both right): bins 15 and 9 of 15.
    probabilities = np.array([[0.95, 0.05], [0.05, 0.95], [0.45, 0.55], [0.45, 0.55]])
    table = scoring.calibration_bins(labels, probabilities)
    assert table["count"].tolist() == [0] * 8 + [2] + [0] * 5 + [2]
    assert scoring.expected_calibration_error(labels, probabilities) == pytest.approx(
        0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55))
    perfect = np.eye(3)[[0, 1, 2]]
    assert scoring.expected_calibration_error(np.array([0, 1, 2]), perfect) == 0.0


def test_the_bootstrap_interval_is_seeded_and_covers_the_accuracy():
    correct = np.arange(10_000) < 8_000
    low, high = scoring.bootstrap_interval(correct)
    assert (low, high) == scoring.bootstrap_interval(correct)  # the same every time
    assert low < 0.8 < high and high - low == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 10_000), rel=0.15)


def overconfident(num_classes=3, scale=5.0) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """Images whose pixel k is the class signal x_k = 1.5 [k = label] + N(0, 1), and a model whose logits are
    `scale` times the true log-odds 1.5 x_k: right as often as can be, and far too sure of itself."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, 4000)
    signal = 1.5 * np.eye(num_classes)[labels] + rng.normal(size=(4000, num_classes))
    images = np.clip(np.round(100 + 40 * signal), 0, 255).astype(np.uint8).reshape(-1, 1, 1, num_classes)
    inputs = keras.Input((1, 1, num_classes), dtype="uint8", name="image")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 40, offset=-100 / 40)(inputs))
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    model = keras.Model(inputs, keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits))
    model.get_layer("logits").set_weights([scale * 1.5 * np.eye(num_classes, dtype=np.float32),
                                           np.zeros(num_classes, np.float32)])
    return model, images, labels


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model_and_serves_softmax_of_logits_over_t():
    model, images, labels = overconfident()
    held, test = slice(0, 1000), slice(1000, None)
    logits = calibration.logits_model(model).predict(images, verbose=0)
    temperature = calibration.fit_temperature(logits[held], labels[held])
    assert temperature == pytest.approx(5.0, rel=0.2)  # the model's logits were 5x the true log-odds

    before = model.predict(images[test], verbose=0)
    calibrated = calibration.with_temperature(model, temperature)
    after = calibrated.predict(images[test], verbose=0)
    assert scoring.expected_calibration_error(labels[test], after) < 0.5 * scoring.expected_calibration_error(
        labels[test], before)
    np.testing.assert_allclose(after, softmax(logits[test] / temperature, axis=1), rtol=1e-4, atol=1e-6)
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()  # one view: the ranking is unchanged


def test_a_run_fits_its_temperature_on_the_calibration_holdout_and_logs_the_calibrated_model(tiny_cifar):
    result = train(dataset="cifar10", arch="cnn_simple", epochs=2, batch_size=16, data_dir=str(tiny_cifar))
    run = mlflow.get_run(result.run_id)
    temperature = run.data.metrics["temperature"]
    logged = mlflow.keras.load_model(f"runs:/{result.run_id}/model")
    assert logged.get_layer("temperature").get_config()["scale"] == pytest.approx(1 / temperature)
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    logits = calibration.logits_model(logged).predict(images, verbose=0) * temperature  # before the division
    np.testing.assert_allclose(logged.predict(images, verbose=0), softmax(logits / temperature, axis=1), rtol=1e-4)
    assert run.data.params["num_calibration"] == "6"  # 5% of each class's 30 training images, rounded: 2

    untouched = train(dataset="cifar10", arch="cnn_simple", epochs=1, batch_size=16, data_dir=str(tiny_cifar),
                      calibration_fraction=0.0)
    run = mlflow.get_run(untouched.run_id)
    assert "temperature" not in run.data.metrics and "test_ece" in run.data.metrics
    assert run.data.tags["calibration_note"].startswith("not calibrated: no held-out images")


@pytest.mark.parametrize("views, logits, temperature", [(1, False, 1.7), (2, False, None), (6, False, None),
                                                       (6, True, 1.7)])
def test_one_pass_gives_what_the_served_uncalibrated_and_fewer_view_models_predict(views, logits, temperature):
    """calibration.evaluation_model computes each view's logits once; each of its outputs is what predicting
    with the model it stands for gives (the run used to predict the test split with each in turn)."""
    from experiments.models import DataSpec, Recipe, create_model, inference_model, with_views

    spec = DataSpec((32, 32, 3), 10)
    recipe = Recipe(test_time_flip=views > 1, test_time_shift=views == 6, test_time_logits=logits)
    model = create_model("airbench", spec, widths=[8, 8, 8])  # custom layers: portable() swaps them
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    outputs = calibration.evaluation_model(model, recipe, spec, temperature).predict(images, verbose=0)

    served = inference_model(model if temperature is None else calibration.with_temperature(model, temperature),
                             recipe, spec)
    expected = {"served": served.predict(images, verbose=0)}
    if temperature is not None:
        expected["uncalibrated"] = inference_model(model, recipe, spec).predict(images, verbose=0)
    for level in ["none", "flip"][: [1, 2, 6].index(views)]:
        expected[f"tta_{level}"] = with_views(served, level, recipe, spec).predict(images, verbose=0)
    assert sorted(outputs) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(outputs[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    if temperature is not None:  # the outputs differ where they should
        assert not np.allclose(outputs["served"], outputs["uncalibrated"], atol=1e-4)
    if views == 6 and not logits and temperature is None:  # the six views' weights, from their definition
        one_view = inference_model(model, Recipe(), spec)
        up_left = np.pad(images, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")[:, 1:, 1:]
        down_right = np.pad(images, ((0, 0), (1, 0), (1, 0), (0, 0)), mode="reflect")[:, :-1, :-1]
        p = [one_view.predict(x, verbose=0) for view in (images, up_left, down_right) for x in (view, view[:, :, ::-1])]
        np.testing.assert_allclose(outputs["served"], (p[0] + p[1]) / 4 + (p[2] + p[3] + p[4] + p[5]) / 8, atol=1e-6)
