"""The one training path: dataset -> model -> fit with MLflow tracking -> evaluate -> log the model.

Every MLproject entry point (and every tuner trial) calls `train()`.

    python -m experiments.train --dataset cifar10 --arch cnn_deep --epochs 10
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from experiments.datasets import (
    ImageData,
    Split,
    cache_dir,
    check_cache_writable,
    check_dataset_args,
    file_key,
    holdout,
    list_datasets,
    load_dataset,
    takes_image_size,
)
from experiments import checkpoints
from experiments.cli import add_config_flags, boolean
from experiments.errors import UserError
from experiments.tracking import check_tracking_server, default_tracking_uri, git_state, use_experiment
from experiments.tutorial import TUTORIAL_FIGURES
from experiments.models import (
    AlternatingFlip,
    DataSpec,
    Recipe,
    fit_patch_whitening,
    get_model_entry,
    inference_model,
    list_models,
    vgg16_features,
    vgg16_head_layers,
)

WHITENING_SAMPLE = 5000  # training images a patch-whitening layer is fitted on
NORM_RECALIBRATION_STEPS = 50  # training batches the norms' statistics are recomputed on after a weight average

@dataclasses.dataclass
class TrainConfig:
    dataset: str
    arch: str
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 0.0  # 0: the architecture's recipe learning rate
    seed: int = 0
    data_dir: str = ""
    limit: int = 0
    image_size: int = 128  # folder datasets only; MNIST/CIFAR keep their native size
    weights: str = "imagenet"  # vgg16_head only: "imagenet", "none" or a local weights file
    test_fraction: float = 0.2  # trees without a test split (Caltech-101)
    # > 0: validate on this held-out share of the training split, so the test split stays unseen
    # (tuner trials); 0: validate on the test split, as the tutorial does.
    validation_fraction: float = 0.0
    options: dict = dataclasses.field(default_factory=dict)  # the architecture builder's keyword arguments
    recipe: dict = dataclasses.field(default_factory=dict)  # changes to the architecture's training recipe
    # TensorFlow op determinism: the same config and data give bit-identical runs on the same machine.
    # Process-wide and irreversible: once on, every later training in the process has it too.
    deterministic: bool = False

    def validate(self) -> None:
        """Bad input fails here, with one line, before any data is read or any run is created."""
        get_model_entry(self.arch)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seed < 0:
            raise UserError(f"seed must be 0 or a positive integer, got {self.seed}")
        if not self.learning_rate >= 0:
            raise UserError(f"learning_rate must be positive (or 0 for the architecture's own), got {self.learning_rate}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UserError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        self.training_recipe()  # unknown recipe options fail here
        try:  # unknown architecture options fail here, not after the run has started
            inspect.signature(get_model_entry(self.arch).build).bind(None, **self.options)
        except TypeError as exc:
            raise UserError(f"bad options for {self.arch} ({exc}); see the keyword arguments of its builder in "
                            "experiments/models.py") from None
        check_cache_writable()
        check_dataset_args(self.dataset, self.data_dir, self.image_size, self.limit, self.test_fraction)
        if get_model_entry(self.arch).recipe.features == "vgg16":
            if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
                raise UserError(f"weights must be 'imagenet', 'none' or an existing weights file, got {self.weights!r}")

    def training_recipe(self) -> Recipe:
        return get_model_entry(self.arch).recipe.updated(**self.recipe)


@dataclasses.dataclass
class TrainResult:
    run_id: str
    test_accuracy: float
    test_loss: float
    model: object  # keras.Model
    history: dict


def train(
    config: TrainConfig | None = None,
    *,
    model=None,
    callbacks=(),
    initial_epoch: int = 0,
    evaluate: bool = True,
    track: bool = True,
    resume: bool = False,
    **overrides,
) -> TrainResult:
    """Train `config.arch` on `config.dataset`, tracked in MLflow; returns the run id and test figures.

    Logs into the active MLflow run if there is one (a tuner trial, `mlflow run`), else starts a run
    in an experiment named after the dataset. A tuner passes the `model` it built (possibly warm-started),
    its `callbacks` and `initial_epoch`, and `evaluate=False`: a trial is scored on its validation
    split, and neither touches the test split nor logs a model. `track=False` runs the very same steps
    with no MLflow at all (run_id is None): the baseline of the tracking-overhead benchmark.

    Every epoch is checkpointed. A run killed mid-training continues from its last finished epoch,
    in the same MLflow run: automatically under `mlflow run --run-id <id>`, or with `resume=True`.
    """
    config = dataclasses.replace(config, **overrides) if config else TrainConfig(**overrides)
    config.validate()

    import keras
    import mlflow

    if track and mlflow.active_run() is None:
        check_tracking_server()
    data = load_data(config)
    recipe = config.training_recipe()
    spec = DataSpec(data.image_shape, data.num_classes, data.hflip)
    if model is not None and recipe.features:
        raise UserError(f"{config.arch} trains on cached features and cannot take a prebuilt model")

    splits = _fit_splits(config, data)
    # A tuner trial (it passes its model) has Keras Tuner's checkpoints; a VGG16 head retrains in seconds.
    checkpointed = track and model is None and evaluate and not recipe.features
    active = mlflow.active_run()
    launched_run_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
    checkpoint = checkpoints.find(config, launched_run_id, resume) if checkpointed else None
    callbacks = list(callbacks)
    with _tracking_run(config, checkpoint) if track else contextlib.nullcontext():
        run_id = mlflow.active_run().info.run_id if track else None  # the run this training logs to
        if checkpoint:
            print(f"resuming run {run_id} after epoch {checkpoint.epoch} of {config.epochs}", flush=True)
            mlflow.set_tag("resumed_after_epoch", checkpoint.epoch)
            checkpoints.log_missing_epochs(checkpoint)
            # Autolog would log initial_epoch again with a new value, which MLflow refuses; its
            # callback alone logs the remaining epochs (the params are logged already).
            callbacks = [checkpoints.callback(run_id, config, checkpoint.history), _epoch_metrics_callback(), *callbacks]
        elif track:
            _log_run_metadata(config, data, recipe, splits)
            # Autolog records params and per-epoch metrics; we log the model ourselves with a uint8 signature.
            mlflow.keras.autolog(log_models=False, log_datasets=False, silent=True)
            if checkpointed:  # first, ahead of autolog's: an epoch is saved before anything else sees it
                callbacks.insert(0, checkpoints.callback(run_id, config))
        try:
            # Seeded here, after MLflow has drawn its random run name from Python's `random`, which
            # Keras also seeds from: so tracking on or off gives the same weights.
            keras.utils.set_random_seed(config.seed)
            if config.deterministic:  # after the seed, as TensorFlow documents; no way to switch it off again
                import tensorflow as tf

                tf.config.experimental.enable_op_determinism()
            if recipe.features == "vgg16":
                model, history, probabilities = _fit_vgg16_head(config, data, spec, recipe)
            else:
                if checkpoint:
                    model, initial_epoch = checkpoint.load_model(), checkpoint.epoch
                elif model is None:
                    model = get_model_entry(config.arch).build(spec, **config.options)
                    fit_patch_whitening(model, _sample_images(splits[0][0], WHITENING_SAMPLE))
                history = _fit(model, config, data, recipe, splits, callbacks, initial_epoch,
                               compiled=checkpoint is not None)
                if checkpoint:  # the whole run's curves, for the plots
                    history = {k: v[: checkpoint.epoch] + history.get(k, []) for k, v in checkpoint.history.items()}
                probabilities = None
                if evaluate:
                    model = inference_model(model, recipe, spec)
                    probabilities = model.predict(_images(data.test, config.batch_size), verbose=0)
        finally:
            if track:
                mlflow.keras.autolog(disable=True)
        if not evaluate:
            return TrainResult(run_id, None, None, model, history)
        accuracy, loss = _test_scores(data.test.labels, probabilities)
        if track:
            _log_evaluation(data, probabilities, history, accuracy, loss)
            _log_model(model, data)
        if checkpointed:
            checkpoints.remove(run_id)
    print(f"test_accuracy={accuracy:.4f} test_loss={loss:.4f} run_id={run_id}", flush=True)
    return TrainResult(run_id, accuracy, loss, model, history)


_LOADED: dict = {}


def load_data(config: TrainConfig) -> ImageData:
    """The dataset, loaded once per process: tuner trials share it."""
    key = (config.dataset, config.data_dir, config.image_size, config.limit, config.seed, config.test_fraction,
           os.environ.get("CNN_DATA_DIR"))
    if key not in _LOADED:
        _LOADED.clear()  # one dataset at a time: they can be large
        _LOADED[key] = load_dataset(
            config.dataset, config.data_dir, config.image_size, config.limit, config.seed, config.test_fraction
        )
    return _LOADED[key]


# --- Tracking ------------------------------------------------------------------------------------


def _tracking_run(config: TrainConfig, checkpoint=None):
    import mlflow

    if mlflow.active_run() is not None:  # a tuner trial or a caller's run: log into it
        return contextlib.nullcontext(mlflow.active_run())
    mlflow.set_tracking_uri(default_tracking_uri())
    if checkpoint:
        return mlflow.start_run(run_id=checkpoint.run_id)
    if not os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` owns the experiment; otherwise one per dataset
        use_experiment(config.dataset)
    return mlflow.start_run()


def _fit_splits(config: TrainConfig, data: ImageData) -> tuple:
    """((split, context), (split, context)): what the model fits on, and what it is validated on."""
    if config.validation_fraction:  # a tuner trial: fits on part of train, scored on the rest; test unseen
        fit_split, validation_split = holdout(data.train, config.validation_fraction, config.seed)
        return (fit_split, "training"), (validation_split, "validation")
    return (data.train, "training"), (data.test, "testing")


def _log_run_metadata(config: TrainConfig, data: ImageData, recipe: Recipe, splits: tuple) -> None:
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    run = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id)
    figure = TUTORIAL_FIGURES.get((config.dataset, config.arch))
    tutorial = f" The tutorial reports {figure}." if figure else ""
    tags = {
        "dataset": config.dataset,
        "arch": config.arch,
        "data_digest": data.test.digest,
        "mlflow.runName": f"{config.dataset}-{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}",
        "mlflow.note.content": f"`{config.arch}` on `{config.dataset}`.{tutorial}",
        **_provenance(),
    }
    if "trial_id" in run.data.tags:  # a tuner trial keeps the name and note the tuner gave it
        del tags["mlflow.runName"], tags["mlflow.note.content"]
    mlflow.set_tags(tags)
    # `mlflow run` has already logged its parameters; MLflow refuses a param logged twice.
    logged = run.data.params
    params = {
        **_applicable(config, data),
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
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, *data.image_shape), "image")])
    for split, context in splits:
        dataset = MetaDataset(
            source=_dataset_source(data.source),
            name=f"{data.name}-{context}",
            digest=split.digest,
            schema=schema,
        )
        _log_input(dataset, context)


def _log_input(dataset, context: str, attempts: int = 5) -> None:
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


def _applicable(config: TrainConfig, data: ImageData) -> dict:
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


def _dataset_source(source: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if source.startswith(("http://", "https://")):
        return resolve_dataset_source(source)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them local
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(Path(source).resolve()))


def _provenance() -> dict:
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


# --- Fitting -------------------------------------------------------------------------------------


def _batches(split: Split, batch_size: int, num_classes: int, shuffle_seed: int | None = None):
    """(images, one-hot labels) batches; one-hot so that label smoothing works for every recipe."""
    import tensorflow as tf

    images = split.images
    if shuffle_seed is not None:
        # A buffer of the whole split: folder datasets are stored class by class, and a smaller buffer
        # fed each epoch's first batches from the first classes only, its last batches from the last ones
        # (CIFAR-10's local copy, 50,000 images, went through a 20,000 buffer until 3684baa).
        images = images.shuffle(len(split), seed=shuffle_seed, reshuffle_each_iteration=True)
    batches = images.batch(batch_size).map(lambda x, y: (x, tf.one_hot(y, num_classes)))
    return batches.prefetch(tf.data.AUTOTUNE)


def _sample_images(split: Split, count: int) -> np.ndarray:
    """About `count` images spread evenly over the split (so over every class of a class-sorted one)."""
    every = max(1, len(split) // count)
    return np.concatenate([x for x, _ in split.images.shard(every, 0).take(count).batch(1000).as_numpy_iterator()])


def _images(split: Split, batch_size: int):
    """Image-only batches in split order, for prediction."""
    return split.images.batch(batch_size).map(lambda x, y: x).prefetch(2)


def _compile(model, recipe: Recipe, config: TrainConfig, num_train: int, initial_epoch: int = 0,
             jit_compile: bool = False, steps_per_execution: int = 1) -> None:
    """Optimizer, loss and metrics from the recipe; the LR schedule spans the epochs still to run."""
    import keras

    total_steps = -(-num_train // config.batch_size) * max(1, config.epochs - initial_epoch)
    peak = config.learning_rate or recipe.learning_rate
    learning_rate = peak
    if recipe.schedule == "cosine":
        warmup = max(1, int(total_steps * recipe.warmup_fraction))
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=max(1, total_steps - warmup),
            warmup_target=peak,
            warmup_steps=warmup,
        )
    # Keras keeps the moving average and swaps it into the model when fit() ends. It has no bias
    # correction, so the average spans at most a tenth of the run: in a short run it would still
    # hold mostly the initial weights.
    ema_momentum = min(recipe.ema, max(0.0, 1 - 10 / total_steps))
    ema = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum > 0 else {}
    if recipe.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=recipe.weight_decay, **ema)
    elif recipe.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay or None, **ema
        )
    else:
        optimizer = keras.optimizers.Adam(learning_rate, **ema)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing)
    # XLA measured slower than plain TF graphs for these convnets on the CPU (187 vs 248 img/s).
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)


def _fit(model, config: TrainConfig, data: ImageData, recipe: Recipe, splits: tuple, callbacks: list,
         initial_epoch: int, compiled: bool = False) -> dict:
    import keras

    (train_split, _), (validation_split, _) = splits
    if not compiled:  # a checkpoint carries its optimizer, LR schedule position and weight average
        _compile(model, recipe, config, len(train_split), initial_epoch)
    flips = [layer for layer in model.layers if isinstance(layer, AlternatingFlip)]
    if flips:  # they mirror by epoch parity: tell them the epoch (on resume too)
        callbacks = [*callbacks, keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs=None: [layer.epoch.assign(epoch) for layer in flips])]
    train_batches = _batches(train_split, config.batch_size, data.num_classes, shuffle_seed=config.seed)
    validation_batches = _batches(validation_split, config.batch_size, data.num_classes)
    # batch_size is passed so autolog logs the same value the MLproject logged (else it logs None).
    history = model.fit(
        train_batches,
        validation_data=validation_batches,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        batch_size=config.batch_size,
        shuffle=False,  # tf.data shuffles; Keras would warn and ignore it
        callbacks=callbacks,
        verbose=2,
    )
    if model.optimizer.use_ema:
        recalibrate_norms(model, train_batches)
    return history.history


def recalibrate_norms(model, batches, steps: int = NORM_RECALIBRATION_STEPS) -> None:
    """Set every batch norm's moving statistics to their average over `steps` training batches.

    fit() ends by swapping the weight average into the model, but the norms' statistics were tracked
    for the last raw weights, over the last few batches only (airbench's momentum 0.6 spans about
    three). Recomputed for the averaged weights (in training mode, so on augmented images as in
    training): the 3-minute CIFAR-10 recipe went from 83.80% to 84.08%.
    """
    import keras
    import tensorflow as tf

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0  # each forward pass leaves exactly its own batch's statistics
    forward = tf.function(lambda images: model(images, training=True))
    totals = [np.zeros((2, *norm.moving_mean.shape)) for norm in norms]
    count = 0
    for images, _ in batches.take(steps):
        forward(images)
        for total, norm in zip(totals, norms):
            total += [norm.moving_mean.numpy(), norm.moving_variance.numpy()]
        count += 1
    for norm, total, momentum in zip(norms, totals, momenta):
        norm.moving_mean.assign(total[0] / count)
        norm.moving_variance.assign(total[1] / count)
        norm.momentum = momentum


def _fit_vgg16_head(config: TrainConfig, data: ImageData, spec: DataSpec, recipe: Recipe):
    """The tutorial's recipe: run frozen VGG16 once over the images (cached), train the head on features."""
    import keras

    weights = None if config.weights == "none" else config.weights
    extractor = vgg16_features(spec, weights)
    key = _weights_key(config)
    train_features = cached_features(extractor, data.train, key, config.batch_size)
    test_features = cached_features(extractor, data.test, key, config.batch_size)

    head = vgg16_head_layers(extractor.output_shape[1:], spec)
    _compile(head, recipe, config, len(data.train))
    onehot = np.eye(data.num_classes, dtype=np.float32)
    history = head.fit(
        train_features,
        onehot[data.train.labels],
        validation_data=(test_features, onehot[data.test.labels]),
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        verbose=2,
    )
    # The head sees exactly the cached features, so predicting on them equals the full model's output.
    probabilities = head.predict(test_features, batch_size=config.batch_size, verbose=0)
    model = keras.Model(extractor.input, head(extractor.output), name="vgg16_head")
    return model, history.history, probabilities


