"""Test-set figures from a model's test probabilities, in numpy: the confusion matrix, per-class
precision, recall and F1, macro-F1, log-loss and top-5 accuracy, with the metric names they are logged
under. No MLflow here: run_logging.log_evaluation logs them; MLflow's own classifier evaluation
(experiments/evaluate.py) runs beside them.

A figure that is undefined (a class with no test images has no recall; a class never predicted has no
precision) is left out, never NaN, and a note says why.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

TOP5_MIN_CLASSES = 20  # top-5 accuracy only means something with many classes (CIFAR-100, Caltech-101)
NOTE_TAG = "evaluation_note"  # the run tag that lists the per-class figures left out, and why
NO_TEST_IMAGES = "no test images of this class"
NEVER_PREDICTED = "never predicted"
EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1] before the log, as for test_loss (fit.py)


@dataclasses.dataclass(frozen=True)
class EvaluationFigures:
    metrics: dict[str, float]  # name -> finite value, to log on the model and the test dataset
    per_class: dict[str, list]  # the per-class table, a column per key (None where undefined)
    notes: list[str]  # what was left out, and why; empty when nothing was


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    return np.bincount(num_classes * np.asarray(labels, np.int64) + np.asarray(predictions, np.int64),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (undefined, not 0)."""
    out = np.full(len(numerator), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per class: support (test images), predicted (times predicted), correct, and precision, recall
    and F1 (NaN where undefined). F1 = 2 TP / (2 TP + FP + FN): defined unless the class is both absent
    from the test split and never predicted (then 0 if only one of the two)."""
    support, predicted, correct = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    return {
        "support": support,
        "predicted": predicted,
        "correct": correct,
        "precision": ratio(correct, predicted),
        "recall": ratio(correct, support),
        "f1": ratio(2 * correct, support + predicted),
    }


def macro_f1(f1: np.ndarray) -> float:
    """The mean F1 over the classes it is defined for (those in the test split or predicted): what
    scikit-learn's f1_score(average="macro") gives without a label list."""
    defined = f1[~np.isnan(f1)]
    return float(defined.mean()) if len(defined) else float("nan")


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The mean negative log-probability of the true class: test_loss's formula (fit.score_predictions)."""
    picked = np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1.0)
    return float(-np.mean(np.log(picked)))


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int = 5) -> float:
    """The share of images whose true class is among the k most probable. Ties at the boundary count
    as in (tf.math.in_top_k's rule): the class is in if fewer than k classes are strictly more probable.
    An image whose true class's probability is NaN is out."""
    true = probabilities[np.arange(len(labels)), labels]
    return float(np.mean(((probabilities > true[:, None]).sum(axis=1) < k) & ~np.isnan(true)))


def metric_names(class_names: list[str]) -> list[str]:
    """Each class name as a metric-name component MLflow takes on every platform (letters, digits,
    `_`, `-`, `.`; the rest become `_`), unique (a clash gets the class index appended), at most 200
    characters, and never `.` or `..` (a path component MLflow refuses)."""
    names, seen = [], set()
    for index, name in enumerate(class_names):
        safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(name))[:200] or f"class_{index}"
        if set(safe) == {"."}:
            safe = f"class_{index}"
        if safe in seen:
            safe = f"{safe}_{index}"
        seen.add(safe)
        names.append(safe)
    return names


