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
    # One image of tiles on one axes, not an axes per image: 0.5-1.0 s to draw and save where 25 axes
    # took 2.1 s, a cost every tracked run pays (see tracking_overhead in BENCHMARKS.md).
    height, width, channels = images.shape[1:] if len(wrong) else (32, 32, 1)
    gap, caption = max(2, width // 8), height // 2  # white space between tiles, and above each for its caption
    cell_height, cell_width = height + caption, width + gap
    canvas = np.full((rows * cell_height, cols * cell_width, channels), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(2.2 * cols, 2.5 * rows))
    for k, i in enumerate(wrong):
        top, left = (k // cols) * cell_height + caption, (k % cols) * cell_width
        canvas[top : top + height, left : left + width] = images[i]
        ax.text(left + width / 2, top - 1, f"true {class_names[labels[i]]}\npred {class_names[predictions[i]]} "
                f"{confidences[i]:.0%}", ha="center", va="bottom", fontsize=8)
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray" if channels == 1 else None,
              interpolation="nearest")
    ax.axis("off")
    ax.set_title("Most confident mistakes" if len(wrong) else "no misclassified test images")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95)
    return fig
