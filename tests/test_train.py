"""train(): real Keras, real MLflow on a temp sqlite store, tiny synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import keras
import mlflow
import numpy as np
import pytest
from conftest import PROJECT_ROOT, artifact_paths, make_image_tree, python_env

from experiments.errors import UserError
from experiments.models import DataSpec, create_model, list_models
from experiments.train import TrainConfig, train


def test_train_logs_everything_a_run_needs(tiny_npz_dir):
    result = train(dataset="mnist", arch="cnn_simple", epochs=2, batch_size=16, data_dir=str(tiny_npz_dir), seed=7)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.name == "mnist"  # one experiment per dataset
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view

    # Evaluation: exactly the figures train() returned.
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert run.data.metrics["test_loss"] == pytest.approx(result.test_loss)
    # Autolog was on: one point per epoch for the training metrics.
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "accuracy")
    assert [m.step for m in history] == [0, 1]

    tags = run.data.tags
    assert tags["dataset"] == "mnist" and tags["arch"] == "cnn_simple"
    assert tags["git_commit"] and tags["tensorflow_version"] and tags["keras_version"]
    assert tags["mlflow.runName"].startswith("mnist-cnn_simple-")
    assert "98%+" in tags["mlflow.note.content"]
    params = run.data.params
    assert params["seed"] == "7" and params["epochs"] == "2" and params["batch_size"] == "16"
    assert params["num_train"] == "60" and params["num_test"] == "20"
    assert "image_size" not in params and "weights" not in params  # options that did not apply

    # 5% of the training split, at least one image per class (three here), is kept out to calibrate on.
    assert params["calibration_fraction"] == "0.05" and params["num_calibration"] == "3"
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-training", "mnist-testing", "mnist-calibration"}
    assert inputs["mnist-testing"].digest == tags["data_digest"]

    # Standard evaluation: MLflow's figures and ours. The tiny test split holds classes 0-2 of MNIST's ten:
    # the other seven have no recall (left out, and noted), and nothing logged is NaN.
    metrics = run.data.metrics
    assert metrics["test_accuracy_score"] == pytest.approx(result.test_accuracy)  # mlflow.models.evaluate's
    assert {"test_precision_score", "test_recall_score", "test_f1_score", "test_macro_f1"} <= set(metrics)
    assert metrics["test_log_loss"] == metrics["test_loss"]
    assert {"test_recall/0", "test_f1/0", "test_recall/2"} <= set(metrics)
    predicted = set(np.load(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                                 artifact_path="evaluation/predictions.npz"))["predicted"])
    assert {name for name in metrics if name.startswith("test_precision/")} == {f"test_precision/{c}" for c in predicted}
    assert not any(name.startswith("test_recall/") and int(name[-1]) > 2 for name in metrics)
    assert "test_top5_accuracy" not in metrics  # 10 classes
    assert all(np.isfinite(value) for value in metrics.values())
    assert "recall left out for 7 class(es) with no test images: 3, 4, 5, 6, 7, 8, 9" in tags["evaluation_note"]

    # The accuracy's seeded 95% bootstrap interval, and calibration before and after temperature scaling.
    assert metrics["test_accuracy_ci_low"] <= result.test_accuracy <= metrics["test_accuracy_ci_high"]
    assert metrics["test_accuracy_ci_high"] - metrics["test_accuracy_ci_low"] > 0.1  # 20 test images
    assert metrics["temperature"] > 0 and {"test_ece", "test_ece_uncalibrated"} <= set(metrics)
    assert {
        "plots/confusion_matrix.png",
        "plots/learning_curves.png",
        "plots/misclassified.png",
        "plots/reliability_diagram.png",
        "evaluation/predictions.npz",
        "evaluation/per_class_accuracy.json",
        "test_confusion_matrix.png",  # MLflow's
        "per_class_metrics.csv",
        "config.json",
    } <= artifact_paths(result.run_id)


def test_untracked_train_runs_the_same_steps_without_mlflow(tiny_npz_dir):
    settings = dict(dataset="mnist", arch="cnn_simple", epochs=2, batch_size=16, data_dir=str(tiny_npz_dir), seed=3)
    plain = train(track=False, **settings)
    assert plain.run_id is None and mlflow.search_runs(search_all_experiments=True).empty
    assert mlflow.active_run() is None
    tracked = train(**settings)
    # Same seed, data, model and fit: the same weights come out, so the same test figures.
    assert plain.test_accuracy == tracked.test_accuracy
    assert plain.test_loss == tracked.test_loss
    assert mlflow.get_run(tracked.run_id).data.metrics["test_accuracy"] == tracked.test_accuracy


def test_per_class_accuracy_and_confusion_matrix_agree_with_test_accuracy(tiny_npz_dir):
    result = train(dataset="mnist", arch="mlp", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir))
    table = mlflow.load_table("evaluation/per_class_accuracy.json", run_ids=[result.run_id])
    assert table["support"].sum() == 20
    assert table["correct"].sum() / 20 == pytest.approx(result.test_accuracy)
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="evaluation/confusion_matrix.json")
    matrix = np.array(json.load(open(local))["matrix"])
    assert np.trace(matrix) / matrix.sum() == pytest.approx(result.test_accuracy)


def evaluated(tmp_path, class_names, labels, predictions, history: dict | None = None):
    """log_evaluation of a crafted case inside a run, as train() calls it: 8x8 images, probabilities
    whose argmax is `predictions` (0.7 on it, the rest spread evenly), a model id to log on."""
    from experiments.calibration import Served
    from experiments.datasets import ImageData, array_split
    from experiments.fit import score_predictions
    from experiments.run_logging import log_evaluation

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    k = len(class_names)
    probabilities = np.full((len(labels), k), 0.3 / (k - 1), np.float32)
    probabilities[np.arange(len(labels)), predictions] = 0.7
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    data = ImageData("pets", list(class_names), (8, 8, 3), array_split(images, labels), array_split(images, labels),
                     source=str(tmp_path))
    accuracy, loss = score_predictions(labels, probabilities)
    with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
        model_id = mlflow.create_external_model(name="model").model_id
        warnings.simplefilter("always")
        log_evaluation(data, Served(probabilities, note="not calibrated: constructed"),
                       history or {"loss": [1.0, 0.6], "accuracy": [0.3, 0.5]}, accuracy, loss, model_id)
    # No warning a user could not act on (scikit-learn's about undefined figures: the note says it).
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    return mlflow.get_run(run.info.run_id), model_id, data


def test_evaluation_logs_macro_and_per_class_figures_on_the_model_and_leaves_undefined_ones_out(tmp_path, capfd):
    """Worked by hand. Test split: cat x3, dog x2, fox x1, owl x0; predicted: cat x3, dog x2, fox x0, owl x1.
            precision   recall   f1 = 2TP / (images + predictions)
    cat     2/3         2/3      4/6
    dog     1/2         1/2      2/4
    fox     undefined   0/1      0/1    (never predicted)
    owl     0/1         undefined 0/1   (no test images)
    macro F1 = (2/3 + 1/2 + 0 + 0) / 4 = 7/24; accuracy 3/6."""
    run, model_id, data = evaluated(tmp_path, ["cat", "dog", "fox", "owl"], labels=[0, 0, 0, 1, 1, 2],
                                    predictions=[0, 0, 1, 1, 3, 0])
    metrics = run.data.metrics
    expected = {
        "test_precision/cat": 2 / 3, "test_precision/dog": 1 / 2, "test_precision/owl": 0.0,
        "test_recall/cat": 2 / 3, "test_recall/dog": 1 / 2, "test_recall/fox": 0.0,
        "test_f1/cat": 2 / 3, "test_f1/dog": 1 / 2, "test_f1/fox": 0.0, "test_f1/owl": 0.0,
        "test_macro_f1": 7 / 24, "test_accuracy": 0.5,
        # mlflow.models.evaluate's, macro-averaged over the classes in the split or predicted (as ours)
        "test_f1_score": 7 / 24, "test_precision_score": 7 / 24, "test_recall_score": 7 / 24,
        "test_accuracy_score": 0.5, "test_example_count": 6.0,
    }
    assert {name: metrics[name] for name in expected} == pytest.approx(expected)
    assert "test_precision/fox" not in metrics and "test_recall/owl" not in metrics  # undefined: left out
    assert "test_top5_accuracy" not in metrics  # 4 classes
    assert metrics["test_log_loss"] == metrics["test_loss"] == pytest.approx(-(3 * np.log(0.7) + 3 * np.log(0.1)) / 6)
    assert all(np.isfinite(value) for value in metrics.values())
    assert run.data.tags["evaluation_note"] == (
        "recall left out for 1 class(es) with no test images: owl; "
        "precision left out for 1 class(es) never predicted: fox")

    # Every test figure is on the model, once, with the test split's dataset.
    on_model = mlflow.get_logged_model(model_id).metrics
    assert sorted(m.key for m in on_model) == sorted(metrics)
    assert {(m.dataset_name, m.dataset_digest) for m in on_model} == {("pets-testing", data.test.digest)}
    client = mlflow.MlflowClient()
    assert all(len(client.get_metric_history(run.info.run_id, name)) == 1 for name in metrics)
    assert mlflow.get_active_model_id() is None  # nothing logged later is linked to the model by accident

    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/per_class_accuracy.json"))
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert rows["owl"]["recall"] is None and rows["owl"]["accuracy"] is None and rows["owl"]["precision"] == 0.0
    assert rows["owl"]["note"] == "no test images of this class"
    assert rows["fox"]["precision"] is None and rows["fox"]["recall"] == 0.0
    assert rows["fox"]["note"] == "never predicted"
    assert (rows["cat"]["precision"], rows["cat"]["support"], rows["cat"]["predicted"]) == (0.666667, 3, 3)
    assert {"test_confusion_matrix.png", "per_class_metrics.csv", "plots/confusion_matrix.png",
            "plots/learning_curves.png", "plots/misclassified.png"} <= artifact_paths(run.info.run_id)
    per_class = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/per_class_metrics.csv")
    assert per_class.splitlines()[1].startswith("cat,")  # MLflow's table, by class name

    out, err = capfd.readouterr()
    assert "mlflow.models.evaluation" not in out + err  # none of its INFO lines


def test_top5_accuracy_is_logged_with_20_classes_and_odd_class_names_become_metric_names(tmp_path):
    """20 classes, half the images predicted right; on the others the true class ties with 18 for 2nd
    (0.7 on the predicted class, 0.3/19 on each other): in the top 5, as only one class is more probable."""
    from experiments.scoring import metric_names, top_k_accuracy

    names = [f"class {i}" for i in range(17)] + ["a/b", "a_b", ".."]
    labels = np.arange(20)
    predictions = np.where(labels % 2 == 0, labels, (labels + 1) % 20)  # half right
    run, model_id, _ = evaluated(tmp_path, names, labels, predictions)
    metrics = run.data.metrics
    assert metrics["test_top5_accuracy"] == 1.0  # the true class ties for 2nd: in
    assert "test_top5_accuracy" in {m.key for m in mlflow.get_logged_model(model_id).metrics}
    assert metric_names(names)[-3:] == ["a_b", "a_b_18", "class_19"]  # legal in MLflow, and unique
    assert {"test_recall/class_0", "test_recall/a_b", "test_precision/a_b_18", "test_f1/class_19"} <= set(metrics)

    probabilities = np.tile(np.linspace(1.0, 0.05, 20, dtype=np.float32), (4, 1))  # class i ranked i+1st
    assert top_k_accuracy(np.array([0, 4, 5, 19]), probabilities, 5) == 0.5
    probabilities[:, 5] = probabilities[:, 4]  # a tie at the boundary counts as in (tf.math.in_top_k)
    assert top_k_accuracy(np.array([5]), probabilities[:1], 5) == 1.0


def test_evaluation_figures_leave_out_whatever_is_not_finite():
    """A diverged model's NaN probabilities: no NaN is logged, and the note says what was left out."""
    from experiments.scoring import TOP5_MIN_CLASSES, confusion_matrix, evaluation_figures

    labels = np.array([0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]], np.float32)
    predictions = probabilities.argmax(axis=1)
    figures = evaluation_figures(confusion_matrix(labels, predictions, 2), labels, probabilities, ["a", "b"],
                                 {"test_accuracy": 2 / 3, "test_loss": float("nan")})
    assert all(np.isfinite(value) for value in figures.metrics.values())
    assert "test_loss" not in figures.metrics and "test_log_loss" not in figures.metrics
    assert figures.metrics["test_accuracy"] == 2 / 3
    assert figures.notes == ["left out, not finite (are the probabilities finite?): test_ece, test_log_loss, test_loss"]
    many = np.eye(TOP5_MIN_CLASSES - 1, dtype=np.float32)
    assert "test_top5_accuracy" not in evaluation_figures(np.eye(19, dtype=np.int64), np.arange(19), many,
                                                          [str(i) for i in range(19)]).metrics


