"""The one training path: dataset -> model -> fit with MLflow tracking -> evaluate -> log the model.

Every MLproject entry point (and every tuner trial) calls `train()`.

    python -m experiments.train --dataset cifar10 --arch cnn_deep --epochs 10
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from experiments import checkpoints, precision, strategy as distribute
from experiments.cache import check_cache_writable
from experiments.cli import add_config_flags, architecture_names, boolean, run_main
from experiments.datasets import ImageData, check_dataset_args, default_arch, fit_splits, list_datasets, load_data
from experiments.errors import UserError
from experiments.tracking import check_tracking_server, launched_run_id, open_run, system_metrics_enabled

# Keras, the models and the fit loop are imported where they are used: `--help` answers at once.
if TYPE_CHECKING:
    from experiments.models import Recipe


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
    # Without a validation holdout: this seeded share of the training split is kept out of training to fit
    # the temperature of the softmax on (experiments/calibration.py); 0: no calibration.
    calibration_fraction: float = 0.05
    options: dict = dataclasses.field(default_factory=dict)  # the architecture builder's keyword arguments
    recipe: dict = dataclasses.field(default_factory=dict)  # changes to the architecture's training recipe
    # float32, bfloat16 or float16 (mixed: 16-bit math, float32 weights); auto: float16 on a GPU, else the
    # faster of float32 and bfloat16 on this CPU, measured once per machine (experiments/precision.py).
    precision: str = "auto"
    # TensorFlow op determinism: the same config and data give bit-identical runs on the same machine.
    # Process-wide and irreversible: once on, every later training in the process has it too.
    deterministic: bool = False

    def validate(self) -> None:
        """Bad input fails here, with one line, before any data is read or any run is created."""
        from experiments.models import get_model_entry
        from experiments.precision import check_precision

        get_model_entry(self.arch)
        check_precision(self.precision, self.options)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seed < 0:
            raise UserError(f"seed must be 0 or a positive integer, got {self.seed}")
        if not self.learning_rate >= 0:
            raise UserError(f"learning_rate must be positive (or 0 for the architecture's own), got {self.learning_rate}")
        for name in ("validation_fraction", "calibration_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self.training_recipe()  # unknown recipe options fail here
        try:  # unknown architecture options fail here, not after the run has started
            inspect.signature(get_model_entry(self.arch).build).bind(None, **self.options)
        except TypeError as exc:
            raise UserError(f"bad options for {self.arch} ({exc}); see the keyword arguments of its builder in "
                            "experiments/models/") from None
        check_cache_writable()
        system_metrics_enabled()
        check_dataset_args(self.dataset, self.data_dir, self.image_size, self.limit, self.test_fraction)
        if get_model_entry(self.arch).recipe.features == "vgg16":
            if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
                raise UserError(f"weights must be 'imagenet', 'none' or an existing weights file, got {self.weights!r}")

    def training_recipe(self) -> Recipe:
        from experiments.models import get_model_entry

        return get_model_entry(self.arch).recipe.updated(**self.recipe)


@dataclasses.dataclass
class TrainResult:
    run_id: str
    test_accuracy: float
    test_loss: float
    model: object  # keras.Model
    history: dict


def train(config: TrainConfig | None = None, *, model=None, callbacks=(), initial_epoch: int = 0,
          evaluate: bool = True, track: bool = True, resume: bool = False, strategy: str = "auto",
          workers: str = "", worker_index: int = 0, **overrides) -> TrainResult:
    """Train `config.arch` on `config.dataset`, tracked in MLflow; returns the run id and test figures.

    Logs into the active MLflow run if there is one (a tuner trial, `mlflow run`), else starts a run
    in an experiment named after the dataset. A tuner passes the `model` it built (possibly warm-started),
    its `callbacks` and `initial_epoch`, and `evaluate=False`: a trial is scored on its validation
    split, and neither touches the test split nor logs a model. `track=False` runs the very same steps
    with no MLflow at all (run_id is None): the baseline of the tracking-overhead benchmark.

    Every epoch is checkpointed. A run killed mid-training continues from its last finished epoch,
    in the same MLflow run: automatically under `mlflow run --run-id <id>`, or with `resume=True`.
    """
    import mlflow

    from experiments import fit, run_logging

    config = dataclasses.replace(config, **overrides) if config else TrainConfig(**overrides)
    config.validate()
    on_features = bool(config.training_recipe().features)
    if model is not None and on_features:
        raise UserError(f"{config.arch} trains on cached features and cannot take a prebuilt model")
    # Before any other TensorFlow op (MultiWorkerMirroredStrategy's rule); multi_worker: the chief alone logs.
    distribution = distribute.prepare(strategy, workers, worker_index, config.batch_size, model is not None or on_features)
    if track and distribution.is_chief and mlflow.active_run() is None:
        check_tracking_server()
    data = load_data(config)
    # A tuner trial has Keras Tuner's checkpoints; a VGG16 head retrains in seconds. Workers only read them.
    checkpointed = track and model is None and evaluate and not on_features
    track, evaluate = track and distribution.is_chief, evaluate and distribution.is_chief
    active = mlflow.active_run()
    checkpoint = checkpoints.find(config, active.info.run_id if active else launched_run_id(),
                                  resume) if checkpointed else None
    # A VGG16 head fits on every training image's cached features: none held out to calibrate on.
    splits = fit_splits(data, config.validation_fraction, config.seed, 0 if on_features else config.calibration_fraction)
    # Chosen before the run starts; a resumed run or a tuner's prebuilt model already has its precision.
    choice = None if checkpoint or model is not None else precision.for_training(config, data.spec)
    with open_run(config.dataset, checkpoint and checkpoint.run_id) if track else contextlib.nullcontext():
        run_id = mlflow.active_run().info.run_id if track else None  # the run this training logs to
        if track:
            callbacks = run_logging.start_tracking(config, data, splits, callbacks, checkpoint, checkpointed, choice,
                                                   distribution)
        elif checkpointed:  # a worker: it saves when the chief does (a collective op), into a throwaway folder
            callbacks = [checkpoints.callback(None, config), *callbacks]
        model, history, served = fit_and_predict(config, data, splits, model, callbacks, initial_epoch,
                                                 checkpoint, evaluate, choice, distribution)
        if not evaluate:
            return TrainResult(run_id, None, None, model, history)
        accuracy, loss = fit.score_predictions(data.test.labels, served.probabilities)
        if track:  # the model first: the test figures are logged on it
            model_id = run_logging.log_model(model, data, history)
            run_logging.log_evaluation(data, served, history, accuracy, loss, model_id)
            run_logging.log_view_figures(served, config, data, model_id)
            run_logging.log_gradcam(model, data, served.probabilities)
        if checkpointed:
            checkpoints.remove(run_id)
    distribution.barrier()  # the other workers wait for the chief to finish (see Distribution.finish)
    print(f"test_accuracy={accuracy:.4f} test_loss={loss:.4f} run_id={run_id}", flush=True)
    return TrainResult(run_id, accuracy, loss, model, history)


def fit_and_predict(config: TrainConfig, data: ImageData, splits: tuple, model, callbacks: list,
                    initial_epoch: int, checkpoint, evaluate: bool, choice, distribution) -> tuple:
    """(model, history, its test predictions as calibration.Served or None): build or resume the model, fit
    it under the distribution's strategy, calibrate it and predict the test split."""
    import keras

    from experiments import calibration, fit
    from experiments.features import fit_vgg16_head
    from experiments.models import create_model, get_model_entry

    # Seeded here, after MLflow has drawn its random run name from Python's `random`, which
    # Keras also seeds from: so tracking on or off gives the same weights.
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:  # after the seed, as TensorFlow documents; no way to switch it off again
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    spec, entry = data.spec, get_model_entry(config.arch)
    if entry.recipe.features == "vgg16":
        return fit_vgg16_head(config, data, spec, callbacks, choice.policy)
    with distribution.scope():
        if checkpoint:
            model, initial_epoch = checkpoint.load_model(), checkpoint.epoch
        elif model is None:
            model = create_model(config.arch, spec, choice.policy, **config.options)
            if entry.prepare:  # e.g. airbench's patch whitening, set from training images
                entry.prepare(model, splits[0][0])
        model_callbacks = entry.callbacks(model) if entry.callbacks else []
        history = fit.fit(model, config, data, splits, [*callbacks, *model_callbacks], initial_epoch,
                          compiled=checkpoint is not None)
    if checkpoint:  # the whole run's curves, for the plots
        history = {k: v[: checkpoint.epoch] + history.get(k, []) for k, v in checkpoint.history.items()}
    model = distribution.finish(model)  # on every worker: it saves a copy, a collective op
    if not evaluate:
        return model, history, None
    model, served = calibration.served_model(model, config, data, splits)
    return model, history, served


def parse_args(argv=None) -> tuple[TrainConfig, dict]:
    """The config, and train()'s `resume`, `strategy`, `workers` and `worker_index`."""
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(list_datasets())}")
    parser.add_argument("--arch", default="", help=f"one of: {', '.join(architecture_names())} (default: the dataset's "
                        "tutorial architecture, as in MLproject)")
    add_config_flags(parser, TrainConfig, skip=("dataset", "arch"))
    parser.add_argument("--resume", type=boolean, default=False,
                        help="continue the newest killed run of these settings from its last finished epoch")
    distribute.add_flags(parser)
    args = vars(parser.parse_args(argv))
    run_options = {name: args.pop(name) for name in ("resume", "strategy", "workers", "worker_index")}
    args["arch"] = args["arch"] or default_arch(args["dataset"])
    return TrainConfig(**args), run_options


def main(argv=None) -> int:
    def body():
        config, run_options = parse_args(argv)
        train(config, **run_options)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
