"""Evaluation plots (confusion matrix, learning curves, misclassified images), and MLflow's standard
classifier evaluation of the test predictions. The figures of our own are computed in scoring.py."""

from __future__ import annotations

import contextlib

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import mlflow.models.evaluation.evaluators.classifier  # noqa: E402,F401 (imported up front: see run_logging)
# mlflow.models.evaluate imports the MLflow flavour of each library already loaded (to switch its
# autologging off) while it holds MLflow's import-hook lock: these two would be imported then, mid-run.
import mlflow.sklearn  # noqa: E402,F401
import mlflow.tensorflow  # noqa: E402,F401
import numpy as np  # noqa: E402

# Beyond this many classes our confusion matrix (plots/confusion_matrix.png) shows no per-cell counts.
MANY_CLASSES = 30
# MLflow's (test_confusion_matrix.png) writes each cell's value at 50/classes points (5 pt at 10 classes,
# 2 pt at 25): beyond 10 classes it goes without them (drawing them took 27-31 s at 100; BENCHMARKS.md).
MLFLOW_VALUES_MAX_CLASSES = 10
# MLflow's figures are named test_<its name>: test_accuracy_score, test_precision_score,
# test_recall_score, test_f1_score (the last three macro averages over the classes), test_example_count.
MLFLOW_PREFIX = "test_"


def standard_evaluation(labels: np.ndarray, predictions: np.ndarray, class_names: list[str], dataset) -> dict:
    """MLflow's classifier evaluation of the test predictions (mlflow.models.evaluate with static
    predictions, by class name): accuracy, macro precision, recall and F1 (with two classes MLflow
    reports the binary figures of the class whose name sorts last), `test_confusion_matrix.png` and
    `per_class_metrics.csv`, in the active run, on `dataset` (the test split's `mlflow.data` dataset:
    the evaluation rows are logged as the same dataset, same name and digest). Returns its metrics."""
    import mlflow
    import pandas as pd

    names = np.asarray([str(name) for name in class_names], dtype=object)
    frame = pd.DataFrame({"label": names[labels], "prediction": names[predictions]})
    rows = mlflow.data.from_pandas(frame, source=dataset.source, targets="label", predictions="prediction",
                                   name=dataset.name, digest=dataset.digest)
    config = {
        "metric_prefix": MLFLOW_PREFIX,
        "average": "macro",  # its default, "weighted", would hide the weak classes of a skewed split
        "label_list": list(names),  # every class in its confusion matrix, in a fixed order
        "log_model_explainability": False,  # no SHAP: there is no model to explain, only predictions
    }
    with quiet_evaluation(len(class_names)):
        # No model_id: MLflow 3.17 then logs every figure twice at step 0 (its evaluator, then
        # evaluate() again), two values per step in the run and on the model. The caller links them.
        result = mlflow.models.evaluate(data=rows, model_type="classifier", evaluators="classifier",
                                        evaluator_config=config)
    return result.metrics


@contextlib.contextmanager
def quiet_evaluation(num_classes: int):
    """mlflow.models.evaluate without its INFO lines (which evaluator, the label count) and scikit-learn's
    warnings about classes with no test images or no predictions (scoring.py notes those in the run);
    beyond MLFLOW_VALUES_MAX_CLASSES classes, its confusion matrix without per-cell values."""
    import functools
    import logging
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import ConfusionMatrixDisplay

    logger = logging.getLogger("mlflow.models.evaluation")
    level, plot = logger.level, ConfusionMatrixDisplay.plot
    logger.setLevel(logging.WARNING)
    if num_classes > MLFLOW_VALUES_MAX_CLASSES:  # MLflow calls plot() without include_values
        ConfusionMatrixDisplay.plot = functools.partialmethod(plot, include_values=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            yield
    finally:
        ConfusionMatrixDisplay.plot = plot
        logger.setLevel(level)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str]):
    n = len(class_names)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    if n <= MANY_CLASSES:  # beyond that, tick labels and counts are unreadable
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                colour = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (test accuracy {np.trace(matrix) / max(matrix.sum(), 1):.2%})")
    fig.tight_layout()
    return fig


