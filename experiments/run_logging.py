"""What a training run records in MLflow: tags, params and inputs at the start; evaluation and the model at
the end. train() calls these inside the run it logs to."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
from mlflow.keras import MlflowCallback

# Before any run starts, not when it ends: importing MLflow's evaluation modules while the run's system
# metrics thread logs can deadlock in MLflow's import hooks (a training hung in CI, MLflow 3.17.2).
from experiments import checkpoints, evaluate, predictions, scoring
from experiments.datasets import ImageData, take_images, takes_image_size
from experiments.models import Recipe, get_model_entry
from experiments.tracking import ARCH_TAG, DATA_DIGEST_TAG, DATASET_TAG, TRIAL_ID_TAG, git_state
from experiments.tutorial import TUTORIAL_FIGURES

MODEL_PACKAGES = ("mlflow", "keras", "numpy", "tensorflow")  # what a logged Keras model needs to load
# The step a model is logged at. MLflow links every run metric of that step to the model; no metric has
# step -1, so none is linked by accident (the system metrics' sample at the last epoch's step would be).
MODEL_STEP = -1


def uint8_schema(image_shape: tuple):
    """The schema of a batch of raw uint8 images: what every model takes and every dataset is logged as."""
    from mlflow.types import Schema, TensorSpec

    return Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape), "image")])


def pinned_requirements(packages=MODEL_PACKAGES) -> list[str]:
    """`package==installed version` for each. MLflow infers the same by importing the model in a
    subprocess, seconds a run; naming them is free."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in packages]


def start_tracking(config, data: ImageData, splits: tuple, callbacks, checkpoint, checkpointed,
                   choice, distribution) -> list:
    """Log what a new run records at its start (a resumed run: its missing epochs); returns the callbacks
    that log and checkpoint each epoch, ahead of the caller's."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    if checkpoint:
        print(f"resuming run {run_id} after epoch {checkpoint.epoch} of {config.epochs}", flush=True)
        mlflow.set_tag("resumed_after_epoch", checkpoint.epoch)
        checkpoints.log_missing_epochs(checkpoint)
        return [checkpoints.callback(run_id, config, checkpoint.history),
                EpochLogger(log_summary=False), *callbacks]
    log_run_start(config, data, config.training_recipe(), splits, choice, distribution)
    # The checkpoint callback comes first: an epoch is saved before anything else sees it. Then MLflow's
    # per-epoch logging (the model is logged at the end, with a uint8 signature).
    saved = [checkpoints.callback(run_id, config)] if checkpointed else []
    return [*saved, EpochLogger(), *callbacks]


def log_run_start(config, data: ImageData, recipe: Recipe, splits: tuple, precision=None, distribution=None) -> None:
    """Tags, params, config.json and the fit and validation splits as `mlflow.data` inputs. `precision`, an
    `experiments.precision.Choice`: the precision trained in (`precision_chosen`) and why (a tag).
    `distribution` (experiments.strategy): the strategy, workers, replicas and batches (and the workers' hosts)."""
    import mlflow

    run = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id)
    figure = TUTORIAL_FIGURES.get((config.dataset, config.arch))
    tutorial = f" The tutorial reports {figure}." if figure else ""
    tags = {
        DATASET_TAG: config.dataset,
        ARCH_TAG: config.arch,
        DATA_DIGEST_TAG: data.test.digest,
        "mlflow.runName": f"{config.dataset}-{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}",
        "mlflow.note.content": f"`{config.arch}` on `{config.dataset}`.{tutorial}",
        **provenance(),
    }
    if precision:
        tags["precision_reason"] = precision.reason
    if distribution and distribution.cluster:
        tags["cluster_workers"] = ",".join(distribution.cluster.workers)
    trial = TRIAL_ID_TAG in run.data.tags
    if trial:  # a tuner trial keeps the name and note the tuner gave it
        del tags["mlflow.runName"], tags["mlflow.note.content"]
    mlflow.set_tags(tags)
    # `mlflow run` has already logged its parameters; MLflow refuses a param logged twice.
    logged = run.data.params
    # A tuner trial has logged its hyperparameters as flat columns (tuning/spaces.py): the recipe and
    # options would repeat them as JSON. config.json below keeps them all.
    choices = {} if trial else {
        **{f"recipe.{k}": v for k, v in dataclasses.asdict(recipe).items() if v is not None},
        **{f"options.{k}": json.dumps(v) for k, v in config.options.items()},
    }
    params = {
        **applicable_params(config, data),
        **choices,
        **data.info,
        **({"precision_chosen": precision.precision} if precision else {}),
        **(distribution.params() if distribution else {}),
        "num_train": len(data.train),
        "num_test": len(data.test),
        **{"num_calibration": len(split) for split, context in splits if context == "calibration"},
    }
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    # train_config: the TrainConfig exactly as given, from which `experiments.reproduce` reruns the run.
    mlflow.log_dict({**params, "class_names": data.class_names, "train_config": dataclasses.asdict(config)},
                    "config.json")
    log_inputs(data, splits)