def test_logged_model_takes_uint8_and_predicts_like_the_trained_model(tiny_npz_dir):
    result = train(dataset="mnist", arch="cnn_simple", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir))
    loaded = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    spec = loaded.metadata.signature.inputs.inputs[0]
    assert spec.type == np.dtype("uint8") and spec.shape == (-1, 28, 28, 1)
    assert loaded.metadata.metadata["class_names"] == [str(i) for i in range(10)]
    requirements = mlflow.artifacts.load_text(f"runs:/{result.run_id}/model/requirements.txt").split()
    assert {r.split("==")[0] for r in requirements} == {"mlflow", "keras", "numpy", "tensorflow"}
    assert f"keras=={keras.__version__}" in requirements
    batch = np.random.default_rng(0).integers(0, 255, size=(5, 28, 28, 1), dtype=np.uint8)
    served = np.asarray(loaded.predict(batch))
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, result.model.predict(batch, verbose=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="dtype|type"):
        loaded.predict(batch.astype(np.float64))  # the signature is enforced


@pytest.mark.slow
def test_cnn_modern_serves_the_average_over_each_image_and_its_mirror(tmp_path):
    from conftest import make_npz

    make_npz(tmp_path / "cifar10.npz", n_train=64, n_test=16, shape=(32, 32, 3), classes=3)
    result = train(dataset="cifar10", arch="cnn_modern", epochs=1, batch_size=16, data_dir=str(tmp_path))
    run = mlflow.get_run(result.run_id)
    assert run.data.params["recipe.test_time_flip"] == "True"
    loaded = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    batch = np.random.default_rng(1).integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    served = np.asarray(loaded.predict(batch))
    # Flip-averaged: an image and its mirror image get the same prediction.
    np.testing.assert_allclose(served, np.asarray(loaded.predict(batch[:, :, ::-1].copy())), atol=1e-6)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    # The logged model is the one that was evaluated.
    test_images = np.load(tmp_path / "cifar10.npz")["x_test"]
    accuracy = np.mean(np.asarray(loaded.predict(test_images)).argmax(1) == np.load(tmp_path / "cifar10.npz")["y_test"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_folder_run_counts_skipped_images(tmp_path):
    root = make_image_tree(tmp_path / "tree", classes=("red", "blue", "green"))
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    result = train(dataset="folder", arch="cnn_basic", epochs=1, batch_size=8, data_dir=str(root), image_size=32)
    run = mlflow.get_run(result.run_id)
    assert run.data.params["skipped_images"] == "1"
    assert run.data.params["image_size"] == "32" and run.data.params["test_split"] == "test"
    loaded = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    assert loaded.metadata.metadata["class_names"] == ["blue", "green", "red"]
    assert np.asarray(loaded.predict(np.zeros((2, 32, 32, 3), np.uint8))).shape == (2, 3)


@pytest.mark.slow
def test_vgg16_head_caches_features_and_logs_one_image_to_class_model(tmp_path):
    root = make_image_tree(tmp_path / "tree", per_class=(4, 2), size=(40, 40))
    common = dict(dataset="folder", arch="vgg16_head", epochs=1, batch_size=4, data_dir=str(root), image_size=32,
                  weights="none")
    first = train(**common)
    second = train(**common)
    assert mlflow.get_run(first.run_id).data.tags["feature_cache"] == "miss"
    assert mlflow.get_run(second.run_id).data.tags["feature_cache"] == "hit"
    assert mlflow.get_run(second.run_id).data.params["weights"] == "none"
    # Same seed, same cached features: the two heads start alike and score alike.
    assert second.test_accuracy == pytest.approx(first.test_accuracy)

    loaded = mlflow.pyfunc.load_model(f"runs:/{first.run_id}/model")
    assert loaded.metadata.signature.inputs.inputs[0].shape == (-1, 32, 32, 3)
    images = np.random.default_rng(1).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    served = np.asarray(loaded.predict(images))
    np.testing.assert_allclose(served, first.model.predict(images, verbose=0), rtol=1e-4, atol=1e-5)
    assert served.shape == (3, 2)
    assert any(layer.name == "vgg16" for layer in first.model.layers)  # the base is inside the served model


@pytest.mark.slow
def test_a_damaged_feature_cache_is_rebuilt_never_read(tmp_path, capsys):
    from experiments.cache import cache_dir

    root = make_image_tree(tmp_path / "tree", per_class=(4, 2), size=(40, 40))
    common = dict(dataset="folder", arch="vgg16_head", epochs=1, batch_size=4, data_dir=str(root), image_size=32,
                  weights="none")
    first = train(**common)
    caches = sorted((cache_dir() / "features").glob("*.npy"))
    assert len(caches) == 2  # train and test
    caches[0].write_bytes(caches[0].read_bytes()[:100])  # cut short by a crash outside our atomic writes
    np.save(caches[1], np.zeros((1, 512), np.float32))  # the wrong number of rows
    second = train(**common)
    assert capsys.readouterr().out.count("rebuilding the unreadable VGG16 feature cache") == 2
    assert mlflow.get_run(second.run_id).data.tags["feature_cache"] == "miss"
    assert second.test_accuracy == pytest.approx(first.test_accuracy)
    assert all(len(np.load(path)) > 1 for path in caches)


def test_patch_whitening_decorrelates_the_first_layers_input():
    from experiments.models import PATCH_WHITENING, fit_patch_whitening

    # Smooth images, so that neighbouring pixels (and channels) are strongly correlated.
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, size=(200, 8, 8, 3)).astype(np.float32)
    images = np.clip(np.kron(coarse, np.ones((1, 4, 4, 1))) + rng.normal(0, 8, (200, 32, 32, 3)), 0, 255).astype(np.uint8)
    model = create_model("airbench", DataSpec((32, 32, 3), 10))
    assert fit_patch_whitening(model, images)
    assert not fit_patch_whitening(create_model("cnn_deep", DataSpec((32, 32, 3), 10)), images)  # no such layer

    layer = model.get_layer(PATCH_WHITENING)
    assert not layer.trainable and layer.kernel.shape == (2, 2, 3, 24)
    import keras

    outputs = keras.Model(model.input, layer.output).predict(images, verbose=0).reshape(-1, 24).astype(np.float64)
    covariance = outputs[:, :12].T @ outputs[:, :12] / len(outputs)  # the second 12 are their negatives
    np.testing.assert_allclose(outputs[:, 12:], -outputs[:, :12], atol=1e-2)
    off_diagonal = covariance - np.diag(np.diag(covariance))
    assert np.abs(off_diagonal).max() < 0.02  # decorrelated
    assert 0.9 < np.diag(covariance).max() <= 1.01  # unit variance along the strong directions


@pytest.mark.slow
def test_airbench_trains_through_train_with_its_recipe(tmp_path):
    from conftest import make_npz

    make_npz(tmp_path / "cifar10.npz", n_train=96, n_test=32, shape=(32, 32, 3), classes=3)
    # Batch 16, 4 epochs: 24 steps, so that the weight average (0.99 a step) has moved off its start
    # (at 6 steps it had not, and accuracy hovered at chance on one CI machine).
    result = train(dataset="cifar10", arch="airbench", epochs=4, batch_size=16, data_dir=str(tmp_path),
                   options={"widths": [16, 32, 32]})
    params = mlflow.get_run(result.run_id).data.params
    assert (params["recipe.optimizer"], params["recipe.learning_rate"], params["recipe.ema"]) == ("sgd", "0.125", "0.99")
    assert params["recipe.test_time_flip"] == params["recipe.test_time_shift"] == "True"
    assert params["learning_rate"] == "0.0" and params["options.widths"] == "[16, 32, 32]"
    assert result.test_accuracy > 0.8  # three brightness classes: learnable (1.0 on seeds 0-2)
    loaded = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    batch = np.load(tmp_path / "cifar10.npz")["x_test"][:4]
    np.testing.assert_allclose(np.asarray(loaded.predict(batch)), result.model.predict(batch, verbose=0), atol=1e-5)


def test_airbench_norm_biases_are_scaled_and_folded_into_stock_layers_for_saving():
    """airbench's norm offsets are 8 x beta (64x their learning rate); portable() writes 8 x beta into stock
    layers, so the saved model predicts as the trained one. Its convs start as the identity (dirac)."""
    from experiments.models import FastBatchNorm, portable

    model = create_model("airbench", DataSpec((32, 32, 3), 10), widths=[16, 32, 32])
    norms = [layer for layer in model.layers if isinstance(layer, FastBatchNorm)]
    assert len(norms) == 6 and {layer.bias_scale for layer in norms} == {8.0}
    rng = np.random.default_rng(0)
    for layer in norms:
        layer.beta.assign(rng.normal(0, 0.1, layer.beta.shape).astype("float32"))
    images = rng.integers(0, 255, (8, 32, 32, 3)).astype(np.uint8)

    saved = portable(model)
    assert not any(isinstance(layer, FastBatchNorm) for layer in saved.layers)
    np.testing.assert_allclose(saved.get_layer(norms[0].name).beta.numpy(), 8 * norms[0].beta.numpy(), rtol=1e-6)
    np.testing.assert_allclose(saved.predict(images, verbose=0), model.predict(images, verbose=0), atol=2e-3)

    first_conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.trainable)
    kernel = first_conv.kernel.numpy()  # 24 whitened channels in, 16 filters out
    np.testing.assert_array_equal(kernel[1, 1, :16, :16], np.eye(16))
    assert not kernel[[0, 2]].any() and not kernel[:, [0, 2]].any()


