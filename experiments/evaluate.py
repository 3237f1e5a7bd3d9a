"""Evaluation artifacts: confusion matrix, learning curves, misclassified images, per-class accuracy."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, class_names: list[str]) -> dict:
    support = matrix.sum(axis=1)
    correct = np.diag(matrix)
    accuracy = np.divide(correct, support, out=np.zeros(len(support)), where=support > 0)
    return {
        "class": list(class_names),
        "accuracy": [round(float(a), 6) for a in accuracy],
        "correct": correct.tolist(),
        "support": support.tolist(),
    }


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str]):
    n = len(class_names)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:  # beyond that, tick labels and counts are unreadable
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
        ax.legend()
    fig.tight_layout()
    return fig


def plot_misclassified(images: np.ndarray, labels, predictions, confidences, class_names, limit: int = 25):
    """A grid of up to `limit` wrong test predictions, the most confident mistakes first."""
    wrong = np.flatnonzero(labels != predictions)
    wrong = wrong[np.argsort(-confidences[wrong])][:limit]
    cols = 5
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        image = images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        ax.set_title(
            f"true {class_names[labels[i]]}\npred {class_names[predictions[i]]} {confidences[i]:.0%}", fontsize=8
        )
    if len(wrong) == 0:
        axes.flat[0].set_title("no misclassified test images")
    fig.suptitle("Most confident mistakes")
    fig.tight_layout()
    return fig
