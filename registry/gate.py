"""The promotion gate: is a candidate really better than the champion, or is it seed noise, and did a
class get worse?

Both runs' per-image test predictions (experiments/predictions.py) are paired image by image:

- significance: the exact McNemar test on the images only one of the two gets right (`wins` for the
  candidate, `losses`): two-sided, p = min(1, 2 P[X <= min(wins, losses)]) for X ~ Binomial(wins +
  losses, 1/2). It must be below `alpha`;
- gain: the accuracy gain in points must be at least `min_gain`;
- per-class guard: no class may lose more than `max_class_drop` points of recall.

A candidate that passes all three takes `champion`; any other gets `challenger`. When either run has
no usable predictions (an older run, a damaged file, another test split), the two are compared by the
ranking metric alone, as before the gate existed, and the reason says so.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments import predictions as stored
from experiments import scoring
from experiments.errors import UserError
from experiments.predictions import Predictions

NOT_MEASURED = "n/a"


@dataclasses.dataclass(frozen=True)
class GateSettings:
    alpha: float = 0.05
    min_gain: float = 0.0  # accuracy points
    max_class_drop: float = 5.0  # recall points

    def check(self) -> None:
        """Refuse bad settings in one line, before anything is registered."""
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha} (0.05: a 5% chance of promoting noise)")
        if not self.min_gain >= 0:
            raise UserError(f"min_gain must be 0 or more accuracy points, got {self.min_gain}")
        if not 0 <= self.max_class_drop <= 100:
            raise UserError(f"max_class_drop must be in [0, 100] points of recall, got {self.max_class_drop}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str  # one line
    p_value: float | None = None
    gain: float | None = None  # accuracy points
    worst_class: str = ""
    worst_class_drop: float | None = None  # recall points

    def tags(self, decision: str) -> dict[str, str]:
        """The registered version's gate tags."""

        def shown(value):
            return NOT_MEASURED if value is None else f"{value:.6g}"

        return {"gate_p_value": shown(self.p_value), "gate_gain": shown(self.gain),
                "gate_worst_class": self.worst_class or NOT_MEASURED,
                "gate_worst_class_drop": shown(self.worst_class_drop), "gate_decision": decision,
                "gate_reason": self.reason}


def mcnemar_p(wins: int, losses: int) -> float:
    """The exact two-sided McNemar p-value of `wins` against `losses` (1.0 when there are none)."""
    from scipy.stats import binom

    if wins + losses == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(wins, losses), wins + losses, 0.5)))


def recalls(predictions: Predictions, num_classes: int) -> np.ndarray:
    """Per-class recall in points (NaN for a class with no test images)."""
    matrix = scoring.confusion_matrix(predictions.labels, predictions.predicted, num_classes)
    return 100.0 * scoring.class_scores(matrix)["recall"]


def compare(candidate: Predictions, champion: Predictions, class_names: list[str],
            settings: GateSettings) -> Verdict:
    """The gate on two runs' predictions of the same test split."""
    if not (np.array_equal(np.sort(candidate.indices), np.sort(champion.indices))):
        return Verdict(False, "the two prediction files hold different test images; not compared")
    candidate, champion = (sorted_by_index(p) for p in (candidate, champion))
    if not np.array_equal(candidate.labels, champion.labels):
        return Verdict(False, "the two prediction files disagree on the true labels; not compared")
    wins = int(np.sum(candidate.correct & ~champion.correct))
    losses = int(np.sum(~candidate.correct & champion.correct))
    p_value = mcnemar_p(wins, losses)
    gain = 100.0 * (wins - losses) / len(candidate.labels)
    num_classes = max(len(class_names), *(int(p.predicted.max()) + 1 for p in (candidate, champion)),
                      int(candidate.labels.max()) + 1)
    drops = recalls(champion, num_classes) - recalls(candidate, num_classes)
    worst = int(np.nanargmax(drops)) if not np.all(np.isnan(drops)) else 0
    worst_name = str(class_names[worst]) if worst < len(class_names) else str(worst)
    figures = (f"gain {gain:+.2f} points ({wins} images won, {losses} lost), McNemar p={p_value:.3g}, "
               f"worst class {worst_name} {-drops[worst]:+.1f} points of recall")
    failures = []
    if p_value >= settings.alpha:
        failures.append(f"p={p_value:.3g} is not below alpha={settings.alpha} (the difference may be noise)")
    if gain < settings.min_gain:
        failures.append(f"the gain of {gain:+.2f} points is below min_gain={settings.min_gain}")
    if drops[worst] > settings.max_class_drop:
        failures.append(f"class {worst_name} loses {drops[worst]:.1f} points of recall, over "
                        f"max_class_drop={settings.max_class_drop}")
    reason = ("passed: " + figures) if not failures else ("held back: " + "; ".join(failures) + f" [{figures}]")
    return Verdict(not failures, reason, p_value, gain, worst_name, float(drops[worst]))


def sorted_by_index(predictions: Predictions) -> Predictions:
    order = np.argsort(predictions.indices, kind="stable")
    return dataclasses.replace(predictions, indices=predictions.indices[order], labels=predictions.labels[order],
                               predicted=predictions.predicted[order], probabilities=predictions.probabilities[order])


def by_metric(beats: bool, metric: str, why: str) -> Verdict:
    """No paired comparison was possible: the ranking metric alone decides, as before the gate."""
    result = "better" if beats else "not better"
    return Verdict(beats, f"compared by {metric} alone ({result}): {why}")


def judge(candidate_run: str, champion_run: str, metric: str, beats: bool, digest: str,
          settings: GateSettings) -> Verdict:
    """The gate on two runs' stored predictions of test split `digest`; the metric alone (`beats`) when
    either run has none usable."""
    theirs, why = stored.load(candidate_run, digest)
    ours, why_not_ours = stored.load(champion_run, digest) if theirs is not None else (None, "")
    if theirs is None or ours is None:
        return by_metric(beats, metric, why or why_not_ours)
    return compare(theirs, ours, class_names(candidate_run, theirs), settings)


def class_names(run_id: str, found: Predictions) -> list[str]:
    """The run's class names (its config.json), else the class indices."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return list(mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")["class_names"])
    except (MlflowException, OSError, KeyError, ValueError):  # an older or hand-made run
        return [str(i) for i in range(int(found.labels.max()) + 1)]