@pytest.mark.parametrize("fast", [False, True])
def test_recalibrated_norm_statistics_are_the_average_over_training_batches(fast):
    """After a weight average is swapped in, each norm's moving statistics become the mean of its input's
    per-batch means and variances over the given batches (not the last few batches' of other weights)."""
    import tensorflow as tf

    from experiments.models import FastBatchNorm
    from experiments.fit import recalibrate_norms

    inputs = keras.Input((4, 4, 3))
    norm = (FastBatchNorm if fast else keras.layers.BatchNormalization)(momentum=0.6)
    model = keras.Model(inputs, norm(inputs))
    norm.moving_mean.assign([9.0, 9.0, 9.0])
    rng = np.random.default_rng(0)
    images = rng.normal([1.0, -2.0, 0.5], [1.0, 3.0, 0.2], (40, 4, 4, 3)).astype(np.float32)
    batches = tf.data.Dataset.from_tensor_slices((images, np.zeros(40))).batch(10)

    recalibrate_norms(model, batches, steps=3)  # the first 30 images, in batches of 10

    per_batch = images[:30].reshape(3, -1, 3)
    np.testing.assert_allclose(norm.moving_mean.numpy(), per_batch.mean(axis=1).mean(axis=0), rtol=1e-4, atol=1e-5)
    variances = norm.moving_variance.numpy()
    biased, unbiased = per_batch.var(axis=1).mean(axis=0), per_batch.var(axis=1, ddof=1).mean(axis=0)
    assert np.allclose(variances, biased, rtol=1e-4) or np.allclose(variances, unbiased, rtol=1e-4)
    assert norm.momentum == 0.6