def log_inputs(data: ImageData, splits: tuple) -> None:
    for split, context in splits:
        log_input(split_dataset(data, split, context), context)


def split_dataset(data: ImageData, split, context: str):
    """A split as an `mlflow.data` dataset: named after the dataset and its role, identified by its digest."""
    from mlflow.data.meta_dataset import MetaDataset

    return MetaDataset(source=dataset_source(data.source), name=f"{data.name}-{context}", digest=split.digest,
                       schema=uint8_schema(data.image_shape))


def log_input(dataset, context: str, attempts: int = 5) -> None:
    """mlflow.log_input, retried: MLflow checks for the dataset, then inserts it, so two runs logging the
    same new dataset at once can collide on its unique key (seen with three tuner workers and two
    trainings on one server). The retry finds the dataset the other run inserted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return mlflow.log_input(dataset, context=context)
        except MlflowException as exc:
            collided = any(word in str(exc) for word in ("IntegrityError", "UNIQUE constraint", "duplicate key"))
            if not collided or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def applicable_params(config, data: ImageData) -> dict:
    """The config without the options that did not apply to this run (they would only mislead)."""
    params = dataclasses.asdict(config)
    del params["options"], params["recipe"]  # logged field by field
    if not config.validation_fraction:
        del params["validation_fraction"]
    if config.validation_fraction or get_model_entry(config.arch).recipe.features == "vgg16":
        del params["calibration_fraction"]  # calibrated on the validation holdout, or not at all
    if not takes_image_size(config.dataset):  # MNIST/CIFAR keep their native size
        del params["image_size"]
    if get_model_entry(config.arch).recipe.features != "vgg16":
        del params["weights"]
    if data.info.get("test_split") != "seeded_stratified":
        del params["test_fraction"]
    params["deterministic"] = str(config.deterministic).lower()  # as `mlflow run` logs the MLproject's "false"
    return params


def dataset_source(source: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if source.startswith(("http://", "https://")):
        return resolve_dataset_source(source)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them local
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(Path(source).resolve()))


def provenance() -> dict:
    """Git commit, dirty flag and package versions, so a run can be reproduced."""
    import keras
    import mlflow
    import tensorflow as tf

    tags = {
        "python_version": platform.python_version(),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "mlflow_version": mlflow.__version__,
        "numpy_version": np.__version__,
        "platform": platform.platform(),  # bit-exact results also depend on the CPU and OS
    }
    return {**tags, **git_state()}


class EpochLogger(MlflowCallback):
    """MLflow's Keras callback (what `mlflow.keras.autolog` adds to a fit), with one metric per name per
    step: the per-epoch `val_*` curves stay, the validation pass's step-less `validation_*` copies of
    them go (mlflow #14293; autolog cannot be told). At the start it logs the model summary, not the
    optimizer's config, whose schedules are dicts and whose fields differ between optimizers: the
    `recipe.*` params say how the model was trained. `log_summary=False` for a resumed run, which
    logged it when it began."""

    def __init__(self, log_summary: bool = True):
        super().__init__()
        self.log_summary = log_summary

    def on_train_begin(self, logs=None):
        import mlflow

        if self.log_summary:
            lines = []
            self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
            mlflow.log_text("\n".join(lines), "model_summary.txt")

    def on_test_end(self, logs=None):
        pass


def log_evaluation(data: ImageData, served, history: dict, accuracy: float, loss: float, model_id: str) -> None:
    """Test figures, all on the logged model `model_id` and the test split's dataset (so the Models tab
    shows them): MLflow's standard classifier evaluation (evaluate.standard_evaluation: test_accuracy_score,
    macro test_precision_score / test_recall_score / test_f1_score, its confusion matrix and per-class
    CSV), and ours beside it (scoring.py): test_accuracy, test_loss and the same figure as
    test_log_loss, test_macro_f1, test_top5_accuracy (20+ classes), test_precision|recall|f1/<class>,
    the accuracy's bootstrap interval (test_accuracy_ci_low/high) and test_ece. A figure that is undefined
    is left out, never NaN; the `evaluation_note` tag says which and why. `served`, the test predictions
    (calibration.Served): calibrated, also `temperature` and `test_ece_uncalibrated`; else the
    `calibration_note` tag says why not. Also the per-image predictions (experiments/predictions.py), the
    per-class table, the confusion matrix as JSON, and the plots."""
    import matplotlib.pyplot as plt
    import mlflow

    labels, probabilities = data.test.labels, served.probabilities
    predicted = probabilities.argmax(axis=1)
    dataset = split_dataset(data, data.test, "testing")
    matrix = scoring.confusion_matrix(labels, predicted, data.num_classes)
    ours = scoring.evaluation_figures(matrix, labels, probabilities, data.class_names,
                                      {"test_accuracy": accuracy, "test_loss": loss})
    mlflow.log_metrics(ours.metrics, model_id=model_id, dataset=dataset)
    uncalibrated = None
    if served.uncalibrated is not None:
        uncalibrated = scoring.calibration_bins(labels, served.uncalibrated)
        mlflow.log_metric("test_ece_uncalibrated", scoring.expected_calibration_error(labels, served.uncalibrated),
                          model_id=model_id, dataset=dataset)
        mlflow.log_metric("temperature", served.temperature, model_id=model_id)  # fitted on the holdout
    else:
        mlflow.set_tag("calibration_note", served.note)
    if ours.notes:
        mlflow.set_tag(scoring.NOTE_TAG, "; ".join(ours.notes))
    predictions.log(labels, probabilities, data.test.digest)
    mlflow.log_table(ours.per_class, "evaluation/per_class_accuracy.json")
    mlflow.log_dict({"class_names": data.class_names, "matrix": matrix.tolist()}, "evaluation/confusion_matrix.json")
    shown = most_confident_mistakes(labels, probabilities, 25)
    images = take_images(data.test, shown)
    figures = {
        "plots/confusion_matrix.png": evaluate.plot_confusion_matrix(matrix, data.class_names),
        "plots/learning_curves.png": evaluate.plot_learning_curves(history),
        "plots/misclassified.png": evaluate.plot_misclassified(
            images, labels[shown], predicted[shown], probabilities[shown, predicted[shown]], data.class_names
        ),
        "plots/reliability_diagram.png": evaluate.plot_reliability(
            scoring.calibration_bins(labels, probabilities), uncalibrated,
            served.temperature if uncalibrated is not None else None),
    }
    for path, figure in figures.items():
        mlflow.log_figure(figure, path)
        plt.close(figure)
    # MLflow's last: should it fail (and the run with it), the model and all of ours are logged already.
    standard = evaluate.standard_evaluation(labels, predicted, data.class_names, dataset)
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    link_metrics(client, run_id, model_id, [client.get_metric_history(run_id, name)[-1] for name in standard],
                 dataset)


def model_signature(data: ImageData):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, data.num_classes), "probabilities")])
    return ModelSignature(inputs=uint8_schema(data.image_shape), outputs=outputs)


def log_model(model, data: ImageData, history: dict) -> str:
    """Log the model; link the final epoch's figures to it (not the first's); return its model id."""
    import mlflow

    # Explicit uint8 signature: autolog would record float32, and input_example is broken (mlflow #16183).
    info = mlflow.keras.log_model(
        model,  # already stock layers: inference_model() or the VGG path
        name="model",
        signature=model_signature(data),
        metadata={"class_names": data.class_names, "dataset": data.name, "data_digest": data.test.digest},
        pip_requirements=pinned_requirements(),
        step=MODEL_STEP,
    )
    link_final_epoch(info.model_id, history)
    return info.model_id


def link_final_epoch(model_id: str, history: dict) -> None:
    """The run's values of the epoch metrics at the last epoch, linked to the model."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    last_step = max((len(values) for values in history.values()), default=0) - 1
    link_metrics(client, run_id, model_id, [metric for name in history for metric in
                                            client.get_metric_history(run_id, name) if metric.step == last_step])