def _weights_key(config: TrainConfig) -> str:
    if config.weights == "imagenet":
        return "imagenet"
    if config.weights == "none":
        return f"random-seed{config.seed}"  # random weights differ per seed
    return file_key(Path(config.weights))


def feature_cache_path(extractor, split: Split, weights_key: str) -> Path:
    """Where a split's VGG16 features are cached. Key: data digest + image size + weights."""
    shape = "x".join(str(d) for d in extractor.input_shape[1:])
    return cache_dir() / "features" / f"vgg16-{split.digest}-{shape}-{weights_key}.npy"


def cached_features(extractor, split: Split, weights_key: str, batch_size: int) -> np.ndarray:
    """VGG16 features of a split, computed once."""
    import mlflow

    path = feature_cache_path(extractor, split, weights_key)
    if path.is_file():
        try:
            features = np.load(path, allow_pickle=False)
            if features.shape[:1] != (len(split),):
                raise ValueError(f"{features.shape[0]} rows for {len(split)} images")
        except (OSError, ValueError, EOFError) as exc:  # damaged outside our atomic writes: rebuilt, never used
            print(f"rebuilding the unreadable VGG16 feature cache {path} ({exc})", flush=True)
        else:
            print(f"reusing cached VGG16 features {path}", flush=True)
            if mlflow.active_run():
                mlflow.set_tag("feature_cache", "hit")
            return features
    print(f"extracting VGG16 features for {len(split)} images (cached at {path})", flush=True)
    features = extractor.predict(_images(split, batch_size), verbose=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy.partial", delete=False) as tmp:
            try:
                np.save(tmp, features)
            except OSError:
                os.unlink(tmp.name)
                raise
        os.replace(tmp.name, path)  # atomic: a kill never leaves a half-written cache under the real name
    except OSError as exc:  # a full disk costs the cache, not the run
        print(f"VGG16 features not cached ({exc.strerror}); free space in {path.parent} to reuse them", flush=True)
    if mlflow.active_run():
        mlflow.set_tag("feature_cache", "miss")
    return features


def _epoch_metrics_callback():
    import mlflow

    class EpochMetrics(mlflow.keras.MlflowCallback):
        def on_train_begin(self, logs=None):
            pass  # the optimizer params and model summary were logged when the run began

    return EpochMetrics()


# --- Evaluation and the logged model --------------------------------------------------------------


def _test_scores(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Accuracy and plain cross-entropy (comparable across recipes, whatever their training loss)."""
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    return accuracy, float(-np.mean(np.log(picked)))


def _log_evaluation(data: ImageData, probabilities: np.ndarray, history: dict, accuracy: float, loss: float) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    from experiments import evaluate

    labels = data.test.labels
    predictions = probabilities.argmax(axis=1)
    mlflow.log_metrics({"test_accuracy": accuracy, "test_loss": loss})

    matrix = evaluate.confusion_matrix(labels, predictions, data.num_classes)
    mlflow.log_table(evaluate.per_class_accuracy(matrix, data.class_names), "evaluation/per_class_accuracy.json")
    mlflow.log_dict({"class_names": data.class_names, "matrix": matrix.tolist()}, "evaluation/confusion_matrix.json")
    wrong = np.flatnonzero(predictions != labels)
    shown = wrong[np.argsort(-probabilities[wrong, predictions[wrong]])][:25]
    images = _take(data.test, shown)
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


def _take(split: Split, indices: np.ndarray) -> np.ndarray:
    """The images at `indices` (in the caller's order) from a split's pipeline, read in batches."""
    if not len(indices):
        return np.zeros((0, 1, 1, 1), np.uint8)
    wanted, found, offset = np.asarray(indices), {}, 0
    for images, _ in split.images.batch(1024).as_numpy_iterator():
        for index in wanted[(wanted >= offset) & (wanted < offset + len(images))]:
            found[int(index)] = images[index - offset]
        offset += len(images)
        if len(found) == len(set(wanted.tolist())):
            break
    return np.stack([found[int(i)] for i in wanted])


def model_signature(data: ImageData):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *data.image_shape), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, data.num_classes), "probabilities")]),
    )


def _log_model(model, data: ImageData) -> None:
    import mlflow

    # Explicit uint8 signature: autolog would record float32, and input_example is broken (mlflow #16183).
    mlflow.keras.log_model(
        model,  # already stock layers: inference_model() or the VGG path
        name="model",
        signature=model_signature(data),
        metadata={"class_names": data.class_names, "dataset": data.name, "data_digest": data.test.digest},
        pip_requirements=_model_requirements(),
    )


def _model_requirements() -> list[str]:
    """What a logged model needs. MLflow infers the same four by importing the model in a subprocess,
    7 s a run here; naming them is free."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("mlflow", "keras", "numpy", "tensorflow")]


# --- Command line ----------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(list_datasets())}")
    parser.add_argument("--arch", required=True, help=f"one of: {', '.join(list_models())}")
    add_config_flags(parser, TrainConfig, skip=("dataset", "arch"))
    parser.add_argument("--resume", type=boolean, default=False,
                        help="continue the newest killed run of these settings from its last finished epoch")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    return TrainConfig(**args), resume


def main(argv=None) -> int:
    try:
        config, resume = parse_args(argv)
        train(config, resume=resume)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