def test_batches_and_the_whitening_sample_draw_on_every_class_of_a_class_sorted_split():
    """Folder datasets are stored class by class (CIFAR-10's local copy): each epoch's first batch, and
    the images the patch whitening is fitted on, must still come from every class."""
    from experiments.datasets import array_split, sample_images
    from experiments.fit import make_batches

    labels = np.repeat(np.arange(10), 2400)  # 24,000 images, more than the old 20,000 shuffle buffer
    split = array_split(np.broadcast_to(labels[:, None, None, None], (len(labels), 2, 2, 1)).astype(np.uint8), labels)
    batches = make_batches(split, 256, 10, shuffle_seed=0)
    for _ in range(2):  # two epochs
        first_batch = next(iter(batches))[1].numpy().argmax(axis=1)
        assert set(first_batch.tolist()) == set(range(10))
    sample = sample_images(split, 100)
    assert len(sample) == 100 and np.bincount(sample[:, 0, 0, 0]).tolist() == [10] * 10


@pytest.mark.parametrize("rows, cols", [(1, 1), (-1, -1), (1, -1), (0, 1)])
def test_shift_moves_images_a_pixel_with_a_reflected_border(rows, cols):
    from experiments.models import shift

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    inputs = keras.Input((8, 6, 3), dtype="uint8")
    moved = np.asarray(keras.Model(inputs, shift(inputs, rows, cols))(images))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(moved, padded[:, 1 - rows : 9 - rows, 1 - cols : 7 - cols])