def link_metrics(client, run_id: str, model_id: str, metrics: list, dataset=None) -> None:
    """Link a run's logged metrics to a model (and to `dataset`, else to the dataset they name): re-logged
    with the same timestamp, step and value, which MLflow stores once in the run (as log_model's own
    link does)."""
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id,
               dataset_name=dataset.name if dataset else m.dataset_name,
               dataset_digest=dataset.digest if dataset else m.dataset_digest)
        for m in metrics])


def log_view_figures(served, config, data: ImageData, model_id: str) -> None:
    """For a model served with test-time views: the test accuracy with fewer views (`test_accuracy_tta_none`,
    and `_flip` below six views; calibration.Served.fewer_views), on the model and the test dataset, and the
    tag `tta` (the views it serves). `python -m registry.promote --tta` serves one of these instead; these say
    what it scores."""
    import mlflow

    from experiments.models import tta_level

    mlflow.set_tag("tta", tta_level(config.training_recipe(), data.spec))
    figures = {f"test_accuracy_tta_{level}": float(np.mean(probabilities.argmax(axis=1) == data.test.labels))
               for level, probabilities in served.fewer_views.items()}
    if figures:
        mlflow.log_metrics(figures, model_id=model_id, dataset=split_dataset(data, data.test, "testing"))


