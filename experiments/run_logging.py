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

from experiments.datasets import ImageData, take_images, takes_image_size
from experiments.models import Recipe, get_model_entry
from experiments.tracking import ARCH_TAG, DATA_DIGEST_TAG, DATASET_TAG, TRIAL_ID_TAG, git_state
from experiments.tutorial import TUTORIAL_FIGURES

MODEL_PACKAGES = ("mlflow", "keras", "numpy", "tensorflow")  # what a logged Keras model needs to load


def uint8_schema(image_shape: tuple):
    """The schema of a batch of raw uint8 images: what every model takes and every dataset is logged as."""
    from mlflow.types import Schema, TensorSpec

    return Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape), "image")])


def pinned_requirements(packages=MODEL_PACKAGES) -> list[str]:
    """`package==installed version` for each. MLflow infers the same by importing the model in a
    subprocess, seconds a run; naming them is free."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in packages]


def log_run_start(config, data: ImageData, recipe: Recipe, splits: tuple) -> None:
    """Tags, params, config.json and the fit and validation splits as `mlflow.data` inputs."""
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
    if TRIAL_ID_TAG in run.data.tags:  # a tuner trial keeps the name and note the tuner gave it
        del tags["mlflow.runName"], tags["mlflow.note.content"]
    mlflow.set_tags(tags)
    # `mlflow run` has already logged its parameters; MLflow refuses a param logged twice.
    logged = run.data.params
    params = {
        **applicable_params(config, data),
        **{f"recipe.{k}": v for k, v in dataclasses.asdict(recipe).items() if v is not None},
        **{f"options.{k}": json.dumps(v) for k, v in config.options.items()},
        **data.info,
        "num_train": len(data.train),
        "num_test": len(data.test),
    }
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    # train_config: the TrainConfig exactly as given, from which `experiments.reproduce` reruns the run.
    mlflow.log_dict({**params, "class_names": data.class_names, "train_config": dataclasses.asdict(config)},
                    "config.json")
    log_inputs(data, splits)


def log_inputs(data: ImageData, splits: tuple) -> None:
    from mlflow.data.meta_dataset import MetaDataset

    for split, context in splits:
        dataset = MetaDataset(source=dataset_source(data.source), name=f"{data.name}-{context}",
                              digest=split.digest, schema=uint8_schema(data.image_shape))
        log_input(dataset, context)


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


def resumed_epochs_callback():
    """Autolog's per-epoch metric logging without its start-of-training logging, for a resumed run: the
    params and model summary were logged when the run began, and MLflow refuses a param logged twice."""
    import mlflow

    callback = mlflow.keras.MlflowCallback()
    callback.on_train_begin = lambda logs=None: None
    return callback


def log_evaluation(data: ImageData, probabilities: np.ndarray, history: dict, accuracy: float, loss: float) -> None:
    """Test figures, the per-class table, the confusion matrix, and the plots."""
    import matplotlib.pyplot as plt
    import mlflow

    from experiments import evaluate  # matplotlib: only when a run ends, not at every command's start-up

    labels = data.test.labels
    predictions = probabilities.argmax(axis=1)
    mlflow.log_metrics({"test_accuracy": accuracy, "test_loss": loss})

    matrix = evaluate.confusion_matrix(labels, predictions, data.num_classes)
    mlflow.log_table(evaluate.per_class_accuracy(matrix, data.class_names), "evaluation/per_class_accuracy.json")
    mlflow.log_dict({"class_names": data.class_names, "matrix": matrix.tolist()}, "evaluation/confusion_matrix.json")
    wrong = np.flatnonzero(predictions != labels)
    shown = wrong[np.argsort(-probabilities[wrong, predictions[wrong]])][:25]
    images = take_images(data.test, shown)
    figures = {
        "plots/confusion_matrix.png": evaluate.plot_confusion_matrix(matrix, data.class_names),
        "plots/learning_curves.png": evaluate.plot_learning_curves(history),
        "plots/misclassified.png": evaluate.plot_misclassified(
            images, labels[shown], predictions[shown], probabilities[shown, predictions[shown]], data.class_names
        ),
    }
    for path, figure in figures.items():
        mlflow.log_figure(figure, path)
        plt.close(figure)


def model_signature(data: ImageData):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, data.num_classes), "probabilities")])
    return ModelSignature(inputs=uint8_schema(data.image_shape), outputs=outputs)


def log_model(model, data: ImageData) -> None:
    import mlflow

    # Explicit uint8 signature: autolog would record float32, and input_example is broken (mlflow #16183).
    mlflow.keras.log_model(
        model,  # already stock layers: inference_model() or the VGG path
        name="model",
        signature=model_signature(data),
        metadata={"class_names": data.class_names, "dataset": data.name, "data_digest": data.test.digest},
        pip_requirements=pinned_requirements(),
    )