@pytest.mark.slow
def test_alternating_flip_mirrors_each_training_image_every_other_epoch(tmp_path):
    from conftest import make_npz

    from experiments.models import AlternatingFlip

    flip = AlternatingFlip()
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    mirrored = []
    for epoch in range(3):
        flip.epoch.assign(epoch)
        out = np.asarray(flip(images, training=True))
        assert all(np.array_equal(o, x) or np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images))
        mirrored.append(np.array([not np.array_equal(o, x) for o, x in zip(out, images)]))
    assert 16 < mirrored[0].sum() < 48  # about half start mirrored
    assert (mirrored[0] != mirrored[1]).all() and (mirrored[0] == mirrored[2]).all()
    np.testing.assert_array_equal(np.asarray(flip(images, training=False)), images)  # inference: as given

    # train() tells the layer each epoch; the saved model has a stock Identity in its place.
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(int(next(
        layer for layer in record.model.layers if isinstance(layer, AlternatingFlip)).epoch.numpy())))
    make_npz(tmp_path / "cifar10.npz", n_train=32, n_test=8, shape=(32, 32, 3), classes=2)
    result = train(dataset="cifar10", arch="airbench", epochs=3, batch_size=16, data_dir=str(tmp_path),
                   options={"widths": [8, 8, 8]}, callbacks=[record])
    assert seen == [0, 1, 2]
    served = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    assert served  # loads without this project's custom layers
    inner = next(layer for layer in result.model.layers if isinstance(layer, keras.Model))
    assert "Identity" in [type(layer).__name__ for layer in inner.layers]
    assert not any(isinstance(layer, AlternatingFlip) for layer in inner.layers)


