"""Fitting a Keras model by its recipe: batches, optimizer and loss, model.fit, norm statistics. No MLflow here.

The fit loop knows recipes, not architectures: what a model needs beyond its recipe comes from its
registry entry's hooks (see experiments/models), which train() passes in as callbacks.
"""

from __future__ import annotations

import sys

import keras
import numpy as np

from experiments.datasets import ImageData, Split
from experiments.models import Recipe

NORM_RECALIBRATION_STEPS = 50  # training batches the norms' statistics are recomputed on after a weight average


class RecordLearningRate(keras.callbacks.Callback):
    """Adds the learning rate the optimizer has reached to each epoch's logs, as Keras's own
    LearningRateScheduler does: so the history, the checkpoints and MLflow all get it per epoch, and
    cosine and constant schedules can be compared."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


@keras.saving.register_keras_serializable(package="cnn_mlflow")
class Triangular(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's schedule: linear from `start` x peak up to the peak over `warmup_steps`, then linear down
    to `end` x peak at `total_steps`."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, start: float = 0.2, end: float = 0.07):
        self.peak, self.total_steps, self.warmup_steps, self.start, self.end = peak, total_steps, warmup_steps, start, end

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = self.start + (1.0 - self.start) * step / self.warmup_steps
        down_steps = max(1, self.total_steps - self.warmup_steps)
        down = 1.0 + (self.end - 1.0) * keras.ops.minimum(1.0, (step - self.warmup_steps) / down_steps)
        return self.peak * keras.ops.where(step < self.warmup_steps, up, down)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "start": self.start, "end": self.end}


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead: every `every` steps the weights (norm statistics included) move to their running
    average, which follows them with decay 0.95^5 x (step / total)^3: fast early, then ever slower, so
    training ends on an average of its last steps."""

    def __init__(self, every: int, total_steps: int):
        super().__init__()
        self.every, self.total_steps, self.step, self.average = every, total_steps, 0, None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every:
            return
        weights = [w for w in self.model.weights if "float" in str(w.dtype)]
        if self.average is None:
            self.average = [np.array(w.numpy(), np.float32) for w in weights]
        self.pull(weights, 0.95**5 * min(1.0, self.step / self.total_steps) ** 3)

    def on_train_end(self, logs=None):
        if self.average is not None:  # training ends on the average, as airbench's does
            self.pull([w for w in self.model.weights if "float" in str(w.dtype)], 1.0)

    def pull(self, weights, decay: float) -> None:
        for average, weight in zip(self.average, weights):
            average += (1 - decay) * (weight.numpy() - average)
            weight.assign(average.astype(weight.dtype))


def make_batches(split: Split, batch_size: int, num_classes: int, shuffle_seed: int | None = None,
                 cutmix: float = 0.0):
    """(images, one-hot labels) batches; one-hot so that label smoothing and CutMix work for every recipe."""
    import tensorflow as tf

    images = split.images
    if shuffle_seed is not None:
        # A buffer of the whole split: folder datasets are stored class by class, and a smaller buffer
        # feeds each epoch's first batches from the first classes only, its last batches from the last ones.
        images = images.shuffle(len(split), seed=shuffle_seed, reshuffle_each_iteration=True)
    batches = images.batch(batch_size).map(lambda x, y: (x, tf.one_hot(y, num_classes)))
    if cutmix:
        batches = batches.map(cut_and_mix(cutmix, shuffle_seed), num_parallel_calls=tf.data.AUTOTUNE)
    # Under MultiWorkerMirroredStrategy every worker builds this same pipeline (the same seed, so the same
    # order) and takes its share of each global batch: no image twice per epoch. AUTO would first try to
    # shard by file, and these datasets are not read from files.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options)


def cut_and_mix(factor: float, seed: int | None):
    """keras.layers.CutMix for (uint8 images, one-hot labels) batches: a box of each image is replaced by the
    same box of another image in the batch, and the labels mixed by area. Pasted pixels are copies, so the
    images come back as exact uint8 (the models take raw pixels)."""
    import tensorflow as tf

    layer = keras.layers.CutMix(factor=factor, seed=seed)

    def mix(images, labels):
        mixed = layer({"images": tf.cast(images, tf.float32), "labels": labels}, training=True)
        return tf.cast(tf.round(mixed["images"]), tf.uint8), mixed["labels"]

    return mix


