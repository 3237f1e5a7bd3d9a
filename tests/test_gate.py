"""The promotion gate on a real sqlite registry: real tiny runs whose per-image predictions are replaced by
constructed ones of 10,000 test images, so each case has exactly the wins and losses it names."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from scipy.stats import binomtest

from conftest import trained, with_predictions
from experiments import predictions
from experiments.errors import UserError
from registry import gate
from registry import promote as registry

IMAGES = 10_000
GATE_TAGS = {"gate_p_value", "gate_gain", "gate_worst_class", "gate_worst_class_drop", "gate_decision", "gate_reason"}


def test_the_exact_mcnemar_p_value_is_the_two_sided_binomial_test():
    assert gate.mcnemar_p(10, 0) == pytest.approx(2 * 0.5**10)
    assert gate.mcnemar_p(160, 150) == pytest.approx(binomtest(150, 310, 0.5).pvalue)
    assert gate.mcnemar_p(7, 7) == 1.0 and gate.mcnemar_p(0, 0) == 1.0


def class_names(run_id: str) -> list[str]:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")["class_names"]


def version_tags(version: str) -> dict:
    return mlflow.MlflowClient().get_model_version("cifar10", version).tags


@pytest.mark.slow
def test_only_a_significant_gain_without_a_class_falling_behind_takes_champion(tiny_cifar):
    rng = np.random.default_rng(0)
    first = trained(tiny_cifar)
    names = class_names(first)
    labels = np.arange(IMAGES) % len(names)
    base = rng.random(IMAGES) < 0.80  # the champion gets 80% right
    with_predictions(first, labels, base, len(names))
    [decision] = registry.promote("cifar10")
    assert decision.action == "champion" and version_tags("1")["gate_decision"] == "champion"
    assert "no champion yet" in version_tags("1")["gate_reason"]

    # 0.1 point better, wins and losses balanced: noise. Stays challenger, p >= 0.05.
    noise = base.copy()
    noise[rng.choice(np.flatnonzero(base), 150, replace=False)] = False
    noise[rng.choice(np.flatnonzero(~base), 160, replace=False)] = True
    with_predictions(trained(tiny_cifar), labels, noise, len(names))
    [decision] = registry.promote("cifar10")
    tags = version_tags(decision.version)
    assert decision.action == "challenger" and set(tags) >= GATE_TAGS
    assert float(tags["gate_p_value"]) == pytest.approx(binomtest(150, 310, 0.5).pvalue) and float(tags["gate_p_value"]) >= 0.05
    assert float(tags["gate_gain"]) == pytest.approx(0.1) and tags["gate_decision"] == "challenger"
    assert "not below alpha=0.05" in tags["gate_reason"] and "not below alpha=0.05" in decision.message

    # Better overall (+3 points elsewhere) but 10 points of recall lost on one class: challenger, class named.
    worse_class = base.copy()
    victim = 1
    lost = rng.choice(np.flatnonzero(base & (labels == victim)), int(0.10 * np.sum(labels == victim)), replace=False)
    worse_class[lost] = False
    worse_class[rng.choice(np.flatnonzero(~base & (labels != victim)), 300 + len(lost), replace=False)] = True
    with_predictions(trained(tiny_cifar), labels, worse_class, len(names))
    [dry] = registry.promote("cifar10", dry_run=True)
    [decision] = registry.promote("cifar10")
    tags = version_tags(decision.version)
    assert decision.action == "challenger" and dry.action == "would be challenger"
    assert tags["gate_worst_class"] == names[victim] and float(tags["gate_worst_class_drop"]) == pytest.approx(10, abs=0.05)
    assert f"class {names[victim]} loses 10.0 points of recall" in tags["gate_reason"]
    assert dry.gate["gate_reason"] == tags["gate_reason"]  # the dry run printed the same decision
    assert float(tags["gate_p_value"]) < 0.05 and float(tags["gate_gain"]) == pytest.approx(3.0)

    # 3 points better with consistent wins on every class: champion.
    better = base.copy()
    better[rng.choice(np.flatnonzero(~base), 300, replace=False)] = True
    with_predictions(trained(tiny_cifar), labels, better, len(names))
    [decision] = registry.promote("cifar10")
    tags = version_tags(decision.version)
    champion = mlflow.MlflowClient().get_model_version_by_alias("cifar10", "champion")
    assert decision.action == "champion" and str(champion.version) == decision.version
    assert set(tags) >= GATE_TAGS and tags["gate_decision"] == "champion"
    assert float(tags["gate_p_value"]) == pytest.approx(2 * 0.5**300) and float(tags["gate_gain"]) == pytest.approx(3.0)
    assert tags["gate_reason"].startswith("passed: gain +3.00 points (300 images won, 0 lost)")

    # A demanding min_gain holds back the same kind of win.
    stronger = better.copy()
    stronger[rng.choice(np.flatnonzero(~better), 50, replace=False)] = True
    with_predictions(trained(tiny_cifar), labels, stronger, len(names))
    [decision] = registry.promote("cifar10", gate=gate.GateSettings(min_gain=1.0))
    assert decision.action == "challenger" and "below min_gain=1.0" in decision.message

    # rollback still works: back to the first champion.
    assert registry.rollback("cifar10").version == "1"


@pytest.mark.slow
def test_runs_without_usable_predictions_are_compared_by_the_metric_with_a_note(tiny_cifar):
    client = mlflow.MlflowClient()
    champion_run = trained(tiny_cifar, 0.5)
    registry.promote("cifar10")
    candidate = trained(tiny_cifar, 0.9)
    stored = Path(client.get_run(candidate).info.artifact_uri.removeprefix("file://")) / predictions.ARTIFACT
    stored.write_bytes(stored.read_bytes()[:100])  # truncated
    [decision] = registry.promote("cifar10")
    assert decision.action == "champion"  # by test_accuracy alone, as before the gate
    assert "compared by test_accuracy alone (better)" in decision.message and "unreadable" in decision.message
    assert version_tags(decision.version)["gate_p_value"] == "n/a"

    other = trained(tiny_cifar, 0.95)
    stored = Path(client.get_run(other).info.artifact_uri.removeprefix("file://")) / predictions.ARTIFACT
    stored.unlink()  # an older run: no file at all
    [decision] = registry.promote("cifar10", dry_run=True)
    assert "has no evaluation/predictions.npz" in decision.message

    found, why = predictions.load(champion_run, "another-digest")
    assert found is None and "not another-digest" in why


@pytest.mark.parametrize("settings, fragment", [
    (gate.GateSettings(alpha=0), "alpha must be in (0, 1)"),
    (gate.GateSettings(alpha=1), "alpha must be in (0, 1)"),
    (gate.GateSettings(min_gain=-0.5), "min_gain must be 0 or more"),
    (gate.GateSettings(max_class_drop=101), "max_class_drop must be in [0, 100]"),
    (gate.GateSettings(max_class_drop=-1), "max_class_drop must be in [0, 100]"),
])
def test_bad_gate_settings_are_refused_before_anything_is_registered(settings, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        registry.promote("cifar10", gate=settings)
    assert mlflow.MlflowClient().search_registered_models() == []


def test_the_command_line_refuses_a_bad_alpha_in_one_line(capsys):
    assert registry.main(["--dataset", "cifar10", "--alpha", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: alpha must be in (0, 1), got 1.5 (0.05: a 5% chance of promoting noise)"
    assert "Traceback" not in err