def test_airbench_serves_airbench_multi_crop_average_of_six_views():
    """Half on the image and its mirror, half on both shifted a pixel up-left and down-right (and mirrored)."""
    from experiments.models import get_model_entry, inference_model, portable

    spec = DataSpec((32, 32, 3), 10)
    model = create_model("airbench", spec, widths=[8, 8, 8])
    served = inference_model(model, get_model_entry("airbench").recipe, spec)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    plain = portable(model)

    def both(x):
        return np.asarray(plain(x, training=False), np.float64) + np.asarray(plain(x[:, :, ::-1], training=False))

    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    expected = 0.25 * both(images) + 0.125 * (both(padded[:, 2:34, 2:34]) + both(padded[:, :32, :32]))
    np.testing.assert_allclose(served.predict(images, verbose=0), expected, atol=1e-5)
    assert served.output_names == ["probabilities"]


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_uint8_pixels(name):
    spec = DataSpec((32, 32, 3), 4)
    kwargs = {"weights": None} if name == "vgg16_head" else {}
    model = create_model(name, spec, **kwargs)
    assert model.inputs[0].dtype == "uint8"
    out = model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert out.shape == (2, 4)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-4)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"dataset": "svhn"}, "unknown dataset 'svhn'; choose one of:"),
        ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'; choose one of: airbench, airbench_m, airbench_s, cnn_basic"),
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"batch_size": -8}, "batch_size must be a positive integer, got -8"),
        ({"limit": -1}, "limit must be 0 (whole training split) or a positive count, got -1"),
        ({"learning_rate": -0.1}, "learning_rate must be positive"),
        ({"data_dir": "/no/such/folder"}, "data_dir /no/such/folder does not exist"),
        ({"arch": "vgg16_head", "weights": "/no/weights.h5"}, "weights must be 'imagenet', 'none' or an existing"),
    ],
)
def test_bad_input_fails_before_any_run_is_created(overrides, fragment, tiny_npz_dir):
    config = {"dataset": "mnist", "arch": "mlp", "data_dir": str(tiny_npz_dir), **overrides}
    with pytest.raises(UserError) as err:
        train(**config)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_folder_with_one_class_fails_before_training(tmp_path):
    root = make_image_tree(tmp_path / "one", classes=("only",))
    with pytest.raises(UserError, match="at least 2"):
        train(dataset="folder", arch="cnn_basic", data_dir=str(root))
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.slow
def test_a_kind_the_user_gave_the_experiment_is_left_alone(tiny_npz_dir):
    mlflow.create_experiment("mnist", tags={"mlflow.experimentKind": "genai_development"})
    result = train(dataset="mnist", arch="mlp", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir))
    experiment = mlflow.get_experiment(mlflow.get_run(result.run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "genai_development"


@pytest.mark.parametrize("dataset, arch", [("mnist", "cnn_simple"), ("fashion_mnist", "cnn_simple"),
                                           ("cifar10", "cnn_deep"), ("cifar100", "cnn_deep"),
                                           ("imagenette", "cnn_basic"), ("folder", "cnn_basic")])
def test_the_command_line_trains_the_datasets_tutorial_architecture_without_arch(dataset, arch):
    from experiments.train import parse_args

    config, _ = parse_args(["--dataset", dataset])
    assert config.arch == arch
    assert parse_args(["--dataset", dataset, "--arch", "mlp"])[0].arch == "mlp"


def test_an_unknown_dataset_without_arch_is_named_as_the_problem():
    from experiments.train import parse_args

    with pytest.raises(UserError, match=r"^unknown dataset 'svhn'; choose one of: caltech101, cifar10"):
        parse_args(["--dataset", "svhn"])


def test_command_line_prints_one_line_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--dataset", "mnist", "--arch", "lenet", "--epochs", "1"],
        cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: unknown architecture 'lenet'; choose one of: {', '.join(list_models())}"]
    assert "cnn_deep, cnn_modern" in errors[0]


def test_config_defaults_match_the_tutorial():
    config = TrainConfig("cifar10", "cnn_deep")
    assert (config.epochs, config.batch_size, config.learning_rate) == (10, 128, 0.0)
    assert config.training_recipe().learning_rate == 0.001  # 0: the architecture's own, the tutorial's Adam rate


def test_take_returns_the_asked_images_in_the_asked_order():
    import tensorflow as tf

    from experiments.datasets import Split
    from experiments.datasets import take_images

    images = np.arange(2500, dtype=np.int64).reshape(2500, 1, 1, 1).astype(np.uint16)
    labels = np.zeros(2500, np.int64)
    split = Split(tf.data.Dataset.from_tensor_slices((images, labels)), labels, "digest")
    picked = take_images(split, np.array([2047, 3, 1024, 2499, 3]))
    assert picked[:, 0, 0, 0].tolist() == [2047, 3, 1024, 2499, 3]
    assert take_images(split, np.array([], np.int64)).shape[0] == 0


@pytest.mark.slow
def test_training_shows_a_live_progress_bar_on_a_terminal_and_one_line_per_epoch_in_logs():
    import os
    import pty
    import subprocess
    import sys

    probe = [sys.executable, "-c", "from experiments.fit import progress_verbosity; print(progress_verbosity())"]
    logged = subprocess.run(probe, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert logged.stdout.strip() == "2"  # Keras's one line per epoch
    main, terminal = pty.openpty()
    try:
        subprocess.run(probe, stdout=terminal, stderr=subprocess.DEVNULL, timeout=120, cwd=PROJECT_ROOT, check=True)
        assert os.read(main, 100).decode().strip() == "1"  # Keras's live progress bar
    finally:
        os.close(main)
        os.close(terminal)