def most_confident_mistakes(labels: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """The indices of up to `count` misclassified images, the most confidently wrong first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]


GRADCAM_IMAGES = 8  # misclassified, and as many correct, test images in plots/gradcam.png


def log_gradcam(model, data: ImageData, probabilities: np.ndarray) -> None:
    """plots/gradcam.png: Grad-CAM heatmaps over the most confident mistakes and evenly spread correct
    test images (experiments/gradcam.py); a network without convolutions gets the tag `gradcam_note`."""
    import matplotlib.pyplot as plt
    import mlflow

    from experiments import gradcam
    from experiments.models import without_views

    net = without_views(model)  # the heatmap of one view: the image as given
    layer = gradcam.feature_layer(net)
    if layer is None:
        mlflow.set_tag("gradcam_note", f"no Grad-CAM: {model.name} has no convolutions")
        return
    labels, predicted = data.test.labels, probabilities.argmax(axis=1)
    wrong, right = most_confident_mistakes(labels, probabilities, GRADCAM_IMAGES), np.flatnonzero(predicted == labels)
    right = right[np.linspace(0, len(right) - 1, min(GRADCAM_IMAGES, len(right))).astype(int)] if len(right) else right
    shown = np.concatenate([wrong, right]).astype(int)
    images = take_images(data.test, shown)
    try:
        heatmaps = gradcam.heatmaps(gradcam.explainer(net, layer), images, predicted[shown])
    except Exception as exc:  # noqa: BLE001 - an explanation never costs a finished training its model
        mlflow.set_tag("gradcam_note", f"no Grad-CAM: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return
    figure = evaluate.plot_gradcam(images, heatmaps, labels[shown], predicted[shown], data.class_names, len(wrong))
    mlflow.log_figure(figure, "plots/gradcam.png")
    plt.close(figure)