def image_batches(split: Split, batch_size: int):
    """Image-only batches in split order, for prediction."""
    return split.images.batch(batch_size).map(lambda x, y: x).prefetch(2)


def compile_model(model, recipe: Recipe, config, num_train: int, initial_epoch: int = 0, **compile_options) -> None:
    """Optimizer, loss and metrics from the recipe; the LR schedule spans the epochs still to run.

    `config.learning_rate` 0 takes the recipe's. `compile_options` go to model.compile (a benchmark's XLA).
    """
    total_steps = -(-num_train // config.batch_size) * max(1, config.epochs - initial_epoch)
    peak = config.learning_rate or recipe.learning_rate
    schedule = peak
    if recipe.schedule == "triangular":
        schedule = Triangular(peak, total_steps, max(1, int(total_steps * recipe.warmup_fraction)))
    if recipe.schedule == "cosine":
        warmup = max(1, int(total_steps * recipe.warmup_fraction))
        schedule = keras.optimizers.schedules.CosineDecay(
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
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=recipe.weight_decay, **ema)
    elif recipe.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            schedule, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay or None, **ema
        )
    else:
        optimizer = keras.optimizers.Adam(schedule, **ema)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing)
    # Plain TF graphs, not XLA ("auto" picks XLA here): XLA measured slower for these convnets on the CPU
    # (BENCHMARKS.md, "Speed notes measured while building this" and "CPU options").
    compile_options = {"jit_compile": False, **compile_options}
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], **compile_options)


def fit(model, config, data: ImageData, splits: tuple, callbacks: list, initial_epoch: int = 0,
        compiled: bool = False) -> dict:
    """model.fit on the first split, validated on the second; returns the history dict.

    A model from a checkpoint is `compiled` already: it carries its optimizer, LR schedule position
    and weight average.
    """
    (train_split, _), (validation_split, _) = splits[:2]  # a third, the calibration split, is not for fitting
    recipe = config.training_recipe()
    if not compiled:
        compile_model(model, recipe, config, len(train_split), initial_epoch)
    train_batches = make_batches(train_split, config.batch_size, data.num_classes, shuffle_seed=config.seed,
                                 cutmix=recipe.cutmix)
    if recipe.lookahead_images:
        steps = -(-len(train_split) // config.batch_size) * (config.epochs - initial_epoch)
        callbacks = [*callbacks, Lookahead(max(1, recipe.lookahead_images // config.batch_size), steps)]
    validation_batches = make_batches(validation_split, config.batch_size, data.num_classes)
    history = model.fit(
        train_batches,
        validation_data=validation_batches,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        shuffle=False,  # tf.data shuffles; Keras would warn and ignore it
        callbacks=[RecordLearningRate(), *callbacks],  # first: every later callback sees the rate
        verbose=progress_verbosity(),
    )
    if model.optimizer.use_ema:  # a property of the recipe (its weight average), whatever the architecture
        # The statistics of whole images, as the model will see them, not of CutMix's patchworks.
        recalibrate_norms(model, make_batches(train_split, config.batch_size, data.num_classes,
                                              shuffle_seed=config.seed) if recipe.cutmix else train_batches)
    return history.history


def progress_verbosity() -> int:
    """Keras's live progress bar on a terminal; one line per epoch in logs and CI, where a bar's
    redraws would fill the file."""
    return 1 if sys.stdout.isatty() else 2


def recalibrate_norms(model, batches, steps: int = NORM_RECALIBRATION_STEPS) -> None:
    """Set every batch norm's moving statistics to their average over `steps` training batches.

    fit() ends by swapping the weight average into the model, but the norms' statistics were tracked
    for the last raw weights, over the last few batches only (airbench's momentum 0.6 spans about
    three). Recomputed for the averaged weights, in training mode (so on augmented images, as in
    training). Its effect on the short CIFAR-10 recipe: BENCHMARKS.md, cifar10_airbench_short.
    """
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


def score_predictions(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Accuracy and plain cross-entropy (comparable across recipes, whatever their training loss)."""
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    return accuracy, float(-np.mean(np.log(picked)))