def listed(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def evaluation_figures(matrix: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                       given: dict[str, float] | None = None) -> EvaluationFigures:
    """The figures `given` (test_accuracy and test_loss, from training) and:

    - `test_log_loss` (= test_loss: both are the plain cross-entropy of the probabilities);
    - `test_macro_f1` (the mean per-class F1);
    - `test_accuracy_ci_low` and `test_accuracy_ci_high`, the 95% bootstrap interval of the accuracy;
    - `test_ece`, the expected calibration error in 15 equal-width confidence bins;
    - `test_top5_accuracy` with 20 or more classes;
    - `test_precision/<class>`, `test_recall/<class>` and `test_f1/<class>`, each only where defined.
    """
    scores = class_scores(matrix)
    keys = metric_names(class_names)
    low, high = bootstrap_interval(probabilities.argmax(axis=1) == labels)
    metrics = {**(given or {}), "test_log_loss": log_loss(labels, probabilities),
               "test_macro_f1": macro_f1(scores["f1"]), "test_accuracy_ci_low": low, "test_accuracy_ci_high": high,
               "test_ece": expected_calibration_error(labels, probabilities)}
    if len(class_names) >= TOP5_MIN_CLASSES:
        metrics["test_top5_accuracy"] = top_k_accuracy(labels, probabilities, 5)
    for figure in ("precision", "recall", "f1"):
        metrics.update({f"test_{figure}/{key}": float(value) for key, value in zip(keys, scores[figure])
                        if not np.isnan(value)})
    notes = left_out(scores, class_names)
    not_finite = sorted(name for name, value in metrics.items() if not np.isfinite(value))
    if not_finite:  # non-finite probabilities (a diverged model): nothing NaN or infinite is logged
        notes.append(f"left out, not finite (are the probabilities finite?): {listed(not_finite)}")
    metrics = {name: value for name, value in metrics.items() if np.isfinite(value)}
    return EvaluationFigures(metrics, per_class_table(scores, class_names), notes)


def left_out(scores: dict[str, np.ndarray], class_names: list[str]) -> list[str]:
    """One note per kind of undefined figure, naming the classes."""
    absent, unpredicted = scores["support"] == 0, scores["predicted"] == 0
    kinds = (("recall", absent, "with no test images"), ("precision", unpredicted, "never predicted"),
             ("f1", absent & unpredicted, "neither in the test split nor predicted"))
    notes = []
    for figure, which, why in kinds:
        names = [str(name) for name, flag in zip(class_names, which) if flag]
        if names:
            notes.append(f"{figure} left out for {len(names)} class(es) {why}: {listed(names)}")
    return notes


def per_class_table(scores: dict[str, np.ndarray], class_names: list[str]) -> dict[str, list]:
    """The per-class table (evaluation/per_class_accuracy.json): accuracy is the share of the class's
    test images predicted right (its recall); None where a figure is undefined, with the note why."""

    def column(values):
        return [None if np.isnan(v) else round(float(v), 6) for v in values]

    notes = []
    for support, predicted in zip(scores["support"], scores["predicted"]):
        why = ([NO_TEST_IMAGES] if support == 0 else []) + ([NEVER_PREDICTED] if predicted == 0 else [])
        notes.append("; ".join(why))
    return {
        "class": [str(name) for name in class_names],
        "accuracy": column(scores["recall"]),
        "precision": column(scores["precision"]),
        "recall": column(scores["recall"]),
        "f1": column(scores["f1"]),
        "correct": scores["correct"].tolist(),
        "support": scores["support"].tolist(),
        "predicted": scores["predicted"].tolist(),
        "note": notes,
    }


# --- Uncertainty and calibration -------------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 1000
CALIBRATION_BINS = 15


def bootstrap_interval(correct: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the accuracy: `resamples` draws of the test images with
    replacement, seeded, so a run's interval is the same every time it is computed."""
    correct = np.asarray(correct, np.float32)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    per_chunk = max(1, 2_000_000 // max(len(correct), 1))  # index arrays of at most 16 MB at a time
    for start in range(0, resamples, per_chunk):
        count = min(per_chunk, resamples - start)
        means[start : start + count] = correct[rng.integers(0, len(correct), (count, len(correct)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Per equal-width confidence bin ((0, 1/bins], ...): its image count, mean confidence and accuracy
    (NaN in an empty bin). The confidence is the top probability; an image is right when its top class is."""
    confidence = probabilities.max(axis=1).astype(np.float64)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(np.nan_to_num(confidence) * bins).astype(int) - 1, 0, bins - 1)  # NaN: bin 1
    count = np.bincount(which, minlength=bins)
    return {"count": count, "confidence": ratio(np.bincount(which, confidence, bins), count),
            "accuracy": ratio(np.bincount(which, correct, bins), count)}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE: the mean over images of |accuracy - confidence| of their bin, in equal-width bins."""
    if not np.all(np.isfinite(probabilities)):
        return float("nan")  # a diverged model: left out, with the note that says why
    table = calibration_bins(labels, probabilities, bins)
    filled = table["count"] > 0
    gaps = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float(np.sum(gaps * table["count"][filled]) / max(len(labels), 1))