def plot_learning_curves(history: dict):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "test")):
            if key in history:
                values = history[key]
                ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.lines:  # a history without this metric: an empty panel, not a legend warning
            ax.legend()
    fig.tight_layout()
    return fig


def plot_misclassified(images: np.ndarray, labels, predictions, confidences, class_names, limit: int = 25):
    """A grid of up to `limit` wrong test predictions, the most confident mistakes first."""
    wrong = np.flatnonzero(labels != predictions)
    wrong = wrong[np.argsort(-confidences[wrong])][:limit]
    captions = [f"true {class_names[labels[i]]}\npred {class_names[predictions[i]]} {confidences[i]:.0%}" for i in wrong]
    title = "Most confident mistakes" if len(wrong) else "no misclassified test images"
    return captioned_tiles(images[wrong], captions, cols=5, tile_inches=(2.2, 2.5), title=title, fontsize=8)


def captioned_tiles(tiles: np.ndarray, captions: list[str], cols: int, tile_inches: tuple, title: str, fontsize: int):
    """`tiles` (N, H, W, C uint8) in a grid on one axes, each under its caption. One image of tiles, not an
    axes per tile: 0.5-1.0 s to draw and save where 25 axes took 2.1 s, a cost every tracked run pays (see
    tracking_overhead in BENCHMARKS.md)."""
    rows = max(1, int(np.ceil(len(tiles) / cols)))
    height, width, channels = tiles.shape[1:] if len(tiles) else (32, 32, 1)
    gap, caption = max(2, width // 8), height // 2  # white space between tiles, and above each for its caption
    cell_height, cell_width = height + caption, width + gap
    canvas = np.full((rows * cell_height, cols * cell_width, channels), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(tile_inches[0] * cols, tile_inches[1] * rows))
    for k, (tile, text) in enumerate(zip(tiles, captions)):
        top, left = (k // cols) * cell_height + caption, (k % cols) * cell_width
        canvas[top : top + height, left : left + width] = tile
        ax.text(left + width / 2, top - 1, text, ha="center", va="bottom", fontsize=fontsize)
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray" if channels == 1 else None,
              interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=fontsize + 1)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95)
    return fig


def plot_reliability(bins: dict, uncalibrated: dict | None = None, temperature: float | None = None):
    """The reliability diagram: accuracy against confidence per bin (a calibrated model sits on the
    diagonal), and how many images fall in each bin; `uncalibrated`: the same bins before temperature
    scaling, as a line."""
    count = bins["count"]
    edges = np.linspace(0, 1, len(count) + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    top.bar(centres, np.nan_to_num(bins["accuracy"]), width=width * 0.9, color="tab:blue", alpha=0.8,
            label="accuracy" if temperature is None else f"accuracy, temperature {temperature:.2f}")
    if uncalibrated is not None:
        top.plot(centres, uncalibrated["accuracy"], marker="o", color="tab:red", label="before temperature scaling")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title("Reliability (test split)")
    bottom.bar(centres, count, width=width * 0.9, color="tab:gray")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def plot_gradcam(images: np.ndarray, heatmaps: np.ndarray, labels, predicted, class_names, wrong: int):
    """Grad-CAM heatmaps over test images, in rows of 8 tiles: the first `wrong` misclassified, then correct
    ones; each captioned with its true and predicted class."""
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    colours = matplotlib.colormaps["jet"](np.clip(heatmaps, 0, 1))[..., :3]  # (N, H, W, 3) in [0, 1]
    tiles = (0.55 * rgb + 0.45 * 255 * colours).round().astype(np.uint8)
    captions = [f"{'wrong' if k < wrong else 'right'}: true {class_names[labels[k]]}\npred {class_names[predicted[k]]}"
                for k in range(len(images))]
    return captioned_tiles(tiles, captions, cols=8, tile_inches=(1.7, 2.0), fontsize=7,
                           title="Grad-CAM of the predicted class (red: what the network looked at)")
