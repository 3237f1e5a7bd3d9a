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


@pytest.mark.slow
def test_promote_entry_point_gates_two_real_mnist_runs_and_the_champion_explains_over_http(tiny_npz_dir):
    """The user's path: two real runs, `mlflow run . -e promote`, then a served request with explain."""
    import base64
    import io
    import subprocess
    import sys

    from PIL import Image

    from conftest import PROJECT_ROOT, python_env, served
    from experiments.train import train
    from test_registry import encoded, post

    first = train(dataset="mnist", arch="cnn_simple", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir))
    registry.promote("mnist")
    second = train(dataset="mnist", arch="cnn_simple", epochs=2, batch_size=16, seed=1, data_dir=str(tiny_npz_dir))
    out = subprocess.run([sys.executable, "-m", "mlflow", "run", ".", "-e", "promote", "--env-manager", "local",
                          "-P", "dataset=mnist"], cwd=PROJECT_ROOT, env=python_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient()
    [version] = [v for v in client.search_model_versions("name = 'mnist'") if v.run_id == second.run_id]
    tags = version.tags
    assert GATE_TAGS <= set(tags) and tags["gate_decision"] in ("champion", "challenger")
    decision = tags["gate_decision"]
    passed = float(tags["gate_p_value"]) < 0.05 and float(tags["gate_gain"]) >= 0 and float(
        tags["gate_worst_class_drop"]) <= 5
    assert decision == ("champion" if passed else "challenger"), tags
    assert f"is now {decision}" in out.stdout and f"gate {tags['gate_reason']}" in out.stdout
    holder = second if decision == "champion" else first
    assert client.get_model_version_by_alias("mnist", "champion").run_id == holder.run_id

    images = np.random.default_rng(0).integers(0, 255, size=(2, 28, 28, 1), dtype=np.uint8)
    photo = np.random.default_rng(1).integers(0, 255, size=(40, 30), dtype=np.uint8)  # resized inside
    local = mlflow.pyfunc.load_model("models:/mnist@champion")
    with served("models:/mnist@champion", MLFLOW_TRACKING_URI=mlflow.get_tracking_uri()) as url:
        plain = post(url, {"inputs": images.tolist()})
        status, body = post(url, {"inputs": images.tolist(), "params": {"explain": True}})
        assert plain[0] == status == 200 and all("heatmap" not in row for row in plain[1]["predictions"])
        for row, without in zip(body["predictions"], plain[1]["predictions"]):  # the usual fields, unchanged
            assert {k: v for k, v in row.items() if k != "heatmap"} == without
            assert Image.open(io.BytesIO(base64.b64decode(row["heatmap"]))).size == (28, 28)
        status, body = post(url, {"inputs": [encoded(photo)], "params": {"explain": True}})
        assert status == 200
        heatmap = Image.open(io.BytesIO(base64.b64decode(body["predictions"][0]["heatmap"])))
        assert heatmap.size == (30, 40) and heatmap.mode == "L"  # (width, height) of the photo as sent
        sent = heatmap_pixels(post(url, {"inputs": images[:1].tolist(), "params": {"explain": True}})[1]
                              ["predictions"][0]["heatmap"])
    # What the server sent is the model's own Grad-CAM of its predicted class, as computed in process.
    [record] = local.predict(images[:1], params={"explain": True})
    np.testing.assert_allclose(heatmap_pixels(record["heatmap"]), sent, atol=1)
    assert heatmap_pixels(record["heatmap"]).max() == 255  # normalised to its peak


def heatmap_pixels(png: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))), dtype=np.int16)


@pytest.mark.slow
def test_explain_on_a_network_without_convolutions_is_refused_whole_with_a_400(tiny_npz_dir):
    from mlflow.exceptions import MlflowException

    from experiments.train import train
    run = train(dataset="mnist", arch="mlp", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir))
    uri, _ = registry.log_serving_model(mlflow.MlflowClient(), run.run_id)
    model = mlflow.pyfunc.load_model(uri)
    images = np.zeros((3, 28, 28, 1), np.uint8)
    assert all("heatmap" not in record for record in model.predict(images))
    with pytest.raises(MlflowException) as refused:
        model.predict(images, params={"explain": True})
    # The model's own copy of classifier.py raised it: the scoring server answers it with its status.
    assert type(refused.value).__name__ == "BadInput" and refused.value.get_http_status_code() == 400
    assert str(refused.value.message) == ("explain is not available: mlp has no convolutions to take a Grad-CAM "
                                          "heatmap from; serve a convolutional architecture")
